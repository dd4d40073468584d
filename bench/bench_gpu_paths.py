"""Where a factorized model's GPU time goes: eager steps against CUDA-graph replays, side by side.

On a fast GPU the small models of the paper (``fnl_resnet20``, WRN-28-10 at batch 128, the small
Transformer) can be bound by the host launching kernels rather than by the kernels: a factorized
layer launches two convs (and their weight copies) where the dense one launches one. Replaying a
captured CUDA graph removes the launch cost, so eager time against replay time splits a step into
host overhead and GPU work. For each model and precision this prints, in ms per batch, dense and
factorized: eager inference, eager forward+backward and the eager training step with its optimizer
(``fdmomentum`` for the factorized model, so the Frobenius-decay pass is in it), and with
``--graphs`` the first two captured in CUDA graphs; the factorized model three ways: as it is, with
its rank channels zero-padded to a multiple of 8 (``rank_align = 8``), and with every rank rounded
up to a multiple of 8 (more parameters). Also FactorizedLinear eager and graphed, the FD pass's
kernel time against its wall time, a profile of one training step, torch.compile's
"reduce-overhead" mode, and the aten operations a step dispatches (``dispatches``, which runs on the
CPU as well). bench/README.md records runs.

    python bench/bench_gpu_paths.py                        # every part, on the GPU
    python bench/bench_gpu_paths.py --only models linear   # some parts
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import fnl  # noqa: E402

PARTS = ("models", "linear", "fd", "profile", "compile", "dispatches")
MODELS = {"resnet20": ("fnl_resnet20", dict(rank_scale=0.111)), "wrn28_10": ("fnl_wrn28_10", dict(target_ratio=0.06667))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, device: torch.device, iters: int, rounds: int) -> dict:
    """Median over ``rounds`` interleaved rounds of the ms per call of each function (``iters`` calls
    per round; ``fnl.measure_latency`` with autograd on, the inference functions turn it off)."""
    ms = fnl.measure_latency(list(fns.values()), device, repeats=rounds, warmup=1, inner=iters, grad=True)
    return dict(zip(fns, ms))


def graphed(fn: Callable[[], object], device: torch.device) -> Optional[Callable[[], object]]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); its replay. None off CUDA."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def round_ranks(model: nn.Module, multiple: int = 8) -> nn.Module:
    """Every FactorizedConv2d of ``model`` replaced by one whose rank is rounded up to ``multiple``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, fnl.FactorizedConv2d) and m.rank % multiple:
            new = fnl.FactorizedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                       1, m.bias is not None, rank=math.ceil(m.rank / multiple) * multiple,
                                       square=m.S is not None, path=m.path, device=m.U.device, dtype=m.U.dtype)
            model.set_submodule(name, new)
    return model


def _macs(model: nn.Module) -> int:
    return fnl.count_macs(model, (3, 32, 32))


