"""Factorized embedding table (paper section 2; docs/method.md#embedding).

``E = U Vᵀ``: look up rows of ``U`` (vocab x r), then multiply by ``Vᵀ`` (r x dim).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import InitFn, LowRankLayer, check_positive_int, resolve_rank

__all__ = ["FactorizedEmbedding"]


class FactorizedEmbedding(LowRankLayer):
    """An embedding table ``E = U Vᵀ`` (num_embeddings x embedding_dim) of rank r.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: size of each embedding vector.
        padding_idx: row kept at zero and not trained (as in ``nn.Embedding``).
        rank: the rank r, an int >= 1 (exactly one of rank / rank_scale).
        rank_scale: r = max(1, round(rank_scale * min(num_embeddings, embedding_dim))).
        square: add an (r x r) factor S initialised to the identity.
        spectral: initialise the dense table with ``init`` and factorize it by SVD.
        init: in-place init function; applied to the dense table when ``spectral``, else to each
            factor. None is ``nn.Embedding``'s N(0, 1) for the table, and for the factors N(0, 1)
            on U and N(0, 1/r) on V, so the product has unit variance like the dense table.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
            self,
            num_embeddings: int,
            embedding_dim: int,
            padding_idx: Optional[int] = None,
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
        self.num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        self.padding_idx = padding_idx
        r = resolve_rank(rank, rank_scale, min(num_embeddings, embedding_dim))
        self.spectral = bool(spectral)
        self.init = init
        self._create_factors(num_embeddings, embedding_dim, r, bool(square), factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._zero_padding_row()

    def _zero_padding_row(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.U[self.padding_idx].zero_()

    def forward(self, idx: Tensor) -> Tensor:
        h = F.embedding(idx, self.U, self.padding_idx)  # (..., r)
        v = self.V if self.S is None else self.V @ self.S.T  # (dim, r)
        return F.linear(h, v)  # (..., dim)

    # --- layout --------------------------------------------------------------------------------
    def _dense_weight_shape(self) -> Sequence[int]:
        return (self.num_embeddings, self.embedding_dim)

    def _matrix_from_weight(self, weight: Tensor) -> Tensor:
        return weight

    def _weight_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix

    def _dense_fan_in(self) -> int:
        return self.embedding_dim

    def _torch_default_init_(self, weight: Tensor) -> None:
        nn.init.normal_(weight)

    def _default_init_(self) -> None:
        if self.init is not None:
            self.init(self.U)
            self.init(self.V)
        else:
            nn.init.normal_(self.U)
            nn.init.normal_(self.V, std=1 / math.sqrt(self.rank))

    def set_from_weight_(self, weight: Tensor) -> None:
        super().set_from_weight_(weight)
        self._zero_padding_row()

    # --- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Embedding, *, rank: Optional[int] = None, rank_scale: Optional[float] = None,
                   square: bool = False) -> "FactorizedEmbedding":
        """Spectral factorisation of a (trained) ``nn.Embedding``: the best rank-r approximation."""
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"layer must be an nn.Embedding, got {type(layer).__name__}")
        for attr, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(layer, attr) != default:
                raise ValueError(f"layer.{attr}={getattr(layer, attr)!r} is not supported by FactorizedEmbedding "
                                 f"(only {default!r})")
        w = layer.weight
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, rank=rank, rank_scale=rank_scale,
                  square=square, device=w.device, dtype=w.dtype)
        new.set_from_weight_(w)
        return new

    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` computing the same function."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                             device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
        return dense

    def inference_form(self) -> nn.Sequential:
        """``nn.Sequential(nn.Embedding(vocab, r), nn.Linear(r, dim, bias=False))`` with weights ``U`` and ``V Sᵀ``."""
        v = self.V if self.S is None else self.V @ self.S.T
        dev, dtype = self.U.device, self.U.dtype
        lookup = nn.Embedding(self.num_embeddings, self.rank, self.padding_idx, device=dev, dtype=dtype)
        project = nn.Linear(self.rank, self.embedding_dim, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            lookup.weight.copy_(self.U)
            project.weight.copy_(v)
        return nn.Sequential(lookup, project).train(self.training)

    # --- counts --------------------------------------------------------------------------------
    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds for one sample of ``input_shape`` indices (the lookup itself is free)."""
        return math.prod(input_shape) * self.rank * self.embedding_dim

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """The dense table's lookup costs no multiply-adds."""
        return 0

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, {self._extra_repr_common()}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
