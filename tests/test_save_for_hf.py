"""timm's own way to carry a model's arguments (issue 18): fnl-train writes the best model and
fnl-compress the compressed one as ``timm.models.save_for_hf``'s folder, and timm's own loader
(``timm.create_model('local-dir:...', pretrained=True)``, what ``--model local-dir:...`` does in
timm's scripts) rebuilds them with equal outputs and the run's preprocessing, or the report says
why there is no folder. Tiny model (fnl_test_resnet at 16x16), a few steps."""
import json
import os

import pytest
import torch

timm = pytest.importorskip('timm')
pytest.importorskip('safetensors')
import fnl_timm  # noqa: E402,F401
from fnl_timm import compress as cli  # noqa: E402
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm.data import create_datasets  # noqa: E402

BASE = ['--model', 'fnl_test_resnet', '--img-size', '16', '--batch-size', '32', '--workers', '0',
        '--limit-train-batches', '3', '--limit-val-batches', '2', '--no-progress', '--no-tensorboard', '--lr', '0.05']
X = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(1))


def _timm_load(folder):
    return timm.create_model('local-dir:' + str(folder), pretrained=True).eval()


def _no_temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith('.tmp') or n.startswith('.old')]


def test_fnl_train_writes_the_best_model_for_timm(tmp_path):
    res = fnl_train.run(BASE + ['--output', str(tmp_path), '--experiment', 'hf', '--epochs', '2', '--rank-scale',
                                '0.3', '--spectral'])
    run = tmp_path / 'hf'
    assert res['hf'] == str(run / 'hf') and 'hf_note' not in res
    config = json.loads((run / 'hf' / 'config.json').read_text())
    assert config['architecture'] == 'fnl_test_resnet'
    assert {k: config['model_args'][k] for k in ('num_classes', 'in_chans', 'rank_scale', 'spectral')} == \
        {'num_classes': 10, 'in_chans': 3, 'rank_scale': 0.3, 'spectral': True}
    loaded = _timm_load(run / 'hf')
    best = timm.create_model('fnl_test_resnet', num_classes=10, rank_scale=0.3).eval()
    best.load_state_dict(torch.load(run / 'model_best.pth.tar', weights_only=False)['state_dict'])
    with torch.no_grad():
        assert torch.equal(loaded(X), best(X))
    assert loaded.rank_scale == pytest.approx(0.3)
    # the run's preprocessing (the digits' mean and std, 16x16), not the architecture's CIFAR defaults
    _, _, info = create_datasets('digits', img_size=16)
    data = timm.data.resolve_data_config(model=loaded)
    assert data['input_size'] == (3, 16, 16)
    assert data['mean'] == pytest.approx(info.mean) and data['std'] == pytest.approx(info.std)
    assert _no_temporaries(run) == []


def test_fnl_compress_factorized_model_loads_in_timm(tmp_path):
    out = tmp_path / 'c'
    rep = cli.compress_file('fnl_test_resnet', str(out), random_init=True, input_size=[3, 16, 16],
                            target_ratio=0.5, finalize='factorized', no_latency=True)
    assert rep['extra']['hf'] == str(out / 'hf') and 'hf_note' not in rep['extra']
    assert 'timm folder: ' in (out / 'report.txt').read_text()
    compressed = cli.load_compressed(str(out / 'compressed.pth'))
    with pytest.warns(UserWarning, match='rebuilt at the checkpoint'):  # the ranks come from the weights' shapes
        loaded = _timm_load(out / 'hf')
    with torch.no_grad():
        assert torch.allclose(loaded(X), compressed(X), atol=1e-5), f'{(loaded(X) - compressed(X)).abs().max()}'
    def ranks(model):
        return {n: m.rank for n, m in model.named_modules() if hasattr(m, 'rank') and hasattr(m, 'U')}
    assert ranks(loaded) == ranks(compressed) and len(ranks(loaded)) == 6
    assert _no_temporaries(out) == []


def test_fnl_compress_says_why_pairs_of_plain_layers_get_no_folder(tmp_path):
    out = tmp_path / 'c'
    rep = cli.compress_file('fnl_test_resnet', str(out), random_init=True, input_size=[3, 16, 16],
                            target_ratio=0.5, finalize='inference', no_latency=True)
    assert rep['extra']['hf'] is None and not (out / 'hf').exists()
    assert rep['extra']['hf_note'].startswith('its low-rank layers are pairs of plain layers')
    assert 'no timm folder (hf/): its low-rank layers' in (out / 'report.txt').read_text()
    assert _no_temporaries(out) == []


def test_generic_fnl_model_gets_a_reason_not_a_folder(tmp_path):
    """timm.create_model('fnl', base=...) carries its base's architecture, which takes none of fnl's
    arguments: no folder is written, and the reason says how to reload the model instead."""
    import timm
    from fnl_timm._hf import save_timm_folder
    model = timm.create_model('fnl', base='test_resnet', rank_scale=0.5, num_classes=3)
    reason = save_timm_folder(model, str(tmp_path / 'hf'), (3, 32, 32))
    assert reason is not None and "create_model('fnl', base=..., checkpoint_path=...)" in reason
    assert not (tmp_path / 'hf').exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either
