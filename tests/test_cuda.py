"""The core on CUDA: same numbers as on the CPU, AMP, compile. Skipped without a GPU."""
import copy

import pytest
import torch
from torch import nn

import fnl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 on the GPU: TF32 convs/matmuls (cuDNN's default) differ from the CPU by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _net(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        fnl.FactorizedConv2d(16, 32, 3, stride=2, padding=1, rank_scale=0.25), nn.BatchNorm2d(32), nn.ReLU(),
        fnl.FactorizedConv2d(32, 32, 3, padding=1, rank_scale=1.0, square=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), fnl.FactorizedLinear(32, 10, rank=4),
    ).to(device)


def test_layers_match_cpu():
    cpu = _net("cpu").double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    assert torch.allclose(y_cpu, y_gpu.cpu(), atol=1e-10), f"{(y_cpu - y_gpu.cpu()).abs().max():.3e}"
    y_cpu.sum().backward()
    y_gpu.sum().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(a.grad, b.grad.cpu(), atol=1e-9), name


def test_spectral_and_collapse_on_cuda():
    torch.manual_seed(1)
    dense = nn.Conv2d(32, 64, 3, padding=1).cuda()
    f = fnl.FactorizedConv2d.from_dense(dense, rank_scale=1.0)
    assert f.U.is_cuda
    x = torch.randn(2, 32, 8, 8, device="cuda")
    assert torch.allclose(f(x), dense(x), atol=1e-4), f"{(f(x) - dense(x)).abs().max():.3e}"
    assert torch.allclose(f.to_dense()(x), dense(x), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_training_with_frobenius_decay(dtype):
    model = _net("cuda")
    ref = copy.deepcopy(model)
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-4), lr=0.05, momentum=0.9), model, 1e-2)
    ref_opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(ref, 1e-4), lr=0.05, momentum=0.9), ref, 1e-2)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, enabled=dtype == torch.float16)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(a).all(), name
        # AMP and fp32 training agree to low-precision accuracy after 3 steps
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3, f"{name}: {(a - b).abs().max():.3e}"


def test_fd_grad_matches_autograd_on_cuda():
    layer = fnl.FactorizedConv2d(16, 16, 3, rank=12, square=True, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        layer.S.add_(0.1 * torch.randn_like(layer.S))
    expected = torch.autograd.grad(0.05 * layer.matrix().pow(2).sum(), layer.factor_parameters())
    layer.add_frobenius_grad_(0.1)
    for p, g in zip(layer.factor_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-10), f"{(p.grad - g).abs().max():.3e}"


def test_torch_compile_on_cuda():
    model = _net("cuda").eval()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)


def test_fd_step_refuses_a_real_cuda_graph_capture():
    """A Frobenius-decay step inside ``torch.cuda.graph`` raises (docs/method.md#frobenius-decay); the
    forward and backward alone capture, and the FD step outside the graph runs."""
    from fnl.fd_engine import CAPTURE_ERROR
    model = _net("cuda")
    opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.1)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        model(x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as err:
        with torch.cuda.graph(graph):
            model(x).sum().backward()
            opt.step()
    assert str(err.value) == CAPTURE_ERROR
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_padding_under_autocast_matches_the_bare_rank(dtype):
    """With rank_align = 8, in 16-bit on CUDA the two convs run with the rank padded to a multiple of 8:
    the numbers of the bare rank, up to 16-bit rounding, outputs and gradients, both memory formats."""
    torch.manual_seed(0)
    bare = fnl.FactorizedConv2d(16, 32, 3, stride=2, padding=1, rank=5).cuda()
    padded = copy.deepcopy(bare)
    padded.rank_align = 8
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(8, 16, 12, 12, device="cuda").contiguous(memory_format=fmt)
        with torch.autocast("cuda", dtype=dtype):
            assert padded.conv_weights_for(x)[0].shape[0] == 8 and bare.conv_weights_for(x)[0].shape[0] == 5
            ys = [m(x).float() for m in (padded, bare)]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-2, atol=1e-2)
        for m, y in zip((padded, bare), ys):
            m.zero_grad()
            y.square().mean().backward()
        for a, b in zip(padded.parameters(), bare.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-3)


class _ConvBN(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(conv.out_channels)

    def forward(self, x):
        return fnl.conv_bn(self.conv, self.bn, x)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_inference_graph_replays_see_in_place_weight_updates(fmt):
    """An eager inference pass captured in a CUDA graph reads the parameters, not the weights kept
    between eager calls: after ``load_state_dict`` (an in-place copy), a replay gives the new model's
    output (docs/speed.md). Both caches: a factorized conv's two weights, folded BatchNorms."""
    torch.manual_seed(0)
    model = nn.Sequential(_ConvBN(fnl.FactorizedConv2d(8, 16, 3, padding=1, rank=3)), nn.ReLU(),
                          fnl.FactorizedConv2d(16, 16, 3, padding=1, rank=4),
                          _ConvBN(nn.Conv2d(16, 8, 3, padding=1))).cuda().eval()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in list(other.parameters()) + list(other.buffers()):
            if p.is_floating_point():
                p.mul_(1.5).add_(0.1)
    x = torch.randn(4, 8, 10, 10, device="cuda").contiguous(memory_format=fmt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():  # warm-up: the eager caches are filled here
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(x)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
        model.load_state_dict(other.state_dict())
        graph.replay()
        want = other(x)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(model(x), want)
