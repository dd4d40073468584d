"""fnl-train end to end on the embedded digits (paper sections 3.3 and 4): collapse, norm recording and
normalisation, resume, and 2-process DDP. Tiny model, 16x16 inputs, a few steps per epoch."""
import json
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm.data import DigitsDataset, create_datasets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'fnl_test_resnet', '--img-size', '16', '--batch-size', '32', '--workers', '0',
        '--limit-train-batches', '3', '--limit-val-batches', '2', '--no-progress', '--no-tensorboard', '--lr', '0.05']


def _run(tmp_path, name, *extra):
    return fnl_train.run(BASE + ['--output', str(tmp_path), '--experiment', name, *extra])


def test_digits_dataset():
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert (len(train), len(val)) == (1437, 360)
    img, target = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and 0 <= target < 10
    tr, va, info = create_datasets('digits', img_size=16)
    x, _ = tr[0]
    assert tuple(x.shape) == info.input_size == (3, 16, 16)
    with pytest.raises(ValueError, match='dataset'):
        create_datasets('mnist')
    with pytest.raises(ValueError, match='data_dir'):
        create_datasets('cifar10')
    with pytest.raises(ValueError, match='cutout'):
        create_datasets('folder', 'somewhere', cutout=16)


def test_square_collapse_keeps_logits(tmp_path):
    """--square at rank_scale 1, collapsed at the end: same logits, the dense parameter count."""
    res = _run(tmp_path, 'sq', '--rank-scale', '1.0', '--square', '--wd2fd', '--epochs', '1', '--collapse')
    dense = timm.create_model('fnl_test_resnet')
    assert res['collapsed_params'] == fnl.count_parameters(dense) == res['dense_params']
    assert res['params'] > res['dense_params']  # overcomplete while training
    assert res['collapse_max_abs_diff'] < 1e-4
    # the saved dense state dict loads strictly into the dense model and gives the trained logits
    dense.load_state_dict(torch.load(res['collapsed_model'], weights_only=True))
    fact = timm.create_model('fnl_test_resnet', rank_scale=1.0, square=True)
    ckpt = torch.load(tmp_path / 'sq' / 'last.pth.tar', weights_only=False)
    fact.load_state_dict(ckpt['state_dict'])
    _, val, _ = create_datasets('digits', img_size=16)
    x = torch.stack([val[i][0] for i in range(16)])
    a, b = dense.eval()(x), fact.eval()(x)
    assert torch.allclose(a, b, atol=1e-4), f'{(a - b).abs().max()}'


def test_dump_then_normalize_reproduces_norms(tmp_path):
    """Paper section 3.3: the norm run follows the frob run's recorded norms step by step."""
    frob = _run(tmp_path, 'frob', '--rank-scale', '0.3', '--wd2fd', '--weight-decay', '5e-2', '--epochs', '2',
                '--dump-frobnorms')
    recorded = torch.load(frob['frobnorms'], weights_only=True)
    n_layers = len(fnl.factorized_layers(timm.create_model('fnl_test_resnet', rank_scale=0.3)))
    assert recorded.shape == (2, 3, n_layers)
    norm = _run(tmp_path, 'norm', '--rank-scale', '0.3', '--wd2fd', '--weight-decay', '5e-2', '--epochs', '2',
                '--no-frob', '--normalize', frob['frobnorms'], '--dump-frobnorms')
    followed = torch.load(norm['frobnorms'], weights_only=True)
    assert torch.allclose(followed, recorded, rtol=1e-5), f'{(followed - recorded).abs().max()}'
    none = _run(tmp_path, 'none', '--rank-scale', '0.3', '--wd2fd', '--weight-decay', '5e-2', '--epochs', '2',
                '--no-frob', '--dump-frobnorms')
    free = torch.load(none['frobnorms'], weights_only=True)
    assert not torch.allclose(free, recorded, rtol=1e-3)  # without FD or normalisation the norms differ


