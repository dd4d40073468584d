"""The normalisation experiment (paper section 3.3; docs/method.md#normalisation-experiment).

A run with Frobenius decay records ``||U Vᵀ||_F`` of every factorized layer after every optimizer
step (``--dump-frobnorms``); a second run without FD rescales its factors after every step so that
each layer's product norm follows that recorded trajectory (``--normalize FILE``), isolating the
effect of the norm from that of the regulariser.
"""
from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn

from ._serialization import load_file
from .base import FactorizedLayer
from .export import atomic_path
from .frobenius import factorized_layers, frobenius_norm

__all__ = ["FrobeniusNormRecorder", "FrobeniusNormalizer", "load_frobnorms", "rescale_to_norm_"]

PathLike = Union[str, os.PathLike]


def _layers(model: nn.Module) -> list[FactorizedLayer]:
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("model has no factorized layers")
    return layers


class FrobeniusNormRecorder:
    """Records ``||U S Vᵀ||_F`` of every factorized layer, once per ``record()`` call.

    Norms stay on the device until ``norms()`` is called (no host sync per step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = _layers(model)
        self._steps: list[Tensor] = []

    @torch.no_grad()
    def record(self) -> None:
        """Record the current norms (call after each optimizer step)."""
        self._steps.append(torch.stack([frobenius_norm(layer).float() for layer in self.layers]))

    def __len__(self) -> int:
        return len(self._steps)

    def norms(self, steps_per_epoch: int) -> Tensor:
        """The recorded norms as a CPU float32 tensor [epochs, steps_per_epoch, layers]."""
        if steps_per_epoch < 1 or len(self._steps) % steps_per_epoch:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1 and divide the {len(self._steps)} "
                             "recorded steps")
        if not self._steps:
            raise ValueError("nothing recorded yet; call record() after each optimizer step")
        return torch.stack(self._steps).cpu().view(-1, steps_per_epoch, len(self.layers))

    def state_dict(self) -> dict:
        """The norms recorded so far (CPU), for checkpoints."""
        return {"norms": torch.stack(self._steps).cpu() if self._steps else torch.empty(0, len(self.layers))}

    def load_state_dict(self, state: dict) -> None:
        norms = state["norms"]
        if norms.dim() != 2 or norms.shape[1] != len(self.layers):
            raise ValueError(f"state['norms'] must have shape [steps, {len(self.layers)}], got {tuple(norms.shape)}")
        device = next(self.layers[0].parameters()).device
        self._steps = [row.to(device) for row in norms]

    def save(self, path: PathLike, steps_per_epoch: int) -> None:
        """Save ``norms(steps_per_epoch)`` with ``torch.save`` (written to a temporary file first)."""
        with atomic_path(path) as tmp:  # renamed over ``path`` on success, removed on error
            torch.save(self.norms(steps_per_epoch), tmp)


def load_frobnorms(path: PathLike, arg_name: str = "path") -> Tensor:
    """Load a [epochs, steps, layers] norm tensor saved by ``FrobeniusNormRecorder.save``.

    The file is read weights-only (a tensor needs nothing else): a file holding other Python objects
    is refused, and no code from it runs.

    Args:
        path: the file.
        arg_name: the argument that named it (``--normalize`` in fnl-train), for error messages.

    Raises:
        ValueError: missing, empty, a folder, truncated, not a torch file, holding Python objects
            other than a tensor, or a tensor of another shape.
    """
    norms = load_file(path, arg_name, hint="a norms file holds one tensor; save it with FrobeniusNormRecorder.save")
    if not isinstance(norms, Tensor) or norms.dim() != 3:
        what = f"a tensor of shape {tuple(norms.shape)}" if isinstance(norms, Tensor) else f"a {type(norms).__name__}"
        raise ValueError(f"{arg_name} {os.fspath(path)!r} holds {what}, not an [epochs, steps, layers] norm tensor")
    return norms


@torch.no_grad()
def rescale_to_norm_(layer: FactorizedLayer, target: Union[float, Tensor]) -> None:
    """Rescale the layer's factors so that its product has Frobenius norm ``target``.

    ``U`` and ``V`` are each scaled by ``sqrt(target / ||U S Vᵀ||_F)`` (tensor formats spread the
    scale over their cores): ``layer.scale_matrix_``.
    """
    norm = frobenius_norm(layer)
    layer.scale_matrix_(torch.as_tensor(target, dtype=torch.float32, device=norm.device) / norm)


class FrobeniusNormalizer:
    """Makes each factorized layer's product norm follow a recorded trajectory.

    Args:
        model: the model (its factorized layers, in ``modules()`` order, must match the recording).
        norms: a [epochs, steps, layers] tensor from ``FrobeniusNormRecorder`` / ``load_frobnorms``.

    Call ``step()`` after each optimizer step: step i rescales to the i-th recorded norms.
    """

    def __init__(self, model: nn.Module, norms: Tensor) -> None:
        self.layers = _layers(model)
        if norms.dim() != 3 or norms.shape[-1] != len(self.layers):
            raise ValueError(f"norms must have shape [epochs, steps, {len(self.layers)}] for this model's "
                             f"{len(self.layers)} factorized layers, got {tuple(norms.shape)}")
        self.targets = norms.reshape(-1, len(self.layers)).to(next(self.layers[0].parameters()).device)
        self.index = 0

    def step(self) -> None:
        if self.index >= len(self.targets):
            raise IndexError(f"the recorded trajectory has {len(self.targets)} steps; training ran longer")
        for layer, target in zip(self.layers, self.targets[self.index]):
            rescale_to_norm_(layer, target)
        self.index += 1

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
