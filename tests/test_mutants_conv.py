"""Tests written to kill surviving mutants of fnl/conv.py (tests/README.md): the exact repr a user
reads, the exact message of every argument check (naming the argument and what is allowed), the
geometry stored as pairs, and the initialisation. The function computed, the path rule, the counts and
the conversions are in test_mutants_conv_compute.py, which shares the helpers below."""
import math
import re

import pytest

import fnl

REPRS = [
    ({}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2)'),
    ({'padding': 1}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, padding=(1, 1))'),
    ({'dilation': 2}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, dilation=(2, 2))'),
    ({'bias': False}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, bias=False)'),
    ({'path': 'dense'}, "FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, path='dense')"),
    ({'padding': (1, 2), 'dilation': (2, 1), 'bias': False, 'path': 'dense'},
     "FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, padding=(1, 2), dilation=(2, 1), "
     "bias=False, path='dense')"),
]


@pytest.mark.parametrize('kwargs,expected', REPRS, ids=[str(k) for k, _ in REPRS])
def test_repr_shows_exactly_the_non_default_settings(kwargs, expected):
    assert repr(fnl.FactorizedConv2d(4, 6, 3, rank=2, **kwargs)) == expected


ERRORS = [
    ({'in_channels': 0}, 'in_channels must be an int >= 1, got 0'),
    ({'out_channels': 0}, 'out_channels must be an int >= 1, got 0'),
    ({'kernel_size': 0}, 'kernel_size must be >= 1, got (0, 0)'),
    ({'stride': 0}, 'stride must be >= 1, got (0, 0)'),
    ({'dilation': 0}, 'dilation must be >= 1, got (0, 0)'),
    ({'padding': -1}, 'padding must be >= 0, got (-1, -1)'),
    ({'groups': 2}, 'groups must be 1 for FactorizedConv2d (grouped kernels are not factorized), got 2'),
    ({'padding_mode': 'reflect'}, "padding_mode must be 'zeros' for FactorizedConv2d, got 'reflect'"),
    ({'path': 'x'}, "path must be one of ('auto', 'factored', 'dense'), got 'x'"),
    ({'padding': 'same', 'stride': 2}, "padding='same' needs stride 1, got stride=(2, 2)"),
    ({'padding': 'same', 'kernel_size': 2},
     "padding='same' is supported only where it is symmetric (dilation*(kernel_size-1) even); "
     "got kernel_size=(2, 2), dilation=(1, 1)"),
    ({'padding': 'full'}, "padding must be an int, a pair, 'valid' or 'same', got 'full'"),
]


def test_valid_and_same_padding_resolve_to_pairs():
    assert fnl.FactorizedConv2d(4, 6, 3, rank=2, padding='valid').padding == (0, 0)
    assert fnl.FactorizedConv2d(4, 6, (3, 5), rank=2, padding='same').padding == (1, 2)
    assert fnl.FactorizedConv2d(4, 6, 3, rank=2, padding='same', dilation=(1, 2)).padding == (1, 2)


# --- shared helpers ---------------------------------------------------------------------------------
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


CL = torch.channels_last
# every pair asymmetric, every size different, so a swapped index or a dropped argument shows
GEOMETRY = dict(in_channels=3, out_channels=5, kernel_size=(3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1))


