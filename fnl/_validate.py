"""The one rule for the rank settings, shared by every entry point (docs/method.md#rank-settings).

The layers, ``fnl.factorize`` / ``tensorize`` / ``compress``, the timm models' keyword arguments,
``fnl-train`` / ``fnl-compress`` and the fairseq settings all check ``rank``, ``rank_scale`` and
``target_ratio`` here, so they accept and refuse the same values with the same message:

* ``rank``: an int >= 1 (not a bool).
* ``rank_scale``: a finite float > 0 (an int is accepted as a float). Above 1 is allowed for
  the matrix-product layers (overcomplete factors, the paper's deep distillation); the tensor
  formats need it in (0, 1] (their ranks cannot exceed the mode sizes). ``0`` is an error: a model
  stays dense by leaving all three settings unset (None), never by a zero scale.
* ``target_ratio``: a finite float > 0, the parameter ratio factorized / dense (above 1 for
  overcomplete ``square`` models); whether a given model can reach it is checked by the solvers,
  which name the reachable range.
* at most one of the three (exactly one where the caller needs a rank).

``name`` is how the caller spells the argument in its errors (``rank_scale``, ``--rank-scale``).
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["check_rank", "check_rank_choice", "check_rank_scale", "check_target_ratio"]

DENSE_HINT = "leave it unset for the dense model"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rank(value: object, name: str = "rank") -> int:
    """``value`` as a rank: an int >= 1.

    Raises:
        TypeError: not an int (a bool or float included).
        ValueError: an int below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def check_rank_scale(value: object, name: str = "rank_scale", at_most_one: bool = False) -> float:
    """``value`` as a rank_scale: a finite float > 0 (with ``at_most_one``, in (0, 1]).

    Raises:
        TypeError: not a number.
        ValueError: zero, negative, not finite, or above 1 with ``at_most_one``.
    """
    allowed = "a finite float in (0, 1]" if at_most_one else "a finite float > 0"
    if not _is_number(value):
        raise TypeError(f"{name} must be {allowed} ({DENSE_HINT}), got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0 or (at_most_one and value > 1):
        raise ValueError(f"{name} must be {allowed} ({DENSE_HINT}), got {value!r}")
    return float(value)


def check_target_ratio(value: object, name: str = "target_ratio") -> float:
    """``value`` as a target parameter ratio: a finite float > 0 (reachability is the solver's check).

    Raises:
        TypeError: not a number.
        ValueError: zero, negative or not finite.
    """
    if not _is_number(value):
        raise TypeError(f"{name} must be a finite float > 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_rank_choice(rank: object = None, rank_scale: object = None, target_ratio: object = None, *,
                      required: bool = False, names: tuple[str, str, str] = ("rank", "rank_scale", "target_ratio"),
                      at_most_one: bool = False) -> Optional[str]:
    """Check each given setting and that at most one (``required``: exactly one) is given.

    Args:
        rank, rank_scale, target_ratio: the settings, None when not given.
        required: one of them must be given.
        names: how the caller spells the three arguments.
        at_most_one: ``rank_scale`` must be <= 1 (the tensor formats).

    Returns:
        The name (from ``names``) of the one given, or None.
    """
    if rank is not None:
        check_rank(rank, names[0])
    if rank_scale is not None:
        check_rank_scale(rank_scale, names[1], at_most_one)
    if target_ratio is not None:
        check_target_ratio(target_ratio, names[2])
    given = [n for n, v in zip(names, (rank, rank_scale, target_ratio)) if v is not None]
    if len(given) > 1 or (required and not given):
        raise ValueError(f"give {'exactly' if required else 'at most'} one of {', '.join(names[:-1])} or {names[-1]}; got "
                         + (", ".join(f"{n}={v!r}" for n, v in zip(names, (rank, rank_scale, target_ratio))
                                      if v is not None) or "none"))
    return given[0] if given else None
