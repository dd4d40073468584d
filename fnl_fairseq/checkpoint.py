"""Loading fairseq checkpoints under ``torch.load(weights_only=True)`` (torch >= 2.6).

fairseq 0.12 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, which refuses every non-tensor, non-container type in the pickle. fairseq
saves its config as plain containers (``OmegaConf.to_container``), except for the legacy
models' argument namespace (``cfg.model``, an ``argparse.Namespace``), and
``torch.serialization.get_unsafe_globals_in_checkpoint`` lists exactly that one type for the
checkpoints this plugin writes (fp32, --amp, --memory-efficient-fp16, with and without the FD
optimizers' state). So that one type is allowed, once, at plugin import, rather than turning
``weights_only`` off for the whole process.
"""
from __future__ import annotations

import argparse

import torch

__all__ = ["SAFE_GLOBALS", "register_safe_globals"]

SAFE_GLOBALS: list = [argparse.Namespace]


def register_safe_globals() -> None:
    """Allow the types fairseq checkpoints hold in ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


register_safe_globals()
