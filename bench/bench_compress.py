"""Latency of a compressed resnet50 against the original, next to the multiply-add ratio (issue 6).

    python bench/bench_compress.py [--device cpu|cuda] [--batch-sizes 1 32] [--target-ratio 0.3]
                                   [--repeats 5] [--fold-bn] [--compile] [--measure] [--json out.json]
                                   [--allocators default cached]

timm's ``resnet50`` with random weights (timing only) is compressed with ``fnl.compress`` at a
whole-model parameter ratio of 0.3 (energy allocation, ranks rounded to multiples of 8, stem and
classifier dense). Variants: ``factorized`` (the fnl layers, as fine-tuned), ``inference`` (each
factorized layer as two plain torch layers, ``fnl.to_inference_form``) and ``fastest@B`` (per layer,
two plain layers or one collapsed dense layer, whichever ``fnl.select_fastest_paths`` measured
faster at the largest batch size); with ``--fold-bn`` also original and inference with BatchNorm
folded into the preceding convs (``fnl.fold_batchnorm``), each compared with the folded original; with
``--compile`` also both through ``torch.compile`` (inductor with freezing: BatchNorm folded and the
elementwise ops fused), compared with the compiled original.
``--measure`` adds ``fnl.compress(measure=True)``: ranks solved again after the layers measured
slower factorized are kept dense (with their original weights).

All variants run side by side in one process, interleaved (a, b, a, b, ...) with the median
taken, in the default (NCHW) and channels-last memory formats; on the CPU first with glibc's
default malloc, then again after ``fnl.cache_cpu_allocations()`` (freed memory kept for reuse, as
jemalloc / tcmalloc do: glibc's default page-faults every large activation in again on each
forward, a cost both models pay per activation byte; see ``fnl/runtime.py``). The target: at batch 32, the
measured speedup is at least 0.6 x the multiply-add speedup. The load average is printed: on a
shared machine the numbers move with it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import fnl


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default: 1 32)")
    p.add_argument("--target-ratio", type=float, default=0.3,
                   help="whole-model parameter ratio fnl.compress aims at (default: 0.3)")
    p.add_argument("--rank-multiple", type=int, default=8,
                   help="ranks are rounded up to a multiple of this (default: 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model, the median is kept (default: 5)")
    p.add_argument("--formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"],
                   help="memory formats to time (default: both)")
    p.add_argument("--measure", action="store_true", help="also the per-layer measured variant (at the largest batch)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--model", default="resnet50", help="timm model name (resnet50 is the issue's benchmark)")
    p.add_argument("--fold-bn", action="store_true",
                   help="also original and inference with BatchNorm folded into the convs (torch.fx fuse)")
    p.add_argument("--compile", action="store_true",
                   help="also original and inference through torch.compile (inductor, freezing), compiled per format")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--allocators", nargs="+", default=["default", "cached"], choices=["default", "cached"],
                   help="CPU: time with glibc's default malloc, then with fnl.cache_cpu_allocations() (freed "
                        "memory kept for reuse, as jemalloc/tcmalloc do); ignored on CUDA")
    args = p.parse_args()

    import timm  # the benchmark model; the core itself does not import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {_load()}")
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    start = time.perf_counter()
    compressed, report = fnl.compress(model, target_ratio=args.target_ratio, input_size=(3, 224, 224),
                                      rank_multiple=args.rank_multiple)
    print(f"compress: {time.perf_counter() - start:.1f} s; params x{report.param_ratio:.4f} "
          f"(target {args.target_ratio}), MACs x{report.macs_ratio:.4f} -> MAC speedup x{1 / report.macs_ratio:.2f}; "
          f"{len(report.ranks)} layers factorized")
    variants = {"original": model, "factorized": compressed}
    inference = fnl.to_inference_form(copy.deepcopy(compressed))
    variants["inference"] = inference
    big = max(args.batch_sizes)
    start = time.perf_counter()
    fastest = copy.deepcopy(compressed)
    paths = fnl.select_fastest_paths(fastest, torch.zeros(1, 3, 224, 224, device=device), batch_size=big, repeats=3)
    print(f"select_fastest_paths at batch {big}: {time.perf_counter() - start:.1f} s; "
          f"{sum(not p['kept'] for p in paths.values())} of {len(paths)} layers collapsed to dense")
    variants[f"fastest@{big}"] = fastest
    if args.measure:
        start = time.perf_counter()
        measured, mreport = fnl.compress(model, target_ratio=args.target_ratio, input_size=(3, 224, 224),
                                         rank_multiple=args.rank_multiple, measure=True, batch_size=big, repeats=3)
        kept = sum("measured not faster" in d.reason for d in mreport.layers)
        print(f"compress(measure=True) at batch {big}: {time.perf_counter() - start:.1f} s; params "
              f"x{mreport.param_ratio:.4f}; {kept} layers kept dense by measurement")
        variants["measured"] = fnl.to_inference_form(measured)
    baseline = {k: "original" for k in variants}
    if args.fold_bn:  # the usual deployment step, applied to both sides: BatchNorm folded into the conv before it
        variants["original+fold"] = fnl.fold_batchnorm(model)
        variants["inference+fold"] = fnl.fold_batchnorm(inference)
        baseline.update({"original+fold": "original+fold", "inference+fold": "original+fold"})
    compiled = {}
    if args.compile:  # inductor with freezing: BatchNorm folded, elementwise ops fused into the convs
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        for name in ("original", "inference"):
            compiled[f"{name}+compile"] = torch.compile(variants[name])
        baseline.update({"original+compile": "original+compile", "inference+compile": "original+compile"})
    dense_macs = fnl.count_macs(model, (3, 224, 224))
    mac_ratio = {k: fnl.count_macs(v, (3, 224, 224)) / dense_macs for k, v in variants.items()}
    for k in compiled:  # the compiled programs run the same layers as their eager models
        mac_ratio[k] = mac_ratio[k.split("+")[0]]
    variants.update(compiled)
    mac_ratio = {k: v / mac_ratio[baseline[k]] for k, v in mac_ratio.items()}
    param_ratio = {k: fnl.count_parameters(v) / fnl.count_parameters(model) for k, v in variants.items()
                   if k not in compiled}
    print("MAC ratio: " + ", ".join(f"{k} {v:.4f}" for k, v in mac_ratio.items()))
    print("param ratio: " + ", ".join(f"{k} {v:.4f}" for k, v in param_ratio.items()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every variant gets cuDNN's best algorithm for its shapes

    results = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "param_ratio": param_ratio, "macs_ratio": mac_ratio, "runs": []}
    allocators = args.allocators if device.type == "cpu" else ["cuda"]
    if allocators == ["cached", "default"]:
        raise SystemExit("--allocators: give default before cached (the setting cannot be undone in-process)")
    with torch.no_grad():
        for allocator in allocators:
            if allocator == "cached":
                fnl.cache_cpu_allocations()
            for batch in args.batch_sizes:
                for fmt in args.formats:
                    memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                    nets = {k: v.to(memory_format=memory) for k, v in variants.items()}
                    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=memory)
                    load_before = _load()
                    times = fnl.measure_latency([lambda n=n: n(x) for n in nets.values()], device,
                                                repeats=args.repeats, warmup=1)
                    ms = dict(zip(nets, times))
                    for name in nets:
                        base = baseline[name]
                        if name == base:
                            continue
                        speedup = ms[base] / ms[name]
                        mac_speedup = 1 / mac_ratio[name]
                        row = {"allocator": allocator, "batch": batch, "format": fmt, "variant": name,
                               "baseline": base, "original_ms": ms[base], "compressed_ms": ms[name],
                               "speedup": speedup, "mac_speedup": mac_speedup,
                               "fraction_of_mac_speedup": speedup / mac_speedup, "load": [load_before, _load()]}
                        results["runs"].append(row)
                        row["fraction_of_compressed_mac_speedup"] = speedup * mac_ratio["factorized"]
                        other = "" if abs(mac_ratio[name] - mac_ratio["factorized"]) < 1e-9 else \
                            (f" ({row['fraction_of_compressed_mac_speedup']:.2f} of the compressed model's "
                             f"x{1 / mac_ratio['factorized']:.2f}: collapsed layers cost their dense MACs)")
                        print(f"{allocator:7s} batch {batch:3d} {fmt:13s} {name:14s}: {base} {ms[base]:9.2f} ms, "
                              f"compressed {ms[name]:9.2f} ms, speedup x{speedup:.2f} vs MAC speedup "
                              f"x{mac_speedup:.2f} -> {speedup / mac_speedup:.2f} of it{other} (target >= 0.6 at "
                              f"batch 32); {_load()}")
    for name, net in variants.items():  # models restored to the default format for any later use
        net.to(memory_format=torch.contiguous_format)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
