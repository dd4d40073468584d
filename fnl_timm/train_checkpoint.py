"""``fnl-train``'s checkpoints: timm's CheckpointSaver with the FNL state."""
from typing import Any

import torch
from timm.utils import CheckpointSaver

from ._serialization import allow_argparse_namespace


class _Saver(CheckpointSaver):
    """timm's CheckpointSaver, plus the FNL state (recorded Frobenius norms) in each checkpoint."""

    def __init__(self, *args: Any, extra_state=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state

    def _save(self, save_path, epoch, metric=None):
        super()._save(save_path, epoch, metric)
        extra = self.extra_state() if self.extra_state is not None else None
        if extra:
            with allow_argparse_namespace():
                state = torch.load(save_path, map_location='cpu', weights_only=True)
            state['fnl'] = extra
            torch.save(state, save_path)
