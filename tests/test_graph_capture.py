"""Every Frobenius-decay path refuses to run inside a CUDA graph capture (docs/method.md#frobenius-decay).

A replay of a captured step would repeat the host-side values of the captured step (coefficients, the
learning rates of decoupled FD, which parameters have a gradient), silently wrong once a scheduler moves
the learning rate. The capture is simulated on the CPU (``torch.cuda.is_available`` and
``is_current_stream_capturing`` patched to True): the step must raise before it changes any parameter
or gradient. Without the capture the same step runs.
"""
import pytest
import torch
from torch import nn

import fnl
from fnl.fd_engine import CAPTURE_ERROR


def _model():
    torch.manual_seed(0)
    return nn.Sequential(fnl.FactorizedConv2d(2, 4, 3, padding=1, rank=2), nn.Flatten(),
                         fnl.FactorizedLinear(4 * 5 * 5, 3, rank=2, square=True))


def _core(kind):
    model = _model()
    if kind == "sgd":
        opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, 0.1)
    else:
        opt = fnl.FrobeniusDecay(torch.optim.AdamW(model.parameters(), lr=0.1), model, 0.1)
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
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
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
