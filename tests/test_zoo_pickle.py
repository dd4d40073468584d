"""Every registered fnl_* model survives ``torch.save`` / ``torch.load`` of the whole module and
``copy.deepcopy``, with equal outputs (``fnl-compress --finalize factorized`` writes whole modules).

The layers keep their init functions (``reset_parameters`` uses them again), so a lambda or local
function passed as ``init`` made the model unpicklable; the zoo passes module-level functions.
"""
import copy
import io

import pytest
import torch
import timm

import fnl
import fnl_timm  # noqa: F401  (registers the fnl_* models)
from fnl_timm.models._factorize import kaiming_fan_out_, kaiming_linear_fan_in_
from fnl_timm.models.fnl_wide_resnet import WideResNet

# 'fnl' factorizes any timm model (base=...); 'fnl_*' are the paper's models
ZOO = sorted(m for m in timm.list_models('fnl*') if m == 'fnl' or m.startswith('fnl_'))

# WRN-28-10 is 36M parameters dense: the generic variants build it 2 wide (the same code path);
# 'fnl' needs a base model: timm's tiny test models
NARROW = {'fnl_wrn28_10': dict(width=2), 'fnl': dict(base='test_resnet')}
# the factorized variant every model gets, plus extra variants
VARIANTS = [(name, dict(rank_scale=0.25, **NARROW.get(name, {}))) for name in ZOO] + [
    ('fnl_test_resnet', dict()),  # dense
    ('fnl_test_resnet', dict(rank_scale=0.5, spectral=True)),
    ('fnl_test_resnet', dict(rank_scale=1.0, square=True)),
    ('fnl_test_resnet', dict(target_ratio=0.3)),
    ('fnl_vgg19', dict(target_ratio=0.05)),
    ('fnl_wrn28_10', dict(conv='tt', rank_scale=0.234)),  # the full-size model of the issue
    ('fnl_wrn28_10', dict(conv='tucker', rank_scale=0.211, width=2)),
    ('fnl', dict(base='test_vit', rank_scale=0.5, spectral=True)),
]


def _input(name: str, model: torch.nn.Module) -> torch.Tensor:
    # VGG-19 pools 5 times: 32x32; the CIFAR ResNets are fully convolutional: 8x8 keeps them fast;
    # a base timm model ('fnl') at its own input size
    if name == 'fnl':
        size = model.pretrained_cfg['input_size'][-1]
    else:
        size = 32 if 'vgg' in type(model).__name__.lower() else 8
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    # the project's own freshly made object: whole-module unpickling is what is under test
    return torch.load(buf, weights_only=False)


def test_zoo_is_covered():
    assert {'fnl', 'fnl_resnet20', 'fnl_resnet32_x2', 'fnl_vgg19', 'fnl_wrn28_10', 'fnl_test_resnet'} <= set(ZOO)


@pytest.mark.parametrize('name,kwargs', VARIANTS, ids=[f'{n}-{"-".join(f"{k}={v}" for k, v in kw.items()) or "dense"}'
                                                       for n, kw in VARIANTS])
def test_model_pickles_and_deepcopies(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    if kwargs.get('rank_scale') or kwargs.get('target_ratio'):
        assert fnl.factor_parameter_names(model), 'the variant must actually be factorized'
    x = _input(name, model)
    with torch.no_grad():
        ref = model(x)
        for copied in (_roundtrip(model), copy.deepcopy(model)):
            assert type(copied) is type(model)
            assert copied.rank_scale == model.rank_scale
            out = copied.eval()(x)
            assert torch.equal(out, ref), f'{(out - ref).abs().max()}'
            # the copies are independent: their parameters are new tensors with the same values
            p, q = next(model.parameters()), next(copied.parameters())
            assert p.data_ptr() != q.data_ptr() and torch.equal(p, q)


def test_kept_init_functions_work_after_unpickling():
    """The init functions the layers keep survive the round trip: re-initialising the copy with the
    same seed draws exactly what the original draws (``reset_parameters`` calls them)."""
    model = WideResNet(depth=10, width=2, conv='tt', rank_scale=0.5)  # a small WRN: same build code
    layer = next(m for m in model.modules() if isinstance(m, fnl.TTConv2d))
    assert layer.init is kaiming_fan_out_ and layer.depthwise_init is kaiming_linear_fan_in_
    copied = _roundtrip(layer)
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    copied.reset_parameters()
    for p, q in zip(layer.parameters(), copied.parameters()):
        assert torch.equal(p, q)
