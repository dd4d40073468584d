"""Factorized fully-connected layer (paper section 2; docs/method.md#linear).

``y = (x V) Uᵀ + b`` (with ``square``: ``y = (x V) (U S)ᵀ + b``): two matmuls, ``W`` is never formed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import InitFn, LowRankLayer, check_positive_int, resolve_rank

__all__ = ["FactorizedLinear"]


class FactorizedLinear(LowRankLayer):
    """A linear layer with weight ``U Vᵀ`` (out x in), rank ``r``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        rank: the rank r, an int >= 1 (exactly one of rank / rank_scale).
        rank_scale: r = max(1, round(rank_scale * min(in_features, out_features))).
        square: add an (r x r) factor S initialised to the identity (deep distillation).
        spectral: initialise the dense weight with ``init`` and factorize it by SVD.
        init: in-place init function; applied to the dense (out x in) weight when ``spectral``,
            else (the paper's default-init baseline, as in its reference code) to each factor as
            the weight of the layer it acts as: ``Vᵀ`` of an in -> r layer (fan-in ``in``) and ``U``
            of an r -> out layer (fan-in ``r``). None is torch's ``nn.Linear`` init
            (Kaiming-uniform, a=sqrt(5)) with those fan-ins.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            *,
            rank: Optional[int] = None,
            rank_scale: Optional[float] = None,
            square: bool = False,
            spectral: bool = False,
            init: Optional[InitFn] = None,
            device: Optional[torch.device | str] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        r = resolve_rank(rank, rank_scale, min(in_features, out_features))
        self.spectral = bool(spectral)
        self.init = init
        self._create_factors(out_features, in_features, r, bool(square), factory_kwargs)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        u = self.U if self.S is None else self.U @ self.S  # (out, r)
        h = x @ self.V  # (..., r)
        return F.linear(h, u, self.bias)  # (..., out)

    # --- layout --------------------------------------------------------------------------------
    def _dense_weight_shape(self) -> Sequence[int]:
        return (self.out_features, self.in_features)

    def _matrix_from_weight(self, weight: Tensor) -> Tensor:
        return weight

    def _weight_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix

    def _dense_fan_in(self) -> int:
        return self.in_features

    def _torch_default_init_(self, weight: Tensor) -> None:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _default_init_(self) -> None:
        # each factor initialised as the weight of the linear layer it acts as: Vᵀ (r x in), U (out x r)
        init = self.init or self._torch_default_init_
        init(self.V.T)
        init(self.U)

    # --- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Linear, *, rank: Optional[int] = None, rank_scale: Optional[float] = None,
                   square: bool = False) -> "FactorizedLinear":
        """Spectral factorisation of a (trained) ``nn.Linear``: the best rank-r approximation."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, rank=rank, rank_scale=rank_scale,
                  square=square, device=w.device, dtype=w.dtype)
        new.set_from_weight_(w)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def inference_form(self) -> nn.Sequential:
        """``nn.Sequential(nn.Linear(in, r, bias=False), nn.Linear(r, out))`` with weights ``Vᵀ`` and ``U S``."""
        u = self.U if self.S is None else self.U @ self.S
        dev, dtype = self.U.device, self.U.dtype
        first = nn.Linear(self.in_features, self.rank, bias=False, device=dev, dtype=dtype)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, device=dev, dtype=dtype)
        with torch.no_grad():
            first.weight.copy_(self.V.T)
            second.weight.copy_(u)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    # --- counts --------------------------------------------------------------------------------
    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds for one sample whose input has shape ``input_shape`` (..., in_features).

        With ``square``, the once-per-call product ``U S`` is not counted (it is not per sample).
        """
        return math.prod(input_shape[:-1]) * self.rank * (self.in_features + self.out_features)

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of the dense layer for the same input."""
        return math.prod(input_shape[:-1]) * self.in_features * self.out_features

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, {self._extra_repr_common()}"
        if self.bias is None:
            s += ", bias=False"
        return s
