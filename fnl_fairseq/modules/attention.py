"""Multi-head attention with a smaller per-head dimension (paper section 3.2; SPEC 3).

``rank_scale`` for attention shrinks each head to ``d_h = int(rank_scale * d / heads)``, so that
every query-key form ``W_Q^hᵀ W_K^h`` and output-value form ``W_O^h W_V^h`` has rank ``d_h``. The
projections stay dense ``nn.Linear`` layers, of shapes (heads*d_h x d) and (d x heads*d_h).

fairseq's ``MultiheadAttention`` already runs with an inner width different from the model width
after head pruning (``embed_dim`` becomes ``heads*d_h`` and ``skip_embed_dim_check`` is set); the
same mechanism is used here, so its forward pass, incremental decoding and beam reordering are
reused unchanged.
"""
from __future__ import annotations

import torch
from fairseq.modules import MultiheadAttention
from torch import nn

__all__ = ["attention_layers", "head_dim_for", "shrink_heads_"]


def head_dim_for(rank_scale: float, embed_dim: int, heads: int) -> int:
    """``d_h = int(rank_scale * embed_dim / heads)`` (SPEC 3), checked to be >= 1."""
    d_h = int(rank_scale * embed_dim / heads)
    if d_h < 1:
        raise ValueError(
            f"--rank-scale {rank_scale} gives a per-head dimension int({rank_scale} * {embed_dim} / {heads}) = "
            f"{d_h} for attention; it must be >= 1, so --rank-scale must be >= {heads / embed_dim:g}")
    return d_h


@torch.no_grad()
def shrink_heads_(attn: MultiheadAttention, head_dim: int) -> MultiheadAttention:
    """Rebuild ``attn``'s projections for ``head_dim`` per head, freshly initialised, in place.

    The input width (``kdim``, ``vdim`` and the query width) and the output width stay those of
    the model; only the inner width becomes ``heads * head_dim``. Initialisation is fairseq's own
    ``reset_parameters`` (scaled Xavier), on the new shapes.
    """
    if not isinstance(attn, MultiheadAttention):
        raise TypeError(f"attn must be a fairseq MultiheadAttention, got {type(attn).__name__}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be an int >= 1, got {head_dim!r}")
    if head_dim == attn.head_dim:
        return attn
    if getattr(attn, "use_xformers", False):
        raise ValueError("--rank-scale cannot shrink attention heads together with --*-xformers-att-config")
    model_dim = attn.out_proj.out_features
    inner = attn.num_heads * head_dim
    device, dtype = attn.q_proj.weight.device, attn.q_proj.weight.dtype
    bias = attn.q_proj.bias is not None
    kw = {"bias": bias, "device": device, "dtype": dtype}
    attn.q_proj = nn.Linear(attn.q_proj.in_features, inner, **kw)
    attn.k_proj = nn.Linear(attn.kdim, inner, **kw)
    attn.v_proj = nn.Linear(attn.vdim, inner, **kw)
    attn.out_proj = nn.Linear(inner, model_dim, bias=attn.out_proj.bias is not None, device=device, dtype=dtype)
    if attn.bias_k is not None:
        attn.bias_k = nn.Parameter(torch.empty(1, 1, inner, device=device, dtype=dtype))
        attn.bias_v = nn.Parameter(torch.empty(1, 1, inner, device=device, dtype=dtype))
    attn.embed_dim = inner
    attn.head_dim = head_dim
    attn.scaling = head_dim ** -0.5
    # The query width no longer equals embed_dim: fairseq then skips its width assertion and the
    # fused torch path (which requires equal widths), exactly as after head pruning.
    attn._set_skip_embed_dim_check()
    attn.reset_parameters()
    return attn


def attention_layers(module: nn.Module) -> list[MultiheadAttention]:
    """Every fairseq ``MultiheadAttention`` in ``module``, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, MultiheadAttention)]

