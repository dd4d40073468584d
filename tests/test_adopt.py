"""Checkpoints carry their ranks: fnl models adopt the factor shapes of the state dict they load
(fnl/adopt.py), through ``load_state_dict``, timm's ``load_checkpoint`` and ``create_model(checkpoint_path=)``."""
import argparse
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl_timm import factor_owner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRN_SMALL = dict(depth=10, width=1)  # WRN-10-1: the WRN code path at 16/32/64 channels


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _save(model, path, **extra):
    """A checkpoint as timm's CheckpointSaver (and so fnl-train) writes it."""
    torch.save(dict(epoch=1, arch='x', state_dict=model.state_dict(), version=2, **extra), path)
    return str(path)


def _load_state_dict(name, path, **kwargs):
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(torch.load(path, weights_only=False)['state_dict'])
    return model


def _load_checkpoint(name, path, **kwargs):
    model = timm.create_model(name, **kwargs)
    timm.models.load_checkpoint(model, path)
    return model


def _create_model(name, path, **kwargs):
    return timm.create_model(name, checkpoint_path=path, **kwargs)


ENTRY_POINTS = [_load_state_dict, _load_checkpoint, _create_model]


@pytest.fixture(autouse=True)
def _quiet_rebuild_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*rebuilt at the checkpoint')
        yield


@pytest.mark.parametrize('load, src_kwargs', [
    *[(f, dict(rank_scale=0.25)) for f in ENTRY_POINTS],
    (_create_model, dict(rank_scale=0.25, square=True)),
], ids=['load_state_dict', 'load_checkpoint', 'create_model', 'square'])
def test_factorized_checkpoint_into_default_model(tmp_path, load, src_kwargs):
    torch.manual_seed(0)
    src = timm.create_model('fnl_resnet20', **src_kwargs)
    x = torch.randn(2, 3, 32, 32)
    path = _save(src, tmp_path / 'model_best.pth.tar', args=argparse.Namespace(model='fnl_resnet20'))
    model = load('fnl_resnet20', path)  # default kwargs: a dense model
    assert torch.equal(_out(model, x), _out(src, x))
    conv, src_conv = model.layer3[2].conv2, src.layer3[2].conv2
    assert isinstance(conv, fnl.FactorizedConv2d)
    assert (conv.rank, conv.square) == (src_conv.rank, src_conv.square)
    assert conv.rank == round(src_kwargs['rank_scale'] * 64 * 3)
    assert isinstance(model.conv1, nn.Conv2d) and type(model.fc) is nn.Linear  # stem, classifier stay dense
    # the rebuilt factors are registered for the fd* optimizers
    assert all(factor_owner(p) is conv for p in conv.factor_parameters())
    assert sum(factor_owner(p) is not None for p in model.parameters()) == 18 * (3 if conv.square else 2)


def test_other_rank_and_square_into_factorized_model(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('fnl_resnet20', rank_scale=1.0, square=True)
    model = timm.create_model('fnl_resnet20', rank_scale=0.111)
    old = model.layer2[0].conv1
    model.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_out(model, x), _out(src, x))
    new = model.layer2[0].conv1
    assert new is not old and (new.rank, new.square, tuple(new.S.shape)) == (96, True, (96, 96))
    assert new.init is old.init and new.path == old.path  # settings kept, shapes adopted


def test_dense_checkpoint_into_factorized_model(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('fnl_resnet20')
    path = _save(src, tmp_path / 'dense.pth.tar')
    model = _create_model('fnl_resnet20', path, rank_scale=0.111)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_out(model, x), _out(src, x))
    assert not any(isinstance(m, fnl.FactorizedLayer) for m in model.modules())
    assert fnl.count_parameters(model) == 269_722


@pytest.mark.parametrize('conv', ['tt', 'tucker'])
def test_tensor_format_checkpoint(tmp_path, conv):
    torch.manual_seed(0)
    src = timm.create_model('fnl_wrn28_10', conv=conv, rank_scale=0.5, **WRN_SMALL)
    x = torch.randn(2, 3, 32, 32)
    path = _save(src, tmp_path / f'{conv}.pth.tar')
    for kwargs in ({}, dict(conv=conv, rank_scale=0.25), dict(rank_scale=0.3)):  # dense, other ranks, low rank
        model = _create_model('fnl_wrn28_10', path, **WRN_SMALL, **kwargs)
        assert torch.equal(_out(model, x), _out(src, x)), kwargs
        assert model.channels_last_inputs is False  # adopted tensor-format convs run contiguous, as src
        layer, ref = model.layer3[0].conv2, src.layer3[0].conv2
        assert type(layer) is type(ref) and (layer.ranks, layer.out_modes, layer.in_modes) == \
            (ref.ranks, ref.out_modes, ref.in_modes)
        assert factor_owner(layer.factor_parameters()[0]) is layer


def test_any_timm_model(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('fnl', base='test_resnet', rank_scale=0.25, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    path = _save(src, tmp_path / 'any.pth.tar')
    model = _create_model('fnl', path, base='test_resnet', num_classes=10)
    assert torch.equal(_out(model, x), _out(src, x))
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, fnl.FactorizedLayer)}
    assert ranks and ranks == {n: m.rank for n, m in src.named_modules() if isinstance(m, fnl.FactorizedLayer)}