def _layer(rank=2, square=True, bias=True, path='factored', seed=0, **geometry):
    geo = dict(GEOMETRY, **geometry)
    layer = fnl.FactorizedConv2d(**geo, bias=bias, rank=rank, square=square, path=path, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():  # S random too: an identity S hides a dropped or transposed S
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


def _kernel(layer):
    """The dense kernel K[o, i, h, w] = M[(o, h), (i, w)], M = U S Vᵀ, written out with indices."""
    u = layer.U if layer.S is None else layer.U @ layer.S
    m = u @ layer.V.T
    (kh, kw), cout, cin = layer.kernel_size, layer.out_channels, layer.in_channels
    k = torch.empty(cout, cin, kh, kw, dtype=m.dtype)
    for o in range(cout):
        for i in range(cin):
            for h in range(kh):
                for w in range(kw):
                    k[o, i, h, w] = m[o * kh + h, i * kw + w]
    return k


def _reference(layer, x):
    return F.conv2d(x, _kernel(layer), layer.bias, layer.stride, layer.padding, layer.dilation)


def _x(shape=(2, 3, 11, 13), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- argument forms -------------------------------------------------------------------------------
TYPE_ERRORS = [
    ({'kernel_size': (3, 3, 3)}, 'kernel_size must be an int or a pair of ints, got (3, 3, 3)'),
    ({'kernel_size': [3]}, 'kernel_size must be an int or a pair of ints, got [3]'),
    ({'kernel_size': 2.0}, 'kernel_size must be an int or a pair of ints, got 2.0'),
    ({'kernel_size': True}, 'kernel_size must be an int or a pair of ints, got True'),
    ({'kernel_size': (3, True)}, 'kernel_size must be an int or a pair of ints, got (3, True)'),
    ({'kernel_size': (3, 2.0)}, 'kernel_size must be an int or a pair of ints, got (3, 2.0)'),
    ({'kernel_size': '33'}, "kernel_size must be an int or a pair of ints, got '33'"),
    ({'stride': (1, 1, 1)}, 'stride must be an int or a pair of ints, got (1, 1, 1)'),
    ({'dilation': 1.5}, 'dilation must be an int or a pair of ints, got 1.5'),
    ({'padding': (1, None)}, 'padding must be an int or a pair of ints, got (1, None)'),
    ({'in_channels': 2.0}, 'in_channels must be an int >= 1, got float 2.0'),
    ({'out_channels': True}, 'out_channels must be an int >= 1, got bool True'),
]


VALUE_ERRORS = [  # one bad entry of a pair (either one), a list shown as a tuple
    ({'kernel_size': (3, 0)}, 'kernel_size must be >= 1, got (3, 0)'),
    ({'stride': [1, 0]}, 'stride must be >= 1, got (1, 0)'),
    ({'stride': (0, 2)}, 'stride must be >= 1, got (0, 2)'),
    ({'dilation': (2, 0)}, 'dilation must be >= 1, got (2, 0)'),
    ({'padding': (2, -1)}, 'padding must be >= 0, got (2, -1)'),
    ({'padding': 'same', 'stride': (1, 2)}, "padding='same' needs stride 1, got stride=(1, 2)"),
    ({'padding': 'same', 'stride': (2, 1)}, "padding='same' needs stride 1, got stride=(2, 1)"),
    ({'padding': 'same', 'kernel_size': (3, 2)},
     "padding='same' is supported only where it is symmetric (dilation*(kernel_size-1) even); "
     "got kernel_size=(3, 2), dilation=(1, 1)"),
    ({'padding': 'same', 'kernel_size': (2, 3), 'dilation': (1, 2)},
     "padding='same' is supported only where it is symmetric (dilation*(kernel_size-1) even); "
     "got kernel_size=(2, 3), dilation=(1, 2)"),
    ({'padding': 'SAME'}, "padding must be an int, a pair, 'valid' or 'same', got 'SAME'"),
    ({'groups': 0}, 'groups must be 1 for FactorizedConv2d (grouped kernels are not factorized), got 0'),
    ({'padding_mode': 'circular'}, "padding_mode must be 'zeros' for FactorizedConv2d, got 'circular'"),
    ({'path': 'Dense'}, "path must be one of ('auto', 'factored', 'dense'), got 'Dense'"),
]


ALL_ERRORS = ([(ValueError, k, m) for k, m in ERRORS + VALUE_ERRORS]
              + [(TypeError, k, m) for k, m in TYPE_ERRORS])


@pytest.mark.parametrize('error,kwargs,message', ALL_ERRORS, ids=[f'{e.__name__}-{k}' for e, k, _ in ALL_ERRORS])
def test_argument_errors_name_the_argument_exactly(error, kwargs, message):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(error, match=f'^{re.escape(message)}$'):
        fnl.FactorizedConv2d(**args)


@pytest.mark.parametrize('kwargs,expected', [
    (dict(kernel_size=[3, 2], stride=[2, 1], padding=[0, 1], dilation=[1, 3]), ((3, 2), (2, 1), (0, 1), (1, 3))),
    (dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1))),
    (dict(kernel_size=4, stride=3, padding=2, dilation=2), ((4, 4), (3, 3), (2, 2), (2, 2))),
    (dict(kernel_size=(2, 3), padding='same', dilation=(2, 1)), ((2, 3), (1, 1), (1, 1), (2, 1))),
    (dict(kernel_size=(5, 3), padding='same', dilation=(1, 3)), ((5, 3), (1, 1), (2, 3), (1, 3))),
    (dict(kernel_size=(5, 3), stride=(2, 3), padding='valid'), ((5, 3), (2, 3), (0, 0), (1, 1))),
])
def test_geometry_is_stored_as_pairs_of_ints(kwargs, expected):
    layer = fnl.FactorizedConv2d(4, 6, rank=2, **kwargs)
    got = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    assert got == expected
    assert all(type(p) is tuple and all(type(v) is int for v in p) for p in got)
    assert (layer.groups, layer.padding_mode, layer.path) == (1, 'zeros', 'auto')
    assert (layer.in_channels, layer.out_channels) == (4, 6)