def test_resume_continues_exactly(tmp_path):
    """Stopping after epoch 0 and resuming gives the uninterrupted run's weights and optimizer state."""
    args = ['--rank-scale', '0.3', '--spectral', '--wd2fd', '--epochs', '3', '--dump-frobnorms']
    straight = _run(tmp_path, 'straight', *args)
    _run(tmp_path, 'part', *args, '--stop-epoch', '1')
    part = torch.load(tmp_path / 'part' / 'last.pth.tar', weights_only=False)
    assert part['epoch'] == 0 and 'fnl' in part
    # --experiment is ignored on resume: the run continues in the checkpoint's folder
    resumed = _run(tmp_path, 'elsewhere', *args, '--resume', str(tmp_path / 'part' / 'last.pth.tar'))
    assert (resumed['epochs_run'], resumed['start_epoch'], resumed['experiment']) == (3, 1, 'part')
    assert not (tmp_path / 'elsewhere').exists()
    a = torch.load(tmp_path / 'straight' / 'last.pth.tar', weights_only=False)
    b = torch.load(tmp_path / 'part' / 'last.pth.tar', weights_only=False)
    for k, v in a['state_dict'].items():
        assert torch.allclose(v.float(), b['state_dict'][k].float(), atol=1e-6), k
    ga, gb = a['optimizer']['param_groups'], b['optimizer']['param_groups']
    assert [(g['lr'], g['fd_coef'], g['weight_decay']) for g in ga] == \
        [(g['lr'], g['fd_coef'], g['weight_decay']) for g in gb]
    assert any(g['fd_coef'] > 0 for g in ga)
    for k, st in a['optimizer']['state'].items():
        assert torch.allclose(st['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'], atol=1e-6)
    na = torch.load(straight['frobnorms'], weights_only=True)
    nb = torch.load(resumed['frobnorms'], weights_only=True)
    assert na.shape == nb.shape and torch.allclose(na, nb, atol=1e-6)
    assert straight['top1'] == pytest.approx(resumed['top1'])


def test_paper_step_schedule(tmp_path):
    """lr x0.1 from 50% and from 75% of the epochs (torch MultiStepLR meaning)."""
    _run(tmp_path, 'sched', '--epochs', '4', '--limit-train-batches', '1', '--limit-val-batches', '1')
    import csv
    with open(tmp_path / 'sched' / 'summary.csv') as f:
        lrs = [float(row['lr']) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])


@pytest.mark.parametrize('argv,match', [
    (['--wd2fd', '--opt', 'sgd'], 'wd2fd'),
    (['--normalize', 'x.pt', '--rank-scale', '0.3'], 'no-frob'),
    (['--spectral'], 'rank-scale'),
    (['--rank-scale', '0.2', '--target-ratio', '0.1'], 'target-ratio'),
    (['--batch-size', '0'], 'batch-size'),
    (['--opt', 'nosuchopt'], 'opt'),
    (['--wd2fd'], 'factorized'),
    (['--model', 'nosuch_model'], "--model 'nosuch_model' is not a registered timm model"),
])
def test_bad_flags(argv, match):
    args = fnl_train.build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=match):
        fnl_train.validate_args(args)


