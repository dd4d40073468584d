"""Tensor-format convs against low-rank and dense convs of the same WRN-28-10 stage (issue: tensor convs).

    python bench/bench_tensor.py [--device cpu|cuda] [--batch 32] [--channels 640] [--size 8]

One 3x3 conv of WRN-28-10's last stage (640 -> 640 channels, 8x8 maps, padding 1) in every format,
measured side by side in alternating rounds: forward + backward (training step, no optimizer) and
forward only (inference, no grad), with the parameters and the multiply-adds per sample of each
against the dense conv. Also the cost of one Frobenius-decay gradient (``add_frobenius_grad_``).
Formats: dense; depthwise + dense 1x1 (the structure the tensor formats compress); low rank
(``fnl.FactorizedConv2d`` at the rank_scale of the WRN-28-10 low-rank run at target ratio 0.06667);
Tensor-Train at s = 0.234 / 0.705, Tucker at s = 0.211 / 0.68, each on its auto path and, where
that is the rebuilt matrix, also forced onto the core-contraction path.

Recorded (python bench/bench_tensor.py --device cuda --batch 128 --rounds 5 --repeat 5; one H200,
torch 2.11.0+cu130; ms per call, medians):

    layer                    ranks         params     param ratio  MACs ratio  fwd+bwd ms  fwd ms  FD grad ms
    dense 3x3                -             3,686,400  1.0000       1.0000      0.74        0.28    -
    depthwise + dense 1x1    -               415,360  0.1127       0.1127      0.65        0.13    -
    low rank (WRN 0.06667)   61              234,240  0.0635       0.0635      1.02        0.21    0.189
    TT 0.234                 (19, 15)         31,040  0.0084       0.1127      1.35        0.27    0.860
    TT 0.234 (contract)      (19, 15)         31,040  0.0084       0.4446      8.22        3.16    0.837
    TT 0.705                 (56, 45)        214,720  0.0582       0.1127      1.42        0.26    0.891
    TT 0.705 (contract)      (56, 45)        214,720  0.0582       3.6418      30.79       12.19   0.850
    Tucker 0.211             (17, 17, 14)     13,422  0.0036       0.1127      1.88        0.41    1.673
    Tucker 0.211 (contract)  (17, 17, 14)     13,422  0.0036       0.3752      7.94        1.82    1.553
    Tucker 0.68              (54, 54, 44)    145,520  0.0395       0.1127      2.10        0.38    1.592
    Tucker 0.68 (contract)   (54, 54, 44)    145,520  0.0395       3.4377      29.95       7.45    1.545

At these ranks contracting the cores costs more multiply-adds than the dense 640 x 640 1x1 conv, so
the auto path rebuilds the matrix (a few small kernels per call: the fixed overhead that makes the
tensor convs slower than the depthwise-separable dense conv at this size).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import fnl
from bench_core import interleaved  # bench/ is on sys.path when this script runs

# rank_scale that fnl_wrn28_10(target_ratio=0.06667) solves (the paper's low-rank point)
LOWRANK_WRN_SCALE = 0.03177083333333334


class DepthwiseSeparable(nn.Module):
    def __init__(self, c: int, device: str) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, device=device)
        self.pointwise = nn.Conv2d(c, c, 1, bias=False, device=device)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def layers(c: int, device: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out: dict[str, nn.Module] = {
        "dense 3x3": nn.Conv2d(c, c, 3, padding=1, bias=False, device=device),
        "depthwise + dense 1x1": DepthwiseSeparable(c, device),
        "low rank (WRN 0.06667)": fnl.FactorizedConv2d(c, c, 3, padding=1, bias=False,
                                                       rank_scale=LOWRANK_WRN_SCALE, device=device),
    }
    for cls, scales in ((fnl.TTConv2d, (0.234, 0.705)), (fnl.TuckerConv2d, (0.211, 0.68))):
        name = "TT" if cls is fnl.TTConv2d else "Tucker"
        for s in scales:
            layer = cls(c, c, 3, padding=1, bias=False, rank_scale=s, spectral=True, device=device)
            out[f"{name} {s}"] = layer
            forced = cls(c, c, 3, padding=1, bias=False, rank_scale=s, spectral=True, path="factored", device=device)
            out[f"{name} {s} (contract)"] = forced
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--batch", type=int, default=32, help="batch size (the paper trains with 128)")
    p.add_argument("--channels", type=int, default=640, help="channels of the stage (WRN-28-10: 160/320/640)")
    p.add_argument("--size", type=int, default=8, help="feature map side (WRN-28-10's last stage: 8)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved timing rounds over all layers; the median is kept (default: 5)")
    p.add_argument("--repeat", type=int, default=3, help="calls per layer and round (default: 3)")
    args = p.parse_args()
    for name in ("batch", "channels", "size", "rounds", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    dev, c = args.device, args.channels
    mods = layers(c, dev)
    x = torch.randn(args.batch, c, args.size, args.size, device=dev)
    shape = (c, args.size, args.size)
    dense_params = c * c * 9
    dense_macs = c * c * 9 * args.size * args.size

    def train(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()
        return run

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    t_train = interleaved({k: train(m) for k, m in mods.items()}, dev, args.rounds, args.repeat)
    t_infer = interleaved({k: infer(m) for k, m in mods.items()}, dev, args.rounds, args.repeat)
    fd = {k: (lambda m=m: m.add_frobenius_grad_(5e-4)) for k, m in mods.items() if isinstance(m, fnl.FactorizedLayer)}
    t_fd = interleaved(fd, dev, args.rounds, args.repeat)

    print(f"# {c} -> {c} 3x3 conv, {args.size}x{args.size} maps, batch {args.batch}, {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = ("layer", "ranks", "params", "param ratio", "MACs ratio", "fwd+bwd ms", "vs dense", "fwd ms", "vs dense",
              "FD grad ms")
    rows = []
    for k, m in mods.items():
        params = sum(q.numel() for q in m.parameters())
        if isinstance(m, fnl.FactorizedLayer):
            macs = m.macs(shape)  # on the path the layer takes (forced ones included)
            ranks = str(m.rank)
        elif isinstance(m, DepthwiseSeparable):
            macs, ranks = (c * 9 + c * c) * args.size * args.size, "-"
        else:
            macs, ranks = dense_macs, "-"
        rows.append((k, ranks, f"{params:,}", f"{params / dense_params:.4f}", f"{macs / dense_macs:.4f}",
                     f"{1e3 * t_train[k]:.2f}", f"{t_train[k] / t_train['dense 3x3']:.2f}x",
                     f"{1e3 * t_infer[k]:.2f}", f"{t_infer[k] / t_infer['dense 3x3']:.2f}x",
                     f"{1e3 * t_fd[k]:.3f}" if k in t_fd else "-"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print("MACs ratio: per sample against the dense 3x3 conv; the tensor formats' matrix rebuild (once per batch, "
          "auto path) is not included.")


if __name__ == "__main__":
    main()
