"""Loading timm / fnl-train checkpoints with ``torch.load(weights_only=True)``.

timm's ``CheckpointSaver`` stores the run's ``argparse.Namespace``; that one type is allowed while
loading. torch's ``safe_globals`` context removes its globals on exit even when they were
registered before (as the fairseq plugin does at import), so it is only entered when the type is
not allowed already.
"""
import argparse
from contextlib import AbstractContextManager, nullcontext

import torch


def allow_argparse_namespace() -> AbstractContextManager:
    """A context in which ``weights_only`` loads accept ``argparse.Namespace``, leaving existing registrations in place."""
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return nullcontext()
    return torch.serialization.safe_globals([argparse.Namespace])
