"""The Frobenius-decay pass of one optimizer step, grouped vs per layer, side by side in one run.

    python bench/bench_fd.py [--device cpu|cuda] [--batch-size 128] [--rank-scale 0.111] [--threads N]

``fnl_resnet20`` (18 factorized convs) trained with ``fnl.FrobeniusDecay`` around SGD + momentum. Three
things are timed interleaved (``fnl.measure_latency``, medians): a full training step (forward,
backward, FD, update), the FD pass alone as the core engine does it (same-shaped factors grouped:
a few batched matmuls and one foreach add), and the FD pass as it was done before the engine (one
``add_frobenius_grad_`` per layer, about ten small ops each). It also counts the aten operations of
each FD pass (views excluded). Prints the share of a training step each pass takes; bench/README.md records runs.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fnl


class CountOps(TorchDispatchMode):
    """Counts the aten operations run inside it: those that compute (views and metadata ops excluded),
    and all dispatches (views included: each costs host time, which is what a launch-bound GPU step
    waits on)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.dispatches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.dispatches += 1
        if not func.is_view and func.__name__.split(".")[0] not in ("detach", "split", "unbind", "alias"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _per_layer_fd(layers: list, coef: float) -> None:
    """The FD pass before the engine: every layer on its own."""
    with torch.no_grad():
        for layer in layers:
            layer.add_frobenius_grad_(coef)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--rank-scale", type=float, default=0.111, help="rank_scale of fnl_resnet20")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each repeated 4 times)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fnl_timm  # noqa: F401  (registers fnl_resnet20)
    import timm

    device = args.device
    torch.manual_seed(0)
    model = timm.create_model("fnl_resnet20", rank_scale=args.rank_scale, spectral=True, num_classes=10).to(device)
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-4), lr=0.01, momentum=0.9), model, 1e-4)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    train_step()  # every .grad exists from here on
    layers = opt.layers

    def grouped() -> None:
        opt.apply_frobenius_decay()

    def per_layer() -> None:
        _per_layer_fd(layers, opt.coef)

    counts = {}
    for name, fn in (("grouped", grouped), ("per layer", per_layer)):
        with CountOps() as c:
            fn()
        counts[name] = c.count
        counts[name + " dispatches"] = c.dispatches
    ms = fnl.measure_latency([train_step, grouped, per_layer], device, repeats=4 * args.rounds, warmup=1, grad=True)
    step, g, pl = ms
    print(f"[fd] fnl_resnet20 rank_scale {args.rank_scale}, batch {args.batch_size}, {len(layers)} factorized layers, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"[fd] training step (with the grouped FD) {step:.1f} ms")
    print(f"[fd] FD pass grouped   {g:.3f} ms, {counts['grouped']:4d} compute ops, "
          f"{counts['grouped dispatches']:4d} dispatches: {100 * g / step:.2f}% of a step")
    print(f"[fd] FD pass per layer {pl:.3f} ms, {counts['per layer']:4d} compute ops, "
          f"{counts['per layer dispatches']:4d} dispatches: {100 * pl / step:.2f}% of a step")
    print(f"[fd] grouped / per layer: {g / pl:.2f}x the time, target <= 2% of a step: "
          f"{'met' if g / step <= 0.02 else 'not met'}")


if __name__ == "__main__":
    main()
