"""How FactorizedConv2d lays out its two convs (docs/speed.md) changes no number: weights with canonical
strides, strided convs one pixel wide run as a subsample and a stride-1 conv, and the rank channels
zero-padded to a multiple of 8 on CUDA in 16-bit (``rank_align``). Each is checked against the dense conv with the
rebuilt kernel, outputs and the factors' gradients, in both memory formats."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl
from fnl import conv as fnl_conv
from fnl.conv import _laid_out
from fnl.conv_bn import conv_bn

pytestmark = pytest.mark.usefixtures('one_thread')

CL = torch.channels_last


def _reference(layer: fnl.FactorizedConv2d, x: torch.Tensor, g: torch.Tensor):
    """Output and factor gradients through the dense kernel, in float64 and contiguous."""
    ref = fnl.FactorizedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                               layer.dilation, 1, layer.bias is not None, rank=layer.rank,
                               square=layer.S is not None, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    xr = x.detach().double().contiguous()
    y = F.conv2d(xr, ref.dense_weight(), ref.bias, ref.stride, ref.padding, ref.dilation)
    y.backward(g.double())
    return y.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _check(layer: fnl.FactorizedConv2d, x: torch.Tensor, tol: float) -> None:
    x = x.detach().requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    want, grads = _reference(layer, x, g)
    layer.zero_grad(set_to_none=True)
    y.backward(g)
    scale = want.abs().max().item()
    assert (y.double() - want).abs().max().item() <= tol * scale
    for n, p in layer.named_parameters():
        ref = grads[n]
        err = (p.grad.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= tol, f'{n}: relative error {err:.2e}'


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('kernel_size,stride', [(1, 2), (1, (2, 1)), (1, (1, 2)), ((1, 3), 2), ((3, 1), 2)])
@pytest.mark.parametrize('in_channels,rank', [(16, 5), (3, 2), (6, 7)])
def test_strided_unit_width_convs_match_the_dense_conv(kernel_size, stride, in_channels, rank, channels_last):
    """A stride over a 1-wide kernel axis (1x1 shortcuts, 1xk / kx1 kernels): the CPU conv backward once
    gave the weight gradient of such a conv on a channels-last input with 2-7 channels wrong."""
    torch.manual_seed(0)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    layer = fnl.FactorizedConv2d(in_channels, 16, kernel_size, stride, (kh // 2, kw // 2), rank=rank, bias=True,
                                 path='factored')
    x = torch.randn(32, in_channels, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    for _ in range(2):  # the wrong gradients were also different from one call to the next
        _check(layer, x, 1e-5)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(16, 5, 1, 1), (5, 16, 1, 3), (16, 5, 3, 1), (4, 3, 2, 5)])
def test_laid_out_gives_canonical_strides(shape, channels_last):
    fmt = CL if channels_last else torch.contiguous_format
    want = torch.empty(shape, memory_format=fmt).stride()
    n, c, h, w = shape
    # a view that torch counts as contiguous (and channels-last) whatever its size-1 dims' strides
    odd = torch.randn(n, h, w, c).permute(0, 3, 1, 2)
    for t in (odd, torch.randn(shape), torch.randn(shape).contiguous(memory_format=CL)):
        out = _laid_out(t, channels_last)
        assert out.stride() == want and torch.equal(out, t)
        assert (out.data_ptr() == t.data_ptr()) == (t.stride() == want)  # no copy when already laid out


# --- rank padding ---------------------------------------------------------------------------------

def _on_cpu(monkeypatch):
    """Let the CPU take the padded path, as CUDA does with rank_align set."""
    monkeypatch.setattr(fnl.FactorizedConv2d, '_rank_pad_devices', ('cuda', 'cpu'))
    monkeypatch.setattr(fnl.FactorizedConv2d, 'rank_align', 8)


def test_rank_padding_rule(monkeypatch):
    layer = fnl.FactorizedConv2d(16, 16, 3, padding=1, rank=5)
    x32, x16 = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4, dtype=torch.bfloat16)
    assert fnl.FactorizedConv2d.rank_align == 0  # off by default (docs/speed.md)
    monkeypatch.setattr(fnl.FactorizedConv2d, '_rank_pad_devices', ('cuda', 'cpu'))
    assert layer.rank_padding_for(x16) == 0
    monkeypatch.setattr(fnl.FactorizedConv2d, 'rank_align', 8)
    monkeypatch.setattr(fnl.FactorizedConv2d, '_rank_pad_devices', ('cuda',))
    assert layer.rank_padding_for(x16) == 0  # the CPU is not padded
    _on_cpu(monkeypatch)
    assert layer.rank_padding_for(x32) == 0  # float32 without autocast
    assert layer.rank_padding_for(x16) == 3  # 5 -> 8
    assert layer.rank_padding_for(x16.half()) == 3
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer.rank_padding_for(x32) == 3
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=False):
        assert layer.rank_padding_for(x32) == 0
    for rank, pad in ((8, 0), (9, 7), (16, 0), (1, 7)):
        assert fnl.FactorizedConv2d(16, 16, 3, rank=rank).rank_padding_for(x16) == pad
    layer.rank_align = 0
    assert layer.rank_padding_for(x16) == 0
    layer.rank_align = 4
    assert layer.rank_padding_for(x16) == 3  # 5 -> 8 as a multiple of 4


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('square', [False, True])
@pytest.mark.parametrize('geometry', [dict(kernel_size=3, padding=1), dict(kernel_size=(1, 5), stride=2, padding=(0, 2)),
                                      dict(kernel_size=1, stride=2)])
def test_padded_rank_matches_the_dense_conv(geometry, square, channels_last, monkeypatch):
    """The padded path in float64 (the padding forced): the same output and factor gradients."""
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(6, 16, rank=5, square=square, path='factored', dtype=torch.float64, **geometry)
    with torch.no_grad():
        layer.bias.normal_()
        if square:
            layer.S.add_(0.1 * torch.randn_like(layer.S))
    monkeypatch.setattr(fnl.FactorizedConv2d, 'rank_padding_for', lambda self, x: 3)
    x = torch.randn(4, 6, 9, 8, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    w_a, w_b = layer.conv_weights_for(x)
    assert w_a.shape[0] == w_b.shape[1] == 8  # the padded path is the one taken
    assert not w_a[5:].any() and not w_b[:, 5:].any()
    _check(layer, x, 1e-12)
    # eager inference reuses padded weights, made apart from the bare ones
    with torch.no_grad():
        y = layer(x)
        assert layer.conv_weights_for(x)[0].shape[0] == 8
        assert layer._cached_factor_conv_weights(channels_last, 0)[0].shape[0] == 5
        assert layer._cached_factor_conv_weights(channels_last, 3)[0].shape[0] == 8
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_padded_rank_under_autocast_and_batchnorm_folding(monkeypatch):
    """bfloat16 autocast takes the padded path (forced on the CPU) and gives the bare path's numbers up
    to bfloat16 rounding; a folded BatchNorm scales the padded second weight."""
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(16, 16, 3, padding=1, rank=5)
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bare = layer(x).float()
    _on_cpu(monkeypatch)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer.conv_weights_for(x)[0].shape[0] == 8
        padded = layer(x).float()
    torch.testing.assert_close(padded, bare, rtol=2e-2, atol=2e-2)
    x16 = x.bfloat16()
    layer16, bn16 = layer.bfloat16().eval(), bn.bfloat16()
    with torch.no_grad():
        assert layer16.conv_weights_for(x16)[0].shape[0] == 8
        torch.testing.assert_close(conv_bn(layer16, bn16, x16).float(), bn16(layer16(x16)).float(), rtol=2e-2,
                                   atol=2e-2)


@pytest.mark.parametrize('capability, align', [('AVX2', 8), ('AVX512', 0), ('DEFAULT', 0), ('ZVECTOR', 0)])
def test_cpu_inference_rank_align_default_follows_the_cpu(monkeypatch, capability, align):
    """Padding the rank is the default only where it was measured faster (an AVX2 CPU; slower with
    AVX-512, unmeasured elsewhere: docs/speed.md)."""
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    assert fnl_conv.default_cpu_inference_rank_align() == align
    # the class default is this machine's
    monkeypatch.undo()
    assert fnl.FactorizedConv2d.cpu_inference_rank_align == fnl_conv.default_cpu_inference_rank_align()


def test_cpu_inference_rank_padding_rule(monkeypatch):
    """Eager float32 inference on a channels-last CPU input pads the rank to a multiple of
    ``cpu_inference_rank_align`` (8 by default on an AVX2 CPU, measured faster there: docs/speed.md);
    everything else keeps the bare rank (training, NCHW, other dtypes, autocast, compiled graphs,
    weights not kept)."""
    monkeypatch.setattr(fnl.FactorizedConv2d, 'cpu_inference_rank_align', 8)
    layer = fnl.FactorizedConv2d(16, 16, 3, padding=1, rank=5)
    x = torch.randn(2, 16, 6, 6)
    xc = x.contiguous(memory_format=CL)
    assert layer.rank_padding_for(xc) == 0  # autograd on
    with torch.no_grad():
        assert layer.rank_padding_for(xc) == 3
        assert layer.rank_padding_for(x) == 0
        assert layer.rank_padding_for(xc.double()) == 0
        assert layer.rank_padding_for(xc.bfloat16()) == 0
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert layer.rank_padding_for(xc) == 0
        for rank, pad in ((8, 0), (11, 5), (21, 3), (1, 7)):
            assert fnl.FactorizedConv2d(16, 16, 3, rank=rank).rank_padding_for(xc) == pad
        fnl.keep_inference_weights(layer, False)  # weights made on every call: no padded copies then
        assert layer.rank_padding_for(xc) == 0
        fnl.keep_inference_weights(layer)
        assert layer.rank_padding_for(xc) == 3
        layer.cpu_inference_rank_align = 4
        assert layer.rank_padding_for(xc) == 3  # 5 -> 8 as a multiple of 4
        layer.cpu_inference_rank_align = 0
        assert layer.rank_padding_for(xc) == 0
        layer.cpu_inference_rank_align = 8
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        assert layer.rank_padding_for(xc) == 0


@pytest.mark.parametrize('fold', [False, True], ids=['conv', 'conv_bn'])
def test_cpu_inference_padding_gives_the_bare_numbers(fold):
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(16, 24, 3, stride=2, padding=1, rank=5).eval()
    bn = nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        layer.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    xc = torch.randn(4, 16, 9, 9).contiguous(memory_format=CL)
    layer.cpu_inference_rank_align = 8

    def run():
        return conv_bn(layer, bn, xc) if fold else layer(xc)
    with torch.no_grad():
        padded = run()
        assert layer.conv_weights_for(xc)[0].shape[0] == 8
        layer.cpu_inference_rank_align = 0
        bare = run()
        assert layer.conv_weights_for(xc)[0].shape[0] == 5
    torch.testing.assert_close(padded, bare, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        want = (bn(layer(xc)) if fold else layer(xc)).detach()
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-5)
