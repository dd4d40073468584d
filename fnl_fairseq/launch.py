"""Multi-process ``fairseq-train`` on one machine, CPU or GPU: ``python -m fnl_fairseq.launch``.

fairseq's own launcher assumes one GPU per process. This one runs ``torchrun --standalone`` over
N worker processes, each of which calls ``fairseq-train`` with its rank from torchrun's
environment (``--distributed-rank $RANK --device-id $LOCAL_RANK``) and env:// initialisation.
With ``--cpu`` it also picks the gloo backend and ``--ddp-backend legacy_ddp`` (unless given)::

    python -m fnl_fairseq.launch --nproc-per-node 2 -- DATA --user-dir $(python -m fnl_fairseq) \\
        --arch fnl_transformer_small --optimizer fd_nag ... --cpu

Everything after ``--`` is passed to ``fairseq-train``; ``--max-tokens`` is per process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main", "worker_argv"]

_WORKER_FLAG = "--fnl-worker"


def _has(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def worker_argv(train_args: Sequence[str], rank: int, local_rank: int, world_size: int) -> list[str]:
    """``fairseq-train`` arguments for one worker of a ``world_size``-process run."""
    for flag in ("--distributed-rank", "--device-id", "--distributed-world-size", "--distributed-init-method"):
        if _has(train_args, flag):
            raise ValueError(f"{flag} is set by fnl_fairseq.launch from torchrun's environment; remove it")
    argv = list(train_args) + [
        "--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
        "--device-id", str(local_rank), "--distributed-init-method", "env://", "--distributed-no-spawn",
    ]
    if _has(train_args, "--cpu"):
        if not _has(train_args, "--distributed-backend"):
            argv += ["--distributed-backend", "gloo"]
        if not _has(train_args, "--ddp-backend"):
            argv += ["--ddp-backend", "legacy_ddp"]
    return argv


# A worker's program. ``fairseq_cli.train`` gives fairseq-train its log format (``2026-01-01 12:00:00 |
# INFO | fairseq_cli.train | ...``) with a ``logging.basicConfig`` when it is imported, which does nothing
# once the root logger has a handler; importing this package imports fairseq modules that install
# logging's default one (``INFO:fairseq...`` lines). So the worker imports ``fairseq_cli.train`` first.
_WORKER_CODE = "import sys; import fairseq_cli.train; from fnl_fairseq.launch import main; sys.exit(main())"


def _worker(train_args: list[str]) -> None:
    from fairseq_cli import train

    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise RuntimeError(f"{_WORKER_FLAG} runs under torchrun; {', '.join(missing)} not set")
    sys.argv = ["fairseq-train"] + worker_argv(train_args, int(env["RANK"]), int(env["LOCAL_RANK"]),
                                               int(env["WORLD_SIZE"]))
    train.cli_main()


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own options (those before ``--``)."""
    parser = argparse.ArgumentParser(
        prog="fnl-fairseq-train",
        usage="%(prog)s [--nproc-per-node N] -- DATA --user-dir $(python -m fnl_fairseq) [fairseq-train options]",
        description="Run fairseq-train in N local processes under torchrun (CPU with gloo, or one GPU each). "
                    "Arguments after '--' go to fairseq-train ('-- --help' lists them); "
                    "also run as python -m fnl_fairseq.launch.")
    parser.add_argument("--nproc-per-node", type=int, default=2, metavar="N",
                        help="number of training processes (default 2)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == _WORKER_FLAG:
        _worker(argv[1:])
        return 0
    if "--" in argv:
        split = argv.index("--")
        own, train_args = argv[:split], argv[split + 1:]
    elif argv[:1] in (["-h"], ["--help"]):  # the launcher's help; fairseq-train's is "-- --help"
        own, train_args = argv, []
    else:
        own, train_args = [], argv
    parser = build_parser()
    opts = parser.parse_args(own)
    from fnl_fairseq import require_fairseq

    require_fairseq(parser.prog)
    if opts.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {opts.nproc_per_node}")
    if not train_args:
        parser.error("no fairseq-train arguments given (put them after '--')")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.nproc_per_node}",
           "--no-python", sys.executable, "-u", "-c", _WORKER_CODE, _WORKER_FLAG] + train_args
    env = dict(os.environ)
    # make this package importable by the workers wherever it lives
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
