"""Factorized embeddings for fairseq Transformers (paper section 2; docs/method.md#embedding).

- ``FactorizedLearnedPositionalEmbedding``: fairseq's learned positions with a factorized table.
- ``TiedFactorizedOutput``: the decoder's output projection tied to a factorized token embedding
  ``E = U Vᵀ``: logits ``x Eᵀ = (x V) Uᵀ`` are computed from the embedding's own factors, so the
  tie holds exactly, nothing is duplicated and Frobenius decay counts the pair once.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import fnl
import torch
import torch.nn.functional as F
from fairseq import utils
from torch import Tensor, nn

__all__ = ["FactorizedLearnedPositionalEmbedding", "TiedFactorizedOutput", "fairseq_embedding_init_"]


def fairseq_embedding_init_(weight: Tensor, padding_idx: Optional[int] = None) -> None:
    """fairseq's embedding init: N(0, dim^-1/2), padding row zero (dense table layout)."""
    nn.init.normal_(weight, mean=0.0, std=weight.shape[-1] ** -0.5)
    if padding_idx is not None:
        with torch.no_grad():
            weight[padding_idx].zero_()


def build_factorized_embedding(
        cls: type,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int],
        rank_scale: float,
        spectral: bool,
) -> fnl.FactorizedEmbedding:
    """A factorized table initialised like fairseq's dense one.

    Spectral: fairseq's dense init, then SVD. Default: each factor drawn independently (the core's
    default, product variance 1) and ``U`` scaled by dim^-1/2, so that the product has fairseq's
    variance 1/dim.
    """
    init = functools.partial(fairseq_embedding_init_, padding_idx=padding_idx) if spectral else None
    emb = cls(num_embeddings, embedding_dim, padding_idx, rank_scale=rank_scale, spectral=spectral, init=init)
    if not spectral:
        with torch.no_grad():
            emb.U.mul_(embedding_dim ** -0.5)
    return emb


class FactorizedLearnedPositionalEmbedding(fnl.FactorizedEmbedding):
    """fairseq's ``LearnedPositionalEmbedding`` with a factorized table ``U Vᵀ``.

    Positions are computed as fairseq does (offset by ``padding_idx``, one position per step when
    decoding incrementally), then looked up in the factorized table.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int], **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, **kwargs)
        self.onnx_trace = False
        if self.padding_idx is not None:
            self.max_positions = self.num_embeddings - self.padding_idx - 1
        else:
            self.max_positions = self.num_embeddings

    def forward(  # type: ignore[override]
            self,
            input: Tensor,
            incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
            positions: Optional[Tensor] = None,
    ) -> Tensor:
        if positions is not None and self.padding_idx is not None:
            raise ValueError("positions may be given only when padding_idx is None")
        if positions is None:
            if incremental_state is not None:
                # one decoding step: every sentence is at the same position
                positions = torch.full((1, 1), self.padding_idx + input.size(1), device=input.device,
                                       dtype=input.dtype)
            else:
                positions = utils.make_positions(input, self.padding_idx, onnx_trace=self.onnx_trace)
        return super().forward(positions)


class TiedFactorizedOutput(nn.Module):
    """Output projection ``x Eᵀ`` tied to a factorized embedding ``E = U (S) Vᵀ``.

    The embedding is referenced, not registered as a submodule: its parameters belong to the
    decoder's ``embed_tokens`` only (one copy in the state dict, one Frobenius-decay term).
    """

    def __init__(self, embedding: fnl.FactorizedEmbedding) -> None:
        super().__init__()
        if not isinstance(embedding, fnl.FactorizedEmbedding):
            raise TypeError(f"embedding must be an fnl.FactorizedEmbedding, got {type(embedding).__name__}")
        object.__setattr__(self, "_embedding", embedding)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def embedding(self) -> fnl.FactorizedEmbedding:
        return self._embedding

    def forward(self, x: Tensor) -> Tensor:
        emb = self._embedding
        h = x @ emb.V  # (..., r)
        if emb.S is not None:
            h = h @ emb.S.T
        return F.linear(h, emb.U)  # (..., vocab)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a rank-{self._embedding.rank} embedding"