def bench_models(device: torch.device, a) -> None:
    import timm
    from timm.optim import create_optimizer_v2

    import fnl_timm  # noqa: F401  (registers the models)

    for key in a.models:
        name, kw = MODELS[key]
        for prec in a.precisions:
            dtype = {"bf16": torch.bfloat16, "fp32": None}[prec]
            variants = {}
            for label, kwargs in (("dense", {}), ("fnl", kw), ("fnl_pad8", kw), ("fnl_r8", kw)):
                torch.manual_seed(0)
                m = timm.create_model(name, **kwargs)
                if label == "fnl_r8":
                    round_ranks(m)
                if label == "fnl_pad8":  # the rank channels zero-padded to a multiple of 8
                    for layer in m.modules():
                        if isinstance(layer, fnl.FactorizedConv2d):
                            layer.rank_align = 8
                variants[label] = m
            macs = {k: _macs(m) for k, m in variants.items()}
            bs = a.batch_size
            x = torch.randn(bs, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (bs,), device=device)
            fns = {}
            for label, m in variants.items():
                m.to(device).to(memory_format=torch.channels_last)
                if label != "dense":
                    fnl_timm.mark_factors(m)
                opt = create_optimizer_v2(m, "momentum" if label == "dense" else "fdmomentum", lr=0.01, momentum=0.9,
                                          weight_decay=1e-4)

                def ac(cache=True):
                    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)

                def infer(m=m, cache=True):
                    m.eval()
                    with torch.no_grad(), ac(cache):
                        return m(x)

                def fwd_bwd(m=m, cache=True):
                    m.train()
                    with ac(cache):
                        loss = F.cross_entropy(m(x), y)
                    loss.backward()

                def step(m=m, opt=opt):
                    m.train()
                    opt.zero_grad(set_to_none=True)
                    with ac():
                        loss = F.cross_entropy(m(x), y)
                    loss.backward()
                    opt.step()

                fns[f"{label} infer"] = infer
                fns[f"{label} step"] = step
                fns[f"{label} fwd+bwd"] = fwd_bwd
                if a.graphs:
                    gm = copy.deepcopy(m)  # the graphs own their copy: its gradients live in the graphs' memory
                    gi = graphed(lambda gm=gm: infer(gm, False), device)
                    if gi is not None:
                        fns[f"{label} infer graph"] = gi
                    gt = graphed(lambda gm=gm: fwd_bwd(gm, False), device)
                    if gt is not None:
                        fns[f"{label} fwd+bwd graph"] = gt
            t = timed(fns, device, a.iters, a.rounds)
            print(f"[models] {name} {prec} channels-last batch {bs}; MACs/image dense {macs['dense'] / 1e6:.1f}M, "
                  f"fnl {macs['fnl'] / 1e6:.1f}M ({macs['dense'] / macs['fnl']:.2f}x fewer), "
                  f"fnl_r8 {macs['fnl_r8'] / 1e6:.1f}M (fnl_pad8: rank channels zero-padded to a multiple of 8 "
                  f"(rank_align = 8); fnl_r8: ranks rounded up to a multiple of 8)", flush=True)
            cols = ["infer", "infer graph", "fwd+bwd", "fwd+bwd graph", "step"] if a.graphs else ["infer", "fwd+bwd", "step"]
            print(f"  {'ms/batch':<14}" + "".join(f"{c:>14}" for c in cols))
            for label in variants:
                print(f"  {label:<14}" + "".join(f"{t.get(f'{label} {c}', float('nan')):>14.2f}" for c in cols))
            for label in ("fnl", "fnl_pad8", "fnl_r8"):
                print(f"  dense/{label:<8}" + "".join(
                    f"{t.get(f'dense {c}', float('nan')) / t.get(f'{label} {c}', float('nan')):>13.2f}x"
                    for c in cols), flush=True)


