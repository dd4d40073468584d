"""Multi-head attention with a smaller per-head dimension (paper section 6; docs/method.md#attention-quadratic-forms).

``rank_scale`` for attention shrinks each head to ``d_h = int(rank_scale * d / heads)``, so that
every query-key form ``W_Q^hᵀ W_K^h`` and output-value form ``W_O^h W_V^h`` has rank ``d_h``. The
projections stay dense ``nn.Linear`` layers, of shapes (heads*d_h x d) and (d x heads*d_h).

fairseq's ``MultiheadAttention`` already runs with an inner width different from the model width
after head pruning (``embed_dim`` becomes ``heads*d_h`` and ``skip_embed_dim_check`` is set); the
same mechanism is used here, so its forward pass, incremental decoding and beam reordering are
reused unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

import fnl

__all__ = ["ShrunkMultiheadAttention", "attention_layers", "balance_attention_", "head_dim_for", "shrink_heads_"]


class ShrunkMultiheadAttention(MultiheadAttention):
    """fairseq's attention with inner width ``heads * d_h`` != model width.

    fairseq runs such an attention (as after head pruning) through its explicit, op-by-op path:
    torch's fused kernel demands equal widths. Here, when no attention weights, incremental state
    or extra key/value rows are involved (training and scoring), the heads go through
    ``F.scaled_dot_product_attention`` instead; everything else (decoding) is fairseq's own path.
    """

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, incremental_state=None, need_weights: bool = True,
                static_kv: bool = False, attn_mask: Optional[Tensor] = None, before_softmax: bool = False,
                need_head_weights: bool = False):
        if (incremental_state is not None or need_weights or need_head_weights or before_softmax
                or self.bias_k is not None or self.add_zero_attn or self.onnx_trace or self.use_xformers
                or torch.jit.is_scripting()):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   incremental_state=incremental_state, need_weights=need_weights,
                                   static_kv=static_kv, attn_mask=attn_mask, before_softmax=before_softmax,
                                   need_head_weights=need_head_weights)
        tgt_len, bsz, _ = query.shape
        if self.self_attention or key is None:
            key = value = query
        h, dh = self.num_heads, self.head_dim
        q = self.q_proj(query).view(tgt_len, bsz, h, dh).permute(1, 2, 0, 3)  # (B, H, T, dh)
        k = self.k_proj(key).view(key.size(0), bsz, h, dh).permute(1, 2, 0, 3)  # (B, H, S, dh)
        v = self.v_proj(value).view(value.size(0), bsz, h, dh).permute(1, 2, 0, 3)
        mask = None
        if attn_mask is not None:  # fairseq: additive float (T, S), -inf on the future
            mask = attn_mask.to(q.dtype).unsqueeze(0).unsqueeze(0)
        if key_padding_mask is not None:  # fairseq: (B, S), True/1 on padding
            pad = key_padding_mask.to(torch.bool).view(bsz, 1, 1, -1)
            pad_add = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill_(pad, float("-inf"))
            mask = pad_add if mask is None else mask + pad_add
        training = self.training or self.dropout_module.apply_during_inference
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_module.p if training else 0.0)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, h * dh)  # (T, B, H*dh)
        return self.out_proj(out), None


def head_dim_for(rank_scale: float, embed_dim: int, heads: int) -> int:
    """``d_h = int(rank_scale * embed_dim / heads)`` (docs/method.md#rank-rules), checked to be >= 1."""
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
    if attn.bias_k is not None:
        # a shrunk attention runs through fairseq's explicit path, which fails on bias_k (fairseq 0.12:
        # it does not count the appended key in src_len)
        raise ValueError("--rank-scale cannot shrink the heads of an attention built with add_bias_kv=True: "
                         "fairseq's explicit attention path, which shrunk heads need, does not run bias_k")
    model_dim = attn.out_proj.out_features
    inner = attn.num_heads * head_dim
    device, dtype = attn.q_proj.weight.device, attn.q_proj.weight.dtype
    bias = attn.q_proj.bias is not None
    kw = {"bias": bias, "device": device, "dtype": dtype}
    attn.q_proj = nn.Linear(attn.q_proj.in_features, inner, **kw)
    attn.k_proj = nn.Linear(attn.kdim, inner, **kw)
    attn.v_proj = nn.Linear(attn.vdim, inner, **kw)
    attn.out_proj = nn.Linear(inner, model_dim, bias=attn.out_proj.bias is not None, device=device, dtype=dtype)
    attn.embed_dim = inner
    attn.head_dim = head_dim
    attn.scaling = head_dim ** -0.5
    # The query width no longer equals embed_dim: fairseq then skips its width assertion and the
    # fused torch path (which requires equal widths), exactly as after head pruning; the subclass
    # adds a fused path of its own (no new state, so the class of the built module is swapped).
    attn._set_skip_embed_dim_check()
    attn.__class__ = ShrunkMultiheadAttention
    attn.reset_parameters()
    return attn


@torch.no_grad()
def balance_attention_(attn: MultiheadAttention, quekey: bool, outval: bool) -> None:
    """``--spectral-quekey`` / ``--spectral-outval`` on one fairseq attention, its function unchanged.

    Every fairseq option is covered: ``add_bias_kv``'s ``bias_k`` / ``bias_v`` are a key and a value
    appended after the projections, so they are mapped with ``k_proj`` / ``v_proj``;
    ``add_zero_attn``'s zero key and value stay zero under any linear map; encoder-decoder attention
    (keys and values of widths ``kdim`` / ``vdim``) only needs the heads' dimensions to agree.
    """
    if not isinstance(attn, MultiheadAttention):
        raise TypeError(f"attn must be a fairseq MultiheadAttention, got {type(attn).__name__}")
    if quekey:
        fnl.balance_quekey_(attn.q_proj, attn.k_proj, attn.num_heads, bias_k=attn.bias_k)
    if outval:
        fnl.balance_outval_(attn.out_proj, attn.v_proj, attn.num_heads, bias_v=attn.bias_v)


def attention_layers(module: nn.Module) -> list[MultiheadAttention]:
    """Every fairseq ``MultiheadAttention`` in ``module``, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, MultiheadAttention)]

