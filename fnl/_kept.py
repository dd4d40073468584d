"""Keys of the weights kept between eager inference calls (docs/speed.md#what-is-on-by-default).

A factorized conv keeps its two conv weights, and :func:`fnl.conv_bn` its folded weights, from one
inference call to the next; :func:`version_key` says, host-side and without a device
synchronisation, whether the tensors they were made from may have changed since:

* **in-place updates** bump a tensor's version counter (``load_state_dict``, ``p.mul_()``, the
  foreach and for-loop optimizers). torch's fused optimizers (``fused=True``) update the parameters
  without bumping it, so every optimizer step (any ``torch.optim.Optimizer``, through torch's global
  step hook) also advances a step count that is part of the key;
* **replaced tensors** (a new parameter, ``torch.func.functional_call``) are told apart by a weak
  reference to each tensor, not by ``id()`` and address, which a new tensor can reuse once the old
  one is freed;
* **moved or cast tensors** change device or dtype.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["Ref", "version_key"]

_STEPS = [0]


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class Ref:
    """Equal to another ``Ref`` only while both refer to the same live object (a weak reference, so that
    a key never keeps a tensor or module alive, and a new object at a freed one's address never matches)."""

    __slots__ = ("ref",)

    def __init__(self, obj: Any) -> None:
        self.ref = weakref.ref(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ref):
            return NotImplemented
        target = self.ref()
        return target is not None and target is other.ref()

    __hash__ = None  # type: ignore[assignment]


def version_key(tensors: Iterable[Optional[torch.Tensor]]) -> Optional[tuple]:
    """A host-side key that changes when any of ``tensors`` (None allowed) is changed in place, stepped by
    an optimizer, replaced, moved or cast (see the module docstring); no device synchronisation. None where
    one of them is an inference tensor (made under ``torch.inference_mode``): those have no version
    counter, so nothing made from them can be kept."""
    tensors = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in tensors):
        return None
    return (_STEPS[0],) + tuple((Ref(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