def bench_linear(device: torch.device, a) -> None:
    n, r = 4096, 512
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for batch in (1024, 8192):
            torch.manual_seed(0)
            x = torch.randn(batch, n, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(batch, n, device=device, dtype=dtype)
            layers = {"dense": nn.Linear(n, n), "fnl": fnl.FactorizedLinear(n, n, rank=r),
                      "two": nn.Sequential(nn.Linear(n, r, bias=False), nn.Linear(r, n))}
            fns = {}
            for k, layer in layers.items():
                layer.to(device=device, dtype=dtype)

                def run(layer=layer):
                    x.grad = None
                    layer(x).backward(g)
                fns[k] = run
                for p in layer.parameters():
                    p.grad = None
                gr = graphed(run, device)
                if gr is not None:
                    fns[f"{k} graph"] = gr
            t = timed(fns, device, a.iters, a.rounds)
            line = ", ".join(f"{k} {v:.3f}" for k, v in t.items())
            ratio = (3 * n * n) / (6 * n * r)
            print(f"[linear] {n}x{n} rank {r} {prec} batch {batch} fwd+bwd ms: {line}", flush=True)
            for suffix in ("", " graph"):
                if f"fnl{suffix}" in t:
                    s = t[f"dense{suffix}"] / t[f"fnl{suffix}"]
                    print(f"[linear]   {'eager' if not suffix else 'graphed'}: speedup {s:.2f}x = "
                          f"{s / ratio:.2f} of the {ratio:.1f}x MAC ratio (two plain: "
                          f"{t[f'dense{suffix}'] / t[f'two{suffix}'] / ratio:.2f})", flush=True)


def _profile_table(fn: Callable[[], object], device: torch.device, calls: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    wall = 1e3 * (time.perf_counter() - t0) / calls
    ev = prof.key_averages()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # the kernels alone
    dev_us = sum(e.device_time_total for e in kern) / calls
    kernels = len(kern) / calls
    print(f"  wall {wall:.3f} ms per call (profiled), GPU kernel time {dev_us / 1e3:.3f} ms, {kernels:.0f} kernels")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


def _fnl_step(name: str, kw: dict, device: torch.device, bs: int, dtype):
    import timm
    from timm.optim import create_optimizer_v2

    import fnl_timm  # noqa: F401
    torch.manual_seed(0)
    m = timm.create_model(name, **kw).to(device).to(memory_format=torch.channels_last)
    fnl_timm.mark_factors(m)
    opt = create_optimizer_v2(m, "fdmomentum" if kw else "momentum", lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(bs, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
    return m, opt, step


def bench_fd(device: torch.device, a) -> None:
    for key in a.models:
        name, kw = MODELS[key]
        m, _, step = _fnl_step(name, kw, device, a.batch_size, None)
        step()  # every factor has a gradient
        fd = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(m, 1e-4), lr=0.01, momentum=0.9), m, 1e-4)
        print(f"[fd] {name} {kw}: one Frobenius-decay gradient pass (fnl.FrobeniusDecay), fp32", flush=True)
        _profile_table(fd.apply_frobenius_decay, device, 10, 8)


def bench_profile(device: torch.device, a) -> None:
    for key in a.models:
        name, kw = MODELS[key]
        for label, kwargs in (("dense", {}), ("fnl", kw)):
            _, _, step = _fnl_step(name, kwargs, device, a.batch_size, torch.bfloat16)
            print(f"[profile] {name} {label} training step, bf16 autocast, channels-last, batch {a.batch_size}",
                  flush=True)
            _profile_table(step, device, 5, 14)


def bench_dispatches(device: torch.device, a) -> None:
    """Aten operations dispatched by one training step and one inference call, dense against factorized.

    Where a step is bound by the host launching kernels, its time follows these counts (each compute op
    is a kernel launch or more on a GPU; views cost host time too), not the multiply-adds. Counted on
    any device, the CPU included (the CPU's conv and BatchNorm paths are not the GPU's, so the counts
    differ a little between devices)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_fd import CountOps

    for key in a.models:
        name, kw = MODELS[key]
        for prec in a.precisions:
            dtype = {"bf16": torch.bfloat16, "fp32": None}[prec]
            counts = {}
            for label, kwargs in (("dense", {}), ("fnl", kw)):
                m, opt, step = _fnl_step(name, kwargs, device, 8, dtype)
                x = torch.randn(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)

                def infer(m=m, x=x):
                    m.eval()
                    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        m(x)
                    m.train()
                for what, fn in (("step", step), ("infer", infer)):
                    fn()  # first call: lazy state (optimizer buffers, cached weights)
                    with CountOps() as c:
                        fn()
                    counts[label, what] = (c.dispatches, c.count)
            for what in ("step", "infer"):
                (dd, dc), (fd, fc) = counts["dense", what], counts["fnl", what]
                print(f"[dispatches] {name} {prec} {what:<5}: dense {dd:5d} dispatches ({dc:5d} compute), fnl "
                      f"{fd:5d} ({fc:5d}): fnl/dense {fd / dd:.2f}x ({fc / dc:.2f}x compute)", flush=True)


def bench_compile(device: torch.device, a) -> None:
    """torch.compile(mode='reduce-overhead') of the model (CUDA graphs through inductor), the optimizer
    step (FD included) eager, against the eager step."""
    for key in a.models[:1]:
        name, kw = MODELS[key]
        fns = {}
        for label, kwargs in (("dense", {}), ("fnl", kw)):
            m, opt, step = _fnl_step(name, kwargs, device, a.batch_size, torch.bfloat16)
            fns[f"{label} eager"] = step
            cm = torch.compile(m, mode="reduce-overhead")
            x = torch.randn(a.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (a.batch_size,), device=device)

            def cstep(cm=cm, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(cm(x), y)
                loss.backward()
                opt.step()
            t0 = time.perf_counter()
            for _ in range(3):
                cstep()
            _sync(device)
            print(f"[compile] {name} {label}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            fns[f"{label} compiled"] = cstep
        t = timed(fns, device, a.iters, a.rounds)
        print(f"[compile] {name} bf16 training step ms: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        print(f"[compile] dense/fnl eager {t['dense eager'] / t['fnl eager']:.2f}x, compiled "
              f"{t['dense compiled'] / t['fnl compiled']:.2f}x; fnl compiled/eager speedup "
              f"{t['fnl eager'] / t['fnl compiled']:.2f}x", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available; on cpu nothing is graphed)")
    p.add_argument("--only", nargs="+", default=list(PARTS), choices=PARTS, help="parts to run (default: all)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models (default: all)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                   help="bf16: bfloat16 autocast; fp32: none (default: both)")
    p.add_argument("--graphs", action="store_true",
                   help="models part: also the steps captured in CUDA graphs (one run of them on an H200 ended "
                        "in an illegal memory access, not investigated; bench/README.md)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    p.add_argument("--iters", type=int, default=20, help="calls per timed round (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds, median kept (default: 3)")
    a = p.parse_args(argv)
    for k in ("batch_size", "iters", "rounds"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    for part in a.only:
        t0 = time.perf_counter()
        {"models": bench_models, "linear": bench_linear, "fd": bench_fd, "profile": bench_profile,
         "compile": bench_compile, "dispatches": bench_dispatches}[part](device, a)
        print(f"# part {part}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