def test_tensor_convs_refuse_string_padding_and_groups_with_their_own_name():
    with pytest.raises(ValueError, match=re.escape("padding must be an int or a pair of ints for TTConv2d, got 'same'")):
        fnl.TTConv2d(4, 4, 3, padding='same', rank_scale=0.5)
    with pytest.raises(ValueError, match=re.escape("padding must be an int or a pair of ints for TuckerConv2d, "
                                                   "got 'valid'")):
        fnl.TuckerConv2d(4, 4, 3, padding='valid', rank_scale=0.5)
    with pytest.raises(ValueError, match=f"^{re.escape('groups must be 1 for TTConv2d, got 2')}$"):
        fnl.TTConv2d(4, 4, 3, groups=2, rank_scale=0.5)
    layer = fnl.TTConv2d(4, 4, 3, padding=1, rank_scale=0.5, path='dense')
    assert (layer.groups, layer.padding_mode, layer.path, layer.padding) == (1, 'zeros', 'dense', (1, 1))


def test_repr_of_a_square_layer_with_a_stride():
    assert (repr(fnl.FactorizedConv2d(4, 6, (3, 1), (2, 1), rank=2, square=True))
            == 'FactorizedConv2d(4, 6, kernel_size=(3, 1), stride=(2, 1), rank=2, square=True)')


# --- initialisation -------------------------------------------------------------------------------
def test_init_functions_see_the_factor_matrices_or_the_dense_kernel():
    seen = []

    def init(t):
        seen.append(tuple(t.shape))
        torch.nn.init.constant_(t, 0.5)
    layer = fnl.FactorizedConv2d(3, 5, (3, 2), rank=4, square=True, init=init)
    assert seen == [(4, 6), (15, 4)]  # Vᵀ (r x in*kw), then U (out*kh x r)
    assert torch.equal(layer.U, torch.full((15, 4), 0.5)) and torch.equal(layer.V, torch.full((6, 4), 0.5))
    assert torch.equal(layer.S, torch.eye(4))
    seen.clear()
    fnl.FactorizedConv2d(3, 5, (3, 2), rank=4, spectral=True, init=init)
    assert seen == [(5, 3, 3, 2)]


def test_torch_default_init_bounds_use_each_factor_fan_in():
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(40, 30, (2, 5), rank=60)
    # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in); Vᵀ fan-in in*kw = 200, U fan-in r = 60
    for p, bound in ((layer.V, 1 / math.sqrt(200)), (layer.U, 1 / math.sqrt(60))):
        assert p.abs().max() <= bound and p.abs().max() > 0.97 * bound
    # the bias as nn.Conv2d's: bound 1/sqrt(in*kh*kw) = 1/20
    assert layer._dense_fan_in() == 400 and type(layer._dense_fan_in()) is int
    assert layer.bias.abs().max() <= 1 / 20 and layer.bias.abs().max() > 0.8 / 20
    spectral = fnl.FactorizedConv2d(40, 30, (2, 5), rank_scale=1.0, spectral=True)
    w = spectral.dense_weight()  # the full-rank product is a kaiming_uniform(a=sqrt(5)) dense kernel
    assert w.abs().max() <= 1 / 20 + 1e-6 and w.abs().max() > 0.97 / 20


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit.trace is deprecated, still supported
@pytest.mark.parametrize('grad', [False, True])
def test_a_trace_reads_the_parameters_not_cached_weights(grad):
    """A trace made without autograd (eager inference caches weights) must still read the factors."""
    layer = _layer(rank=3, square=True)
    x = _x()
    with torch.set_grad_enabled(grad):
        layer(x)  # fill the inference cache first (without autograd)
        traced = torch.jit.trace(layer, (x,), check_trace=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(-2)
        _close(traced(x), _reference(layer, x))