def _error(fn):
    with pytest.raises(fnl.CheckpointMismatchError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg and 'Missing key' not in msg
    return msg


def test_misfit_names_the_first_layer_and_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    r20 = _save(timm.create_model('fnl_resnet20', rank_scale=0.25), tmp_path / 'r20.pth.tar')
    r32 = _save(timm.create_model('fnl_resnet32', rank_scale=0.25), tmp_path / 'r32.pth.tar')
    msg = _error(lambda: _create_model('fnl_resnet32', r20))
    assert msg.startswith("the checkpoint does not fit this CifarResNet: layer 'layer1.3.conv1': in the model but "
                          "not in the checkpoint"), msg
    msg = _error(lambda: _load_checkpoint('fnl_resnet20', r32))
    assert "layer 'layer1.3.conv1': in the checkpoint but not in the model" in msg, msg
    msg = _error(lambda: _create_model('fnl_resnet20', r20, num_classes=100))
    assert msg == ("the checkpoint does not fit this CifarResNet: layer 'fc': the checkpoint's 'weight' has shape "
                   "(10, 64), this layer needs (100, 64) (this model's dense Linear with in_features=64, "
                   "out_features=100)"), msg
    wide = timm.create_model('fnl_resnet20', widths=(16, 32, 128))
    before = [type(m) for m in wide.modules()]
    msg = _error(lambda: wide.load_state_dict(torch.load(r20, weights_only=False)['state_dict']))
    # the first misfit in the model's order: layer3.0.conv1's 32 -> 128 channels cannot hold 32 -> 64 factors
    assert "layer 'layer3.0.conv1': the checkpoint's 'U' has shape (192, 48), this layer needs (384, 48)" in msg, msg
    assert [type(m) for m in wide.modules()] == before  # nothing rebuilt


def test_unknown_factor_keys_and_tensor_format_on_linear(tmp_path):
    model = timm.create_model('fnl_resnet20')
    state = timm.create_model('fnl_resnet20', rank_scale=0.25).state_dict()
    del state['layer1.0.conv1.V']
    msg = _error(lambda: model.load_state_dict(state))
    assert "layer 'layer1.0.conv1': the checkpoint holds ['U'] for this dense Conv2d" in msg, msg
    state = timm.create_model('fnl_resnet20').state_dict()
    state.pop('fc.weight')
    state.update({'fc.core1': torch.zeros(1, 2, 2, 1), 'fc.core2': torch.zeros(1, 2, 2, 1),
                  'fc.core3': torch.zeros(1, 2, 2, 1)})
    msg = _error(lambda: model.load_state_dict(state))
    assert "layer 'fc': a tt layer with this model's in_features=64, out_features=10 cannot be built" in msg, msg


def test_strict_false_keeps_torchs_rules(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('fnl_resnet32')
    state = timm.create_model('fnl_resnet20', rank_scale=0.25).state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and len(missing) == 60 and missing[0].startswith('layer1.3.')
    assert isinstance(model.layer1[0].conv1, fnl.FactorizedConv2d)  # the layers present were adopted
    state['bn1.weight'] = torch.ones(8)  # another shape is refused with or without strict, as torch does
    msg = _error(lambda: model.load_state_dict(state, strict=False))
    assert "layer 'bn1': the checkpoint's 'bn1.weight' has shape (8,), the model's (16,)" in msg, msg


def test_rebuild_warns_only_when_it_rebuilds():
    state = timm.create_model('fnl_resnet20', rank_scale=0.25).state_dict()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        timm.create_model('fnl_resnet20', rank_scale=0.25).load_state_dict(state)
        assert not [w for w in seen if 'rebuilt' in str(w.message)]
        timm.create_model('fnl_resnet20').load_state_dict(state)
    msgs = [str(w.message) for w in seen if 'rebuilt' in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith('CifarResNet: 18 layer(s) rebuilt') and 'optimizer' in msgs[0]


def test_core_function_on_a_plain_module():
    torch.manual_seed(0)
    src = nn.Sequential(fnl.FactorizedLinear(8, 6, rank=3), nn.ReLU(), fnl.FactorizedEmbedding(5, 4, rank=2))
    dst = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Embedding(5, 4))
    outer = {f'net.{k}': v for k, v in src.state_dict().items()}
    assert fnl.adopt_state_dict_shapes(dst, outer, prefix='net.') == ['0', '2']
    assert (dst[0].rank, dst[2].rank) == (3, 2)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(dst[0](x), src[0](x))
    assert fnl.adopt_state_dict_shapes(dst, src.state_dict()) == []  # already fits


def test_validate_style_script_through_the_runner(tmp_path):
    """timm's validate.py is not installed: a script that loads the model the way it does
    (``timm.create_model(args.model, checkpoint_path=args.checkpoint)``), run by ``python -m fnl_timm.run``."""
    torch.manual_seed(0)
    src = timm.create_model('fnl_resnet20', rank_scale=0.25, square=True)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    ckpt = _save(src, tmp_path / 'model_best.pth.tar', args=argparse.Namespace(model='fnl_resnet20'))
    script = tmp_path / 'validate.py'
    script.write_text(
        'import argparse, timm, torch\n'
        'p = argparse.ArgumentParser()\n'
        "p.add_argument('--model'); p.add_argument('--checkpoint'); p.add_argument('--out')\n"
        'args = p.parse_args()\n'
        'model = timm.create_model(args.model, checkpoint_path=args.checkpoint).eval()\n'
        "x = torch.load(args.out + '/x.pt')\n"
        'with torch.no_grad():\n'
        "    torch.save(model(x), args.out + '/y.pt')\n")
    proc = subprocess.run([sys.executable, '-m', 'fnl_timm.run', str(script), '--model', 'fnl_resnet20',
                           '--checkpoint', ckpt, '--out', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / 'y.pt'), _out(src, x))
