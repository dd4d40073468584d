"""Tests written to kill surviving mutants of fnl/conv.py (tests/README.md): the function computed (forward,
gradients, the factored weights and their memory format, the inference cache) against the closed-form
kernel on an asymmetric geometry, the path rule, the counts and the conversions."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl
import fnl.conv as conv_module
from test_mutants_conv import CL, _close, _kernel, _layer, _reference, _x

# --- the function computed ------------------------------------------------------------------------
@pytest.mark.parametrize('path', ['factored', 'dense'])
@pytest.mark.parametrize('square,bias', [(True, True), (False, False)])
def test_forward_is_the_conv_with_the_closed_form_kernel(path, square, bias):
    layer = _layer(rank=3, square=square, bias=bias, path=path)
    _close(layer.dense_weight(), _kernel(layer))
    x = _x()
    out = layer(x)
    assert out.shape == (2, 5, 5, 6)  # (11 + 2 - 2*2 - 1) // 2 + 1, (13 + 4 - 1 - 1) // 3 + 1
    _close(out, _reference(layer, x))
    # gradients of every parameter and of the input, against autograd through the closed form
    g = _x(out.shape, seed=2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grads = torch.autograd.grad((layer(xa) * g).sum(), [xa, *layer.parameters()])
    ref = torch.autograd.grad((_reference(layer, xb) * g).sum(), [xb, *layer.parameters()])
    assert len(grads) == len(ref) == 3 + square + bias
    for a, b in zip(grads, ref):
        _close(a, b)
    with torch.no_grad():  # eager inference (cached factored weights) computes the same
        _close(layer(x), out.detach())
        _close(layer(x), out.detach())


@pytest.mark.parametrize('geometry', [dict(), dict(kernel_size=(1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2)),
                                      dict(kernel_size=(2, 1), stride=1, padding=(1, 0), dilation=(3, 1))])
def test_forward_with_other_geometries(geometry):
    for path in ('factored', 'dense'):
        layer = _layer(rank=2, path=path, **geometry)
        x = _x((1, 3, 7, 8))
        _close(layer(x), _reference(layer, x))
        _close(layer(x[0]), _reference(layer, x)[0])  # an unbatched (C, H, W) input


def test_matrix_layout_round_trips_a_dense_kernel():
    layer = _layer(rank=6, square=False)  # full rank: min(5*3, 3*2) = 6
    k = _x((5, 3, 3, 2), seed=3)
    m = layer._matrix_from_weight(k)
    assert m.shape == (15, 6)
    for o, i, h, w in [(0, 0, 0, 0), (4, 2, 2, 1), (1, 2, 0, 1), (3, 0, 2, 0), (2, 1, 1, 1)]:
        assert m[o * 3 + h, i * 2 + w] == k[o, i, h, w]
    assert torch.equal(layer._weight_from_matrix(m), k)
    layer.set_from_weight_(k)
    _close(layer.dense_weight(), k)
    _close(_kernel(layer), k)
    assert tuple(layer._dense_weight_shape()) == (5, 3, 3, 2)
    with pytest.raises(ValueError, match=re.escape('weight must have shape (5, 3, 3, 2), got (5, 3, 2, 3)')):
        layer.set_from_weight_(k.transpose(2, 3))


# --- factored weights, channels-last inputs and the inference cache -----------------------------
@pytest.mark.parametrize('square', [False, True])
def test_factor_conv_weights_layout_and_memory_format(square):
    layer = _layer(rank=4, square=square)
    k = _kernel(layer)
    for channels_last in (False, True):
        w_a, w_b = layer._factor_conv_weights(channels_last)
        assert w_a.shape == (4, 3, 1, 2) and w_b.shape == (5, 4, 3, 1)
        assert w_a.dtype == w_b.dtype == torch.float64
        # the two convs compose to the kernel: K[o, i, h, w] = sum_r w_b[o, r, h] w_a[r, i, w]
        _close(torch.einsum('orh,riw->oihw', w_b[..., 0], w_a[:, :, 0]), k)
        fmt = CL if channels_last else torch.contiguous_format
        assert w_a.is_contiguous(memory_format=fmt) and w_b.is_contiguous(memory_format=fmt)
        if not channels_last:
            assert w_a.stride() == (6, 2, 2, 1) and w_b.stride() == (12, 3, 1, 1)
        else:
            assert w_a.stride() == (6, 1, 6, 3) and w_b.stride()[:3] == (12, 1, 4)
            # U's (out*kh, r) rows are the channels-last second weight: a view of U without S
            assert (w_b.data_ptr() == layer.U.data_ptr()) is not square
    # the default (TorchScript's forward and inference_form call it so) is the NCHW layout
    w_a, w_b = layer._factor_conv_weights()
    assert w_a.stride() == (6, 2, 2, 1) and w_b.stride() == (12, 3, 1, 1)


def _spy_convs(monkeypatch):
    seen = []
    real = conv_module.F.conv2d

    def spy(inp, weight, *args):
        seen.append((inp.is_contiguous(memory_format=CL) and not inp.is_contiguous(),
                     weight.is_contiguous(memory_format=CL) and not weight.is_contiguous(), weight))
        return real(inp, weight, *args)
    monkeypatch.setattr(conv_module.F, 'conv2d', spy)
    return seen


def test_channels_last_input_gets_channels_last_weights_and_the_same_output(monkeypatch):
    layer = _layer(rank=3, square=True, kernel_size=(3, 2))
    x = _x((2, 3, 9, 10))
    xc = x.contiguous(memory_format=CL)
    ref = _reference(layer, x)
    seen = _spy_convs(monkeypatch)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            del seen[:]
            _close(layer(x), ref)
            _close(layer(xc), ref)
            _close(layer(x), ref)
            # weight formats: NCHW, NCHW | channels-last, channels-last | NCHW, NCHW (the cache follows the input)
            assert [s[1] for s in seen] == [False, False, True, True, False, False], grad
    # not channels-last: a 3-d input, a transposed (non-contiguous, not channels-last) input, inputs
    # contiguous in both formats (1 x 1 spatial, one channel): plain (NCHW-contiguous) weights
    one = _layer(rank=2, kernel_size=(1, 1), stride=1, padding=0, dilation=1)
    mono = _layer(rank=2, in_channels=1)
    for layer, inp in ((one, _x((3, 5, 6))), (one, _x((2, 3, 6, 5)).transpose(2, 3)), (one, _x((2, 3, 1, 1))),
                       (mono, _x((2, 1, 9, 10)))):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                ref = _reference(layer, inp)
                del seen[:]
                _close(layer(inp), ref)
                assert len(seen) == 2 and all(s[2].is_contiguous() for s in seen)


def test_inference_cache_reuses_weights_until_a_factor_changes(monkeypatch):
    layer = _layer(rank=3, square=True)
    x = _x()
    calls = []
    real = layer._factor_conv_weights

    def counting(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(layer, '_factor_conv_weights', counting)
    with torch.no_grad():
        first = layer(x)
        assert len(calls) == 1
        _close(layer(x), first)
        assert len(calls) == 1  # reused
        assert layer(x.contiguous(memory_format=CL)).shape == first.shape and len(calls) == 2
        for name in ('U', 'S', 'V'):  # an in-place update of any factor (an optimizer step)
            getattr(layer, name).mul_(1.5)
            _close(layer(x), _reference(layer, x))
        assert len(calls) == 5
        state = {k: v * 2 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        _close(layer(x), _reference(layer, x))
        assert len(calls) == 6
        layer.V = nn.Parameter(layer.V * -1)  # a replaced factor
        _close(layer(x), _reference(layer, x))
        assert len(calls) == 7
        # factors replaced by tensors with the same version count (a twin layer's), or given new data
        twin = _layer(rank=3, square=True, seed=5)
        twin.V = nn.Parameter(twin.V * -1)
        twin.load_state_dict(state)
        for name in ('U', 'S', 'V'):
            setattr(layer, name, getattr(twin, name))
            _close(layer(x), _reference(layer, x))
        layer.U.data = layer.U.data * 3
        _close(layer(x), _reference(layer, x))
        layer.S = nn.Parameter(layer.S.detach().T)  # same storage, address and version: a new tensor
        _close(layer(x), _reference(layer, x))
        assert len(calls) == 12
        layer.bias.mul_(3)  # the bias is not in the cached weights: read on each call
        _close(layer(x), _reference(layer, x))
        assert len(calls) == 12
    # training: no cache, the weights are built from the parameters and carry their gradients
    out = layer(x)
    assert len(calls) == 13 and out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    calls.clear()
    with torch.no_grad():
        layer.float()  # a dtype change (new tensors) rebuilds too
        y = layer(x.float())
    assert len(calls) == 1 and y.dtype == torch.float32
    _close(y, _reference(layer, x.float()), 1e-4)


# --- path choice and counts -----------------------------------------------------------------------
def test_auto_path_rule_and_its_boundary():
    # factored MACs per output pixel r*(in*kw*sh + out*kh) against dense out*in*kh*kw; a tie takes the dense path
    cases = []
    for cin, cout, (kh, kw), (sh, sw) in [(4, 4, (3, 3), (1, 1)), (4, 4, (3, 3), (2, 1)), (4, 4, (3, 3), (1, 2)),
                                          (2, 3, (1, 3), (1, 1)), (3, 2, (3, 1), (3, 2)), (5, 2, (2, 3), (2, 3))]:
        for r in range(1, 13):
            layer = fnl.FactorizedConv2d(cin, cout, (kh, kw), (sh, sw), rank=r, bias=False)
            factored = r * (cin * kw * sh + cout * kh)
            assert layer.uses_dense_path == (factored >= cout * cin * kh * kw), (cin, cout, kh, kw, sh, sw, r)
            cases.append(layer.uses_dense_path)
            assert fnl.FactorizedConv2d(cin, cout, (kh, kw), (sh, sw), rank=r, path='dense').uses_dense_path
            assert not fnl.FactorizedConv2d(cin, cout, (kh, kw), (sh, sw), rank=r, path='factored').uses_dense_path
    assert 10 < sum(cases) < len(cases) - 10
    # ties: 6 * (4*3*1 + 4*3) == 144 == 4*4*3*3; 4 * (4*3*2 + 4*3) == 144; 2 * (2*3 + 3) == 18 == 3*2*3
    assert fnl.FactorizedConv2d(4, 4, 3, rank=6).uses_dense_path
    assert not fnl.FactorizedConv2d(4, 4, 3, rank=5).uses_dense_path
    assert fnl.FactorizedConv2d(4, 4, 3, (2, 1), rank=4).uses_dense_path
    assert not fnl.FactorizedConv2d(4, 4, 3, (2, 1), rank=3).uses_dense_path
    assert fnl.FactorizedConv2d(2, 3, (1, 3), rank=2).uses_dense_path


@pytest.mark.parametrize('path', ['factored', 'dense', 'auto'])
def test_macs_closed_form_on_an_asymmetric_geometry(path):
    layer = _layer(rank=3, path=path)
    h_out, w_out = 5, 6  # (11 + 2*1 - 2*2 - 1) // 2 + 1, (13 + 2*2 - 1*1 - 1) // 3 + 1
    assert conv_module.conv_output_hw(layer, (3, 11, 13)) == (h_out, w_out)
    assert conv_module.conv_output_hw(layer, (7, 3, 11, 13)) == (h_out, w_out)
    dense = 5 * 3 * 3 * 2 * h_out * w_out
    factored = 3 * 3 * 2 * 11 * w_out + 5 * 3 * 3 * h_out * w_out  # (1 x kw) conv on all 11 input rows
    assert layer.dense_macs((3, 11, 13)) == dense
    assert layer.macs((3, 11, 13)) == (dense if layer.uses_dense_path else factored)
    assert layer.uses_dense_path == (path == 'dense')  # auto: 3 * (3*2*2 + 5*3) = 81 < 90
    # sizes where the strides do not divide: floor division, ints (12 + 2 - 4 - 1 = 9 rows, stride 2)
    hw = conv_module.conv_output_hw(layer, (3, 12, 14))
    assert hw == (5, 6) and all(type(v) is int for v in hw)
    assert layer.dense_macs((3, 12, 14)) == 5 * 3 * 3 * 2 * 5 * 6
    assert layer.macs((3, 12, 14)) == (5 * 3 * 3 * 2 * 5 * 6 if layer.uses_dense_path
                                       else 3 * 3 * 2 * 12 * 6 + 5 * 3 * 3 * 5 * 6)
    assert all(type(layer.macs(s)) is int for s in ((3, 12, 14), (3, 11, 13)))


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('padding,hw', [('same', (11, 13)), ('valid', (9, 12)), (2, (13, 16)), ((0, 1), (9, 14))])
def test_conv_output_hw_of_plain_convs_with_string_padding(padding, hw):
    conv = nn.Conv2d(2, 2, (3, 2), padding=padding)
    assert conv_module.conv_output_hw(conv, (2, 11, 13)) == hw
    assert tuple(conv(torch.zeros(1, 2, 11, 13)).shape[-2:]) == hw
    dil = nn.Conv2d(2, 2, (3, 3), padding=padding if isinstance(padding, str) else 0, dilation=(2, 1), stride=1)
    assert conv_module.conv_output_hw(dil, (2, 11, 13)) == tuple(dil(torch.zeros(1, 2, 11, 13)).shape[-2:])


# --- conversions ------------------------------------------------------------------------------------
def _assert_geometry(conv, cin, cout, kernel, stride, padding, dilation, bias):
    assert type(conv) is nn.Conv2d
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.padding_mode) == (cin, cout, kernel, stride, padding, dilation, 1, 'zeros')
    assert (conv.bias is not None) == bias


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('geometry,first_geo,second_geo', [
    ({}, ((1, 2), (1, 3), (0, 2), (1, 1)), ((3, 1), (2, 1), (1, 0), (2, 1))),
    (dict(kernel_size=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(1, 3)),
     ((1, 3), (1, 2), (0, 1), (1, 3)), ((2, 1), (1, 1), (2, 0), (1, 1))),
])
def test_inference_form_is_two_exact_plain_convs(bias, training, geometry, first_geo, second_geo):
    layer = _layer(rank=3, square=True, bias=bias, **geometry).train(training)
    plain = layer.inference_form()
    assert type(plain) is nn.Sequential and len(plain) == 2
    first, second = plain
    _assert_geometry(first, 3, 3, *first_geo, False)
    _assert_geometry(second, 3, 5, *second_geo, bias)
    assert all(m.training is training for m in plain.modules())
    w_a, w_b = layer._factor_conv_weights()
    assert torch.equal(first.weight, w_a) and torch.equal(second.weight, w_b)
    assert all(p.dtype == torch.float64 and p.is_contiguous() and not p.grad_fn for p in plain.parameters())
    if bias:
        assert torch.equal(second.bias, layer.bias)
    x = _x()
    ref = _reference(layer, x).detach()
    _close(plain(x), ref)
    with torch.no_grad():  # copies, not views of the layer's parameters
        for p in layer.parameters():
            p.mul_(2)
    _close(plain(x), ref)


@pytest.mark.parametrize('training', [True, False])
def test_inference_form_and_to_dense_on_the_dense_path(training):
    layer = _layer(rank=5, square=True, path='dense').train(training)
    for conv in (layer.to_dense(), layer.inference_form()):
        _assert_geometry(conv, 3, 5, (3, 2), (2, 3), (1, 2), (2, 1), True)
        assert conv.weight.dtype == torch.float64
        _close(conv.weight, _kernel(layer))
        assert torch.equal(conv.bias, layer.bias)
        x = _x()
        _close(conv(x), _reference(layer, x))
    assert layer.inference_form().training is training
    no_bias = _layer(rank=2, square=False, bias=False)
    _assert_geometry(no_bias.to_dense(), 3, 5, (3, 2), (2, 3), (1, 2), (2, 1), False)


@pytest.mark.parametrize('path', ['factored', 'dense'])
def test_conversions_keep_the_device(path):
    layer = fnl.FactorizedConv2d(3, 5, (3, 2), rank=2, square=True, path=path, device='meta')
    assert layer.U.device.type == 'meta'
    for module in (layer.inference_form(), layer.to_dense()):
        assert {p.device.type for p in module.parameters()} == {'meta'}
    # and the other way round: CPU layers converted while the default device is 'meta' stay on the CPU
    dense = nn.Conv2d(3, 5, (3, 2), (2, 3), (1, 2), (2, 1), dtype=torch.float64)
    x = _x()
    with torch.device('meta'):
        new = fnl.FactorizedConv2d.from_dense(dense, rank=6, square=True, path=path)
        modules = [new, new.to_dense(), new.inference_form()]
    for module in modules:
        assert {p.device.type for p in module.parameters()} == {'cpu'}
        _close(module(x), dense(x))


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('square', [True, False])
def test_from_dense_keeps_geometry_weights_bias_dtype_and_options(bias, square):
    g = torch.Generator().manual_seed(4)
    dense = nn.Conv2d(3, 5, (3, 2), (2, 3), (1, 2), (2, 1), bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    layer = fnl.FactorizedConv2d.from_dense(dense, rank=6, square=square, path='dense')
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation) == (3, 5, (3, 2), (2, 3), (1, 2), (2, 1))
    assert (layer.rank, layer.square, layer.path, layer.spectral) == (6, square, 'dense', False)
    assert (layer.S is not None) == square and layer.U.dtype == torch.float64
    _close(layer.dense_weight(), dense.weight)
    if bias:
        assert torch.equal(layer.bias, dense.bias) and layer.bias.data_ptr() != dense.bias.data_ptr()
    else:
        assert layer.bias is None
    x = _x()
    _close(layer(x), dense(x))
    low = fnl.FactorizedConv2d.from_dense(dense, rank_scale=0.2)  # round(0.2 * 5 * 3) = 3
    assert (low.rank, low.path, low.square) == (3, 'auto', False)
    same = fnl.FactorizedConv2d.from_dense(nn.Conv2d(3, 5, (3, 5), padding='same'), rank=2)
    assert same.padding == (1, 2)


def test_from_dense_refuses_what_it_cannot_factorize_by_name():
    with pytest.raises(TypeError, match='^layer must be an nn.Conv2d, got Linear$'):
        fnl.FactorizedConv2d.from_dense(nn.Linear(2, 2), rank=1)
    with pytest.raises(ValueError, match='^layer.groups must be 1 for FactorizedConv2d, got 2$'):
        fnl.FactorizedConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), rank=1)
    with pytest.raises(ValueError, match="^layer.padding_mode must be 'zeros' for FactorizedConv2d, got 'reflect'$"):
        fnl.FactorizedConv2d.from_dense(nn.Conv2d(4, 4, 3, padding_mode='reflect'), rank=1)