def test_torchrun_two_processes_agree(tmp_path):
    """A 2-process CPU torchrun (gloo) run trains, and both ranks end with the same weights."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
           '-m', 'fnl_timm.train', '--device', 'cpu', *BASE, '--rank-scale', '0.3', '--spectral', '--wd2fd',
           '--epochs', '2', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    assert res['world_size'] == 2
    assert res['ddp_max_weight_diff'] == 0.0
    assert res['epochs_run'] == 2 and res['top1'] is not None
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', weights_only=False)
    assert ckpt['epoch'] == 1


def _fake_images(folder, n, size, color):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new('RGB', (size, size), color=(color, (37 * i) % 255, 0)).save(os.path.join(folder, f'{i}.png'))


def test_tiny_imagenet_and_folder_datasets(tmp_path):
    from fnl_timm.data import TinyImageNet
    root = tmp_path / 'tiny-imagenet-200'
    wnids = ['n001', 'n002']
    for k, w in enumerate(wnids):
        _fake_images(root / 'train' / w / 'images', 3, 64, 100 * k)
    _fake_images(root / 'val' / 'images', 2, 64, 0)
    (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
    (root / 'val' / 'val_annotations.txt').write_text('0.png\tn002\t0\t0\t64\t64\n1.png\tn001\t0\t0\t64\t64\n')
    train = TinyImageNet(str(root), 'train')
    val = TinyImageNet(str(root), 'val')
    assert train.targets == [0, 0, 0, 1, 1, 1] and val.targets == [1, 0]
    tr, va, info = create_datasets('tiny-imagenet', str(root))
    assert info.num_classes == 200 and tuple(tr[0][0].shape) == (3, 64, 64)
    with pytest.raises(ValueError, match='wnids'):
        TinyImageNet(str(tmp_path), 'train')
    # any class-per-folder tree through timm's folder reader, trained for one step
    for split in ('train', 'val'):
        for k, c in enumerate(('cat', 'dog')):
            _fake_images(tmp_path / 'folder' / split / c, 4, 20, 120 * k)
    res = fnl_train.run(['--dataset', 'folder', '--data-dir', str(tmp_path / 'folder'), '--img-size', '16',
                         '--model', 'fnl_test_resnet', '--rank-scale', '0.3', '--batch-size', '4', '--epochs', '1',
                         '--workers', '0', '--no-progress', '--no-tensorboard', '--output', str(tmp_path / 'out')])
    assert res['epochs_run'] == 1 and res['top1'] is not None
    assert res['dense_params'] == fnl.count_parameters(timm.create_model('fnl_test_resnet', num_classes=2))


def test_amp_bfloat16_cpu(tmp_path):
    """--amp on the CPU: bfloat16 autocast, FD optimizer, finite results."""
    res = _run(tmp_path, 'amp', '--rank-scale', '0.3', '--spectral', '--wd2fd', '--epochs', '1', '--amp',
               '--clip-grad', '1.0')
    assert res['epochs_run'] == 1 and 0.0 <= res['top1'] <= 100.0
    ckpt = torch.load(tmp_path / 'amp' / 'last.pth.tar', weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


def test_checkpoint_loading_keeps_other_safe_global_registrations():
    """torch's safe_globals context removes its globals on exit; ours must not undo e.g. the fairseq plugin's."""
    import argparse
    from fnl_timm._serialization import allow_argparse_namespace
    registered = list(torch.serialization.get_safe_globals())
    before = argparse.Namespace in registered
    torch.serialization.add_safe_globals([argparse.Namespace])  # a permanent registration, as fnl_fairseq makes
    try:
        with allow_argparse_namespace():
            pass
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        if not before:  # back to exactly what was registered
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(registered)
    with allow_argparse_namespace():
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert (argparse.Namespace in torch.serialization.get_safe_globals()) == before


def test_second_run_gets_its_own_folder(tmp_path):
    """A new run never writes into an earlier run's folder: the earlier results stay as they were."""
    argv = ['--epochs', '1', '--limit-train-batches', '1', '--limit-val-batches', '1', '--workers', '0',
            '--no-tensorboard', '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'exp',
            '--model', 'fnl_test_resnet']
    first = fnl_train.run(argv)
    before = (tmp_path / 'exp' / 'results.json').read_bytes()
    second = fnl_train.run(argv)
    assert (first['experiment'], second['experiment']) == ('exp', 'exp-1')
    assert (tmp_path / 'exp' / 'results.json').read_bytes() == before
    rows = (tmp_path / 'exp-1' / 'summary.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith('epoch'), rows


def test_missing_dataset_is_a_clear_cli_error(tmp_path, capsys):
    code = fnl_train.main(['--dataset', 'cifar10', '--data-dir', str(tmp_path / 'none'), '--output', str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fnl-train: error: data_dir (--data-dir)" in err and "holds no cifar10 data" in err and "--download" in err


def test_every_flag_has_help_and_shows_its_default_once():
    parser = fnl_train.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, f'{action.option_strings} has no help'
    assert '(default: None)' not in text and '(default: False)' not in text
    assert 'peak learning rate (default: 0.1)' in ' '.join(text.split())
    for flag in ('--batch-size', '--epochs', '--lr'):
        assert ' '.join(text.split()).count(f'{flag} {flag.lstrip("-").replace("-", "_").upper()} ') == 1


def test_periodic_log_lines_without_a_terminal(tmp_path, caplog):
    """Output not a terminal (as under pytest), no --no-progress: timm-style lines every --log-interval steps."""
    argv = [a for a in BASE if a != '--no-progress'] + ['--output', str(tmp_path), '--epochs', '1',
                                                       '--limit-train-batches', '5', '--log-interval', '2']
    with caplog.at_level('INFO', logger='fnl_train'):
        fnl_train.run(argv)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train: ')]
    assert [line.split(']')[0] for line in lines] == ['Train: 0 [2/5 ( 40%)', 'Train: 0 [4/5 ( 80%)',
                                                      'Train: 0 [5/5 (100%)']
    assert all(' loss ' in line and ' lr 0.05' in line for line in lines), lines
