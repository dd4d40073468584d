"""``fnl-train --initial-checkpoint``: the file is read weights-only, must fit the model exactly, and
DDP's ``module.`` prefix is stripped, for a plain state dict and for timm's checkpoint layout.

Each test fails for one of the bugs that would let a run start from other weights than the file's, or
run code from the file: a ``weights_only=False`` read, ``load_state_dict(strict=False)``, or the
``module.`` prefix of a checkpoint written under DistributedDataParallel kept.
"""
import argparse
import glob
import os
import pathlib

import pytest
import torch

timm = pytest.importorskip('timm')
import fnl_timm  # noqa: E402,F401
from fnl._serialization import UntrustedPickleError  # noqa: E402
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm.train_args import _initial_checkpoint  # noqa: E402

ARCH = 'fnl_test_resnet'


def _source_state():
    """A model's weights, all different from a fresh model's (random, seeded), BN statistics included."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10)
    g = torch.Generator().manual_seed(1)
    return {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v + 3)
            for k, v in model.state_dict().items()}


def _create(path):
    args = argparse.Namespace(model=ARCH, initial_checkpoint=str(path))
    return fnl_train._create_model(args, {'num_classes': 10}, None)


def _ddp(state):
    return {'module.' + k: v for k, v in state.items()}


LAYOUTS = {
    'state_dict': lambda s: s,
    'state_dict_ddp': _ddp,
    # timm's CheckpointSaver (fnl-train's last.pth.tar): the weights under 'state_dict', the run's args
    'timm_checkpoint': lambda s: {'epoch': 3, 'arch': ARCH, 'state_dict': s, 'args': argparse.Namespace(lr=0.1)},
    'timm_checkpoint_ddp': lambda s: {'epoch': 3, 'arch': ARCH, 'state_dict': _ddp(s),
                                      'args': argparse.Namespace(lr=0.1)},
}


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_the_model_starts_from_the_files_weights(layout, tmp_path):
    source = _source_state()
    path = tmp_path / 'init.pth'
    torch.save(LAYOUTS[layout](source), path)
    state = _create(path).state_dict()
    assert state.keys() == source.keys()
    differ = [k for k in source if not torch.equal(state[k], source[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize('change', ['missing', 'unexpected', 'missing_ddp'])
def test_a_file_that_does_not_fit_exactly_is_refused(change, tmp_path):
    source = _source_state()
    if change == 'missing':  # one BatchNorm statistic left out: strict=False would keep the fresh one
        del source[next(k for k in source if k.endswith('running_var'))]
    elif change == 'unexpected':
        source['head.extra.weight'] = torch.ones(3)
    else:
        source = _ddp({k: v for k, v in source.items() if not k.endswith('running_var')})
    path = tmp_path / 'init.pth'
    torch.save({'state_dict': source}, path)
    with pytest.raises(ValueError, match=rf"^--initial-checkpoint '{path}' does not fit --model '{ARCH}'"):
        _create(path)


class _Payload:
    """Unpickling it creates ``marker`` (what ``os.system`` would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_file_with_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / 'MARKER'
    path = tmp_path / 'init.pth'
    torch.save({'state_dict': _source_state(), 'extra': _Payload(marker)}, path)
    for read in (_initial_checkpoint, _create):
        with pytest.raises(UntrustedPickleError, match=r"--initial-checkpoint .* is refused"):
            read(path)
    assert not marker.exists(), 'the file ran code'
    # the control: the full unpickler does run it, so the check above can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_fnl_train_runs_from_a_ddp_checkpoint(tmp_path):
    """Through fnl-train itself: lr 0 for one step, the saved weights are the file's (BatchNorm statistics,
    which a training step updates, aside)."""
    source = _source_state()
    path = tmp_path / 'init.pth'
    torch.save(LAYOUTS['timm_checkpoint_ddp'](source), path)
    code = fnl_train.main(['--model', ARCH, '--initial-checkpoint', str(path), '--img-size', '16', '--batch-size', '32',
                           '--workers', '0', '--epochs', '1', '--limit-train-batches', '1', '--limit-val-batches', '1',
                           '--lr', '0', '--weight-decay', '0', '--momentum', '0', '--no-progress', '--no-tensorboard',
                           '--output', str(tmp_path / 'runs')])
    assert code in (0, None)
    saved, = glob.glob(os.path.join(tmp_path, 'runs', '*', 'last.pth.tar'))
    state = torch.load(saved, map_location='cpu', weights_only=False)['state_dict']
    weights = [k for k in source if not k.split('.')[-1].startswith(('running_', 'num_batches'))]
    assert len(weights) > 10
    differ = [k for k in weights if not torch.equal(state[k], source[k])]
    assert not differ, differ[:5]
