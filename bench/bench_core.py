"""Benchmarks of the core layers, measured side by side in one run (issue: core library).

    python bench/bench_core.py [--device cpu|cuda] [--only linear,resnet,fd,spectral,solve]

Prints one line per benchmark with the measured times and the ratios; bench/README.md records runs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

import fnl


def interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int = 5, repeat: int = 4) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved by ``fnl.measure_latency`` with
    autograd on (the functions include training steps). Also used by bench_tensor.py."""
    ms = fnl.measure_latency(list(fns.values()), device, repeats=rounds * repeat, warmup=1, grad=True)
    return {k: t / 1e3 for k, t in zip(fns, ms)}


class TwoMatmul(nn.Module):
    """The plainest low-rank layer, the reference for our overhead."""

    def __init__(self, n: int, r: int, device: str) -> None:
        super().__init__()
        self.a = nn.Linear(n, r, bias=False, device=device)
        self.b = nn.Linear(r, n, device=device)

    def forward(self, x):
        return self.b(self.a(x))


def bench_linear(device: str, dtype: torch.dtype = torch.float32) -> None:
    n, batch, r = 4096, 1024, 512
    torch.manual_seed(0)
    # a layer inside a network: its input needs a gradient and a dense gradient comes from above, so
    # backward runs every product (dense 3 matmuls, factorized 6) and the multiply-add ratio is n / 2r.
    # (With a leaf input, as in runs before 2026-12-03, it is 2 vs 5 matmuls: a 3.2x ratio, not 4x.)
    x = torch.randn(batch, n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, n, device=device, dtype=dtype)
    layers = {"dense": nn.Linear(n, n, device=device), "fnl": fnl.FactorizedLinear(n, n, rank=r, device=device),
              "two-matmul": TwoMatmul(n, r, device)}
    layers = {k: v.to(dtype) for k, v in layers.items()}

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(g)
        return run

    t = interleaved({k: step(v) for k, v in layers.items()}, device)
    macs_ratio = (3 * n * n) / (6 * n * r)
    print(f"[linear] {n}x{n} batch {batch} rank {r} {str(dtype).replace('torch.', '')} fwd+bwd: dense {t['dense']*1e3:.1f} ms, "
          f"FactorizedLinear {t['fnl']*1e3:.1f} ms, two nn.Linear {t['two-matmul']*1e3:.1f} ms")
    print(f"[linear] speedup {t['dense']/t['fnl']:.2f}x (two-matmul {t['dense']/t['two-matmul']:.2f}x) vs MAC ratio "
          f"{macs_ratio:.1f}x -> {t['dense']/t['fnl']/macs_ratio:.2f} of the MAC ratio (target >= 0.90)")


def _resnet20(rank_scale, device):
    import timm
    import fnl_timm  # noqa: F401  (registers the models)
    kwargs = {} if rank_scale is None else {"rank_scale": rank_scale}
    return timm.create_model("fnl_resnet20", num_classes=10, **kwargs).to(device)


def bench_resnet(device: str) -> None:
    batch = 128
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {"dense": _resnet20(None, device), "fnl": _resnet20(0.111, device)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def train(k):
        def run():
            opts[k].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(models[k](x), y).backward()
            opts[k].step()
        return run

    def infer(k):
        @torch.no_grad()
        def run():
            models[k].eval()
            models[k](x)
            models[k].train()
        return run

    tt = interleaved({k: train(k) for k in models}, device, rounds=3, repeat=3)
    ti = interleaved({k: infer(k) for k in models}, device, rounds=3, repeat=3)
    macs = {k: fnl.count_macs(m, (3, 32, 32)) for k, m in models.items()}
    params = {k: fnl.count_parameters(m) for k, m in models.items()}
    print(f"[resnet20] batch {batch}: params {params['fnl']:,} vs {params['dense']:,} "
          f"(ratio {params['fnl']/params['dense']:.3f}); MACs ratio dense/fnl {macs['dense']/macs['fnl']:.2f}x")
    print(f"[resnet20] train step dense {tt['dense']*1e3:.1f} ms, fnl {tt['fnl']*1e3:.1f} ms: speedup "
          f"{tt['dense']/tt['fnl']:.2f}x; inference dense {ti['dense']*1e3:.1f} ms, fnl {ti['fnl']*1e3:.1f} ms: "
          f"speedup {ti['dense']/ti['fnl']:.2f}x")


def _cnn(device):
    torch.manual_seed(0)
    width = 64
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(6):
        layers += [fnl.FactorizedConv2d(width, width, 3, padding=1, rank_scale=0.25), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers).to(device)


def bench_fd(device: str) -> None:
    batch = 64
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    m_wd, m_fd = _cnn(device), _cnn(device)
    opt_wd = torch.optim.SGD(m_wd.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_fd = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(m_fd, 1e-4), lr=0.01, momentum=0.9), m_fd, 1e-4)

    def step(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    t = interleaved({"wd": step(m_wd, opt_wd), "fd": step(m_fd, opt_fd)}, device, rounds=7, repeat=5)
    print(f"[fd] factorized CNN (6 x 64-ch 3x3, rank_scale 0.25) batch {batch} step: weight decay "
          f"{t['wd']*1e3:.2f} ms, Frobenius decay {t['fd']*1e3:.2f} ms: overhead {100*(t['fd']/t['wd']-1):+.1f}% "
          f"(target <= +2%)")


def _wrn28_10_convs(device):
    """The 3x3 and shortcut convs of WRN-28-10 (widths 160/320/640, 4 blocks per stage)."""
    convs = []
    cin = 16
    for width in (160, 320, 640):
        for block in range(4):
            convs.append(nn.Conv2d(cin, width, 3, padding=1, bias=False, device=device))
            convs.append(nn.Conv2d(width, width, 3, padding=1, bias=False, device=device))
            if block == 0:
                convs.append(nn.Conv2d(cin, width, 1, bias=False, device=device))
            cin = width
    return nn.Sequential(*convs)


def bench_spectral(device: str) -> None:
    model = _wrn28_10_convs(device)
    start = time.perf_counter()
    fnl.factorize(model, rank_scale=0.1, spectral=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"[spectral] spectral init of WRN-28-10's {len(model)} convs (up to 640 channels) at rank_scale 0.1: "
          f"{elapsed:.2f} s (target well under 10 s), {torch.get_num_threads()} threads")


def bench_solve(device: str) -> None:
    model = nn.Sequential(*_wrn28_10_convs("meta"))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fnl.solve_rank_scale(model, 0.06667)
        times.append(time.perf_counter() - start)
    print(f"[solve] target-ratio solve on a {len(model)}-layer model: {statistics.median(times)*1e3:.2f} ms "
          f"(target < 50 ms)")


BENCHES = {"linear": bench_linear, "resnet": bench_resnet, "fd": bench_fd, "spectral": bench_spectral,
           "solve": bench_solve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {list(BENCHES)} (default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the linear benchmark's layers and data (default: float32; the others run float32)")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    desc = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# fnl core benchmarks on {desc}, torch {torch.__version__}")
    for name in names:
        if name == "linear":
            bench_linear(args.device, getattr(torch, args.dtype))
        else:
            BENCHES[name](args.device)


if __name__ == "__main__":
    main()
