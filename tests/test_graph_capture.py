"""Every Frobenius-decay path refuses to run inside a CUDA graph capture (docs/method.md#frobenius-decay).

A replay of a captured step would repeat the host-side values of the captured step (coefficients, the
learning rates of decoupled FD, which parameters have a gradient), silently wrong once a scheduler moves
the learning rate. The capture is simulated on the CPU (``torch.cuda.is_available`` and
``is_current_stream_capturing`` patched to True): the step must raise before it changes any parameter
or gradient. Without the capture the same step runs.

The layers' eager-inference caches (a factorized conv's two weights, a folded BatchNorm) are neither
read nor written inside a capture: a graph that read a kept weight would replay it after the
parameters changed in place, and one made inside the capture holds values only after a replay.
"""
import pytest
import torch
from torch import nn

import fnl
from fnl.fd_engine import CAPTURE_ERROR


def _simulate_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(fnl.FactorizedConv2d(2, 4, 3, padding=1, rank=2), nn.Flatten(),
                         fnl.FactorizedLinear(4 * 5 * 5, 3, rank=2, square=True))


def _core(kind):
    model = _model()
    if kind == "sgd":
        opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, 0.1)
    else:
        opt = fnl.FrobeniusDecay(torch.optim.AdamW(fnl.param_groups(model, 0.01), lr=0.1), model, 0.1)
        assert opt.decoupled
    return model, opt


def _timm(name):
    timm = pytest.importorskip("timm")
    import fnl_timm  # noqa: F401  (registers the fd* optimizers)
    model = _model()
    fnl_timm.optim.mark_factors(model)
    from timm.optim import create_optimizer_v2
    return model, create_optimizer_v2(model, name, lr=0.1, weight_decay=0.1)


def _fairseq(name):
    pytest.importorskip("fairseq")
    from test_fairseq_plugin import _build, _optimizer
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.1", "--wd2fd", "--wd2fd-quekey",
                          "--wd2fd-outval"], optimizer=name)
    args.lr = [0.1]
    return model, _optimizer(model, args)


FRONTS = {
    "core-sgd": lambda: _core("sgd"), "core-adamw-decoupled": lambda: _core("adamw"),
    "timm-fdsgd": lambda: _timm("fdsgd"), "timm-fdadamw": lambda: _timm("fdadamw"),
    "fairseq-fd_sgd": lambda: _fairseq("fd_sgd"), "fairseq-fd_adam": lambda: _fairseq("fd_adam"),
}


@pytest.mark.parametrize("front", list(FRONTS))
def test_fd_step_refuses_a_cuda_graph_capture(front, monkeypatch):
    model, opt = FRONTS[front]()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) / 8
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    _simulate_capture(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == CAPTURE_ERROR
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n][0]) and torch.equal(p.grad, before[n][1]), n
    # not capturing (no CUDA here): the same step runs and moves every factor
    monkeypatch.undo()
    opt.step()
    factors = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("U", "V", "S")]
    assert factors and all(not torch.equal(dict(model.named_parameters())[n].detach(), before[n][0])
                           for n in factors)


def _conv_alone():
    conv = fnl.FactorizedConv2d(4, 6, 3, padding=1, rank=2)
    return conv, conv, conv


def _conv_bn(conv):
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    return (lambda x: fnl.conv_bn(conv, bn, x)), (lambda x: bn(conv(x))), conv


LAYERS = {
    "factorized conv": _conv_alone,
    "factorized conv + folded BatchNorm": lambda: _conv_bn(fnl.FactorizedConv2d(4, 6, 3, padding=1, rank=2)),
    "dense conv + folded BatchNorm": lambda: _conv_bn(nn.Conv2d(4, 6, 3, padding=1)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_inference_caches_are_not_used_inside_a_cuda_graph_capture(layer, channels_last, monkeypatch):
    torch.manual_seed(0)
    run, reference, conv = LAYERS[layer]()
    x = torch.randn(2, 4, 7, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        kept = run(x)  # eager inference: the weights are made and kept
        # new values that no version counter sees (``.data`` has its own), in a factor the kept
        # weights copy (the second conv's channels-last weight is a view of U)
        (conv.V if isinstance(conv, fnl.FactorizedConv2d) else conv.weight).data.mul_(1.5)
        assert torch.equal(run(x), kept)  # the premise: outside a capture the kept weights are reused
        _simulate_capture(monkeypatch)
        captured = run(x)
        monkeypatch.undo()
        after = run(x)
    with torch.enable_grad():
        want = reference(x).detach()  # autograd on: nothing folded or kept
    assert not torch.allclose(want, kept, atol=1e-3)
    # inside the capture the weights are made from the parameters (what a replay recomputes) ...
    torch.testing.assert_close(captured, want, rtol=1e-4, atol=1e-5)
    # ... and nothing made there is kept: the entry from before the capture is still the one reused
    assert torch.equal(after, kept)


def test_the_capture_check_never_queries_cuda_before_it_is_initialized(monkeypatch):
    """On a GPU machine, CPU inference and FD steps must not start CUDA (a context costs seconds and
    memory): without CUDA initialized no capture can run, so the stream is not queried."""
    def query():
        raise AssertionError("the current CUDA stream was queried before CUDA was initialized")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", query)
    run, _, conv = LAYERS["factorized conv + folded BatchNorm"]()
    with torch.no_grad():
        run(torch.randn(2, 4, 7, 7))
        conv(torch.randn(2, 4, 7, 7))
    model, opt = _core("sgd")
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    opt.step()
