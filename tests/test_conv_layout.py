"""How FactorizedConv2d lays out its two convs (docs/speed.md) changes no number: weights with canonical
strides, and strided convs one pixel wide run as a subsample and a stride-1 conv. Each is checked
against the dense conv with the rebuilt kernel, outputs and the factors' gradients, in both memory
formats."""
import pytest
import torch
import torch.nn.functional as F

import fnl
from fnl.conv import _laid_out

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
