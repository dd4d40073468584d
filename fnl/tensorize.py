"""Whole models in tensor formats: ``tensorize`` and ``solve_tensor_scale`` (paper section 4, the tensor
comparison; docs/method.md#tensor-formats).

Every ``nn.Conv2d`` of a model (groups 1, zero numeric padding) becomes a ``TTConv2d`` or
``TuckerConv2d``; the scale s of the rank rules is given or solved from a whole-model parameter
ratio on analytic counts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._validate import check_target_ratio
from .base import InitFn
from .model import Selector, _all_names, _candidates, _closest_scale, _replace, count_parameters
from .tensor_conv import TensorConv2d, TTConv2d, TuckerConv2d
from .tensor_decompositions import (
    NUM_MODES, RankArg, _check_scale, _tt_ranks_from_scale, _tucker_ranks_from_scale, tensor_modes,
)

__all__ = ["solve_tensor_scale", "tensorize"]


_FORMATS = {"tt": TTConv2d, "tucker": TuckerConv2d}


def _format_class(tensor_format: str) -> type[TensorConv2d]:
    if tensor_format not in _FORMATS:
        raise ValueError(f"tensor_format must be one of {tuple(_FORMATS)}, got {tensor_format!r}")
    return _FORMATS[tensor_format]


def _layer_count(tensor_format: str, conv: nn.Conv2d, scale: float) -> int:
    """Parameters of the tensor layer replacing ``conv`` at scale ``scale`` (analytic)."""
    o, i = tensor_modes(conv.out_channels, conv.in_channels)
    n = [a * b for a, b in zip(o, i)]
    kh, kw = conv.kernel_size
    total = (conv.in_channels * kh * kw if (kh, kw) != (1, 1) else 0) + (conv.out_channels if conv.bias is not None else 0)
    if tensor_format == "tt":
        r = (1, *_tt_ranks_from_scale(n, scale), 1)
        return total + sum(r[k] * n[k] * r[k + 1] for k in range(NUM_MODES))
    r = _tucker_ranks_from_scale(n, scale)
    return total + math.prod(r) + sum(a * b for a, b in zip(n, r))


def _tensor_candidates(model: nn.Module, include: Selector, exclude: Selector) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in _candidates(model, include, exclude, False)
            if isinstance(m, nn.Conv2d) and not isinstance(m.padding, str)]


def solve_tensor_scale(model: nn.Module, target_ratio: float, tensor_format: str, *, include: Selector = None,
                       exclude: Selector = None) -> float:
    """The scale s whose whole-model parameter ratio (tensorized / dense) is closest to ``target_ratio``.

    Same rules as ``fnl.solve_rank_scale`` (all parameters count, analytic counts, the model is
    not modified), for the convs ``tensorize`` would replace with derived modes; s in (0, 1].
    """
    _format_class(tensor_format)
    check_target_ratio(target_ratio)
    convs = [m for _, m in _tensor_candidates(model, include, exclude)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d to tensorize, so no target_ratio can be reached")
    dense_total = count_parameters(model, dense=True)
    fixed = dense_total - sum(sum(p.numel() for p in m.parameters()) for m in convs)

    def ratio(s: float) -> float:
        return (fixed + sum(_layer_count(tensor_format, m, s) for m in convs)) / dense_total

    lowest, highest = ratio(1e-9), ratio(1.0)
    if not lowest <= target_ratio <= highest:
        raise ValueError(f"target_ratio={target_ratio} cannot be reached with tensor_format={tensor_format!r}: "
                         f"this model's ratios run from {lowest:.6g} (every rank 1) to {highest:.6g} (scale 1.0)")
    return _closest_scale(ratio, target_ratio, lo=1e-9)


def tensorize(
        model: nn.Module,
        *,
        tensor_format: str = "tt",
        rank: RankArg = None,
        rank_scale: Optional[float] = None,
        target_ratio: Optional[float] = None,
        spectral: bool = False,
        from_dense: bool = False,
        include: Selector = None,
        exclude: Selector = None,
        init: Optional[InitFn] = None,
        depthwise_init: Optional[InitFn] = None,
) -> nn.Module:
    """Replace the model's ``nn.Conv2d`` (groups 1, zero numeric padding) by tensor-format convs, in place.

    Args:
        model: any module.
        tensor_format: ``'tt'`` or ``'tucker'``.
        rank: explicit ranks for every layer (exactly one of rank / rank_scale / target_ratio).
        rank_scale: the scale s of the rank rules (docs/method.md#tensor-formats), in (0, 1].
        target_ratio: a whole-model parameter ratio; s is solved by ``solve_tensor_scale``.
        spectral: new layers get the spectral init of a freshly initialised dense 1x1 matrix
            (TT-SVD / HOSVD of ``init``'s draw), the depthwise filters ``depthwise_init``.
        from_dense: instead, project the weights already in the convs (for a trained model; see
            ``TensorConv2d.from_dense``); excludes ``spectral``.
        include, exclude: as in ``fnl.factorize``.
        init, depthwise_init: as in ``TensorConv2d``.
    """
    cls = _format_class(tensor_format)
    if sum(x is not None for x in (rank, rank_scale, target_ratio)) != 1:  # rank may be one int per rank
        raise ValueError(f"give exactly one of rank, rank_scale or target_ratio; got rank={rank!r}, "
                         f"rank_scale={rank_scale!r}, target_ratio={target_ratio!r}")
    if spectral and from_dense:
        raise ValueError("spectral and from_dense exclude each other: spectral decomposes a fresh dense init, "
                         "from_dense the weights already in the model")
    if target_ratio is not None:
        rank_scale = solve_tensor_scale(model, target_ratio, tensor_format, include=include, exclude=exclude)
    elif rank_scale is not None:
        _check_scale(rank_scale)
    candidates = _tensor_candidates(model, include, exclude)
    if include is not None and not candidates:
        raise ValueError(f"include={include!r} selects no nn.Conv2d that tensorize converts (groups 1, "
                         "padding_mode 'zeros', numeric padding)")
    done: dict[int, nn.Module] = {}
    for name, module in candidates:
        if id(module) in done:
            continue
        if from_dense:
            new = cls.from_dense(module, rank=rank, rank_scale=rank_scale)
        else:
            w = module.weight
            new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.dilation, 1, module.bias is not None, rank=rank, rank_scale=rank_scale,
                      spectral=spectral, init=init, depthwise_init=depthwise_init, device=w.device, dtype=w.dtype)
            if module.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(module.bias)
        done[id(module)] = new
        for alias in _all_names(model, module):
            _replace(model, alias, new)
    return model
