"""``fnl-train`` eager against ``--torchcompile``, end to end, side by side in one run.

Each variant trains ``fnl_resnet20`` @0.111 (spectral init, Frobenius decay) for 1 and for
``--epochs`` epochs in fresh processes (``python -m fnl_timm.train``); the difference of the two
``train_seconds`` (results.json) over the extra epochs is the steady time per epoch, without the
compile time of the first steps (a compiled variant first runs one untimed step, which fills
inductor's on-disk cache: both timed runs then load the same compiled graphs). Prints each run's exit status, its last top-1 and times; a run that
fails prints the last lines of its log. For a GPU session (``bash bench/gpu_checks.sh
bench_train_cli``); it runs on the CPU too (``--device cpu --limit-train-batches 2``, to check it).

Data: scikit-learn's digits where scikit-learn imports, else a generated folder dataset (random
images, 10 classes: the times mean something, the accuracy does not).

    python bench/bench_train_cli.py --device cuda
    python bench/bench_train_cli.py --device cpu --epochs 2 --limit-train-batches 2 --variants eager
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = {
    "eager": [],
    "compile": ["--torchcompile"],
    "compile-reduce-overhead": ["--torchcompile", "--torchcompile-mode", "reduce-overhead"],
}


def _data_args(root: str) -> list[str]:
    """digits where scikit-learn imports, else a small generated folder dataset under ``root``."""
    try:
        import sklearn  # noqa: F401
        return ["--dataset", "digits"]
    except ImportError:
        pass
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 128), ("val", 16)):
        for c in range(10):
            folder = os.path.join(root, "data", split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f"{i}.png"))
    return ["--dataset", "folder", "--data-dir", os.path.join(root, "data"), "--img-size", "32"]


def _run(args: argparse.Namespace, extra: list[str], epochs: int, out: str, data: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fnl_timm.train", "--model", "fnl_resnet20", "--rank-scale", "0.111", "--spectral",
           "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--device", args.device,
           "--output", out, "--no-progress", "--no-tensorboard", *data, *extra]
    if args.amp:
        cmd.append("--amp")
    if args.limit_train_batches:
        cmd += ["--limit-train-batches", str(args.limit_train_batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res: dict = {"rc": proc.returncode}
    found = [os.path.join(d, "results.json") for d, _, files in os.walk(out) if "results.json" in files]
    if proc.returncode == 0 and found:
        with open(found[0]) as f:
            res.update(json.load(f))
    else:
        res["tail"] = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the longer run of each variant (>= 2)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--amp", action="store_true", help="pass --amp to fnl-train")
    p.add_argument("--limit-train-batches", type=int, default=None, help="steps per epoch (default: all)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                   help="variants to run (default: all)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error(f"--epochs must be >= 2, got {args.epochs}")
    with tempfile.TemporaryDirectory() as root:
        data = _data_args(root)
        print(f"[train_cli] fnl_resnet20 @0.111, {args.device}, batch {args.batch_size}, amp {args.amp}, data "
              f"{data[1]}", flush=True)
        steady = {}
        for name in args.variants:
            if name != "eager":  # untimed: fills inductor's on-disk cache, so both timed runs load the same graphs
                warm = argparse.Namespace(**{**vars(args), "limit_train_batches": 1})
                _run(warm, VARIANTS[name], 1, os.path.join(root, f"{name}-warm"), data)
            runs = {e: _run(args, VARIANTS[name], e, os.path.join(root, f"{name}-{e}"), data) for e in (1, args.epochs)}
            for e, r in runs.items():
                if r["rc"]:
                    print(f"[train_cli] {name}, {e} epoch(s): exit {r['rc']}\n{r['tail']}", flush=True)
                else:
                    print(f"[train_cli] {name}, {e} epoch(s): top1 {r['top1']:.2f}, train {r['train_seconds']:.1f} s",
                          flush=True)
            if all(r["rc"] == 0 for r in runs.values()):
                steady[name] = (runs[args.epochs]["train_seconds"] - runs[1]["train_seconds"]) / (args.epochs - 1)
                print(f"[train_cli] {name}: {steady[name]:.2f} s per epoch after the first", flush=True)
        if "eager" in steady:
            for name, t in steady.items():
                if name != "eager":
                    print(f"[train_cli] {name} / eager: {steady['eager'] / t:.2f}x faster per epoch")


if __name__ == "__main__":
    main()
