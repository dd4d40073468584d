"""Quadratic forms of multi-head attention (paper section 6; docs/method.md#attention-quadratic-forms).

For head h, with the projections' weights in ``nn.Linear`` layout (``w_q``, ``w_k``, ``w_v``:
(heads*d_h, d); ``w_o``: (d, heads*d_h)), the query-key form is ``A_h = W_Q^hᵀ W_K^h`` and the
output-value form ``B_h = W_O^h W_V^h``, both d x d of rank <= d_h. Both are handled here as
``F_h = L_hᵀ R_h`` with "row factors" ``L_h``, ``R_h`` of shape (d_h x d): ``(W_Q^h, W_K^h)`` and
``(W_O^hᵀ, W_V^h)``. Everything is batched over heads through d_h x d_h Grams; the d x d forms are
never built. The two projections of a pair may read inputs of different widths (keys and values of
width ``kdim`` / ``vdim`` in encoder-decoder attention): only the head count and ``d_h`` must agree.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import accumulate_grad_

__all__ = [
    "add_outval_fd_grad_", "add_quekey_fd_grad_", "balance_outval_", "balance_quekey_", "outval_norm_sq",
    "quekey_norm_sq",
]


def _rows(w: Tensor, heads: int, name: str) -> Tensor:
    """(heads*d_h, d) -> (heads, d_h, d), checking the head count."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if w.dim() != 2 or w.shape[0] % heads:
        raise ValueError(f"{name} must be a (heads*d_h, d) matrix with heads={heads} dividing its rows, "
                         f"got shape {tuple(w.shape)}")
    return w.reshape(heads, w.shape[0] // heads, w.shape[1])


def _check_pair(left: Tensor, right: Tensor, names: str) -> None:
    """Same heads and per-head dimension d_h; the input widths (the forms' d) may differ."""
    if left.shape[:2] != right.shape[:2]:
        raise ValueError(f"{names} must have the same heads and per-head dimension d_h (shapes (heads, d_h, d)), "
                         f"got {tuple(left.shape)} and {tuple(right.shape)}")


def _form_norm_sq(left: Tensor, right: Tensor) -> Tensor:
    """``||L_hᵀ R_h||_F²`` per head = ``sum((L_h L_hᵀ) * (R_h R_hᵀ))``; (heads,) in float32."""
    dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    left, right = left.to(dtype), right.to(dtype)
    return ((left @ left.transpose(1, 2)) * (right @ right.transpose(1, 2))).sum(dim=(1, 2))


def quekey_norm_sq(w_q: Tensor, w_k: Tensor, heads: int) -> Tensor:
    """``||W_Q^hᵀ W_K^h||_F²`` for each head, shape (heads,)."""
    q, k = _rows(w_q, heads, "w_q"), _rows(w_k, heads, "w_k")
    _check_pair(q, k, "w_q and w_k")
    return _form_norm_sq(q, k)


def outval_norm_sq(w_o: Tensor, w_v: Tensor, heads: int) -> Tensor:
    """``||W_O^h W_V^h||_F²`` for each head, shape (heads,)."""
    o, v = _rows(w_o.T, heads, "w_o.T"), _rows(w_v, heads, "w_v")
    _check_pair(o, v, "w_o.T and w_v")
    return _form_norm_sq(o, v)


def _form_fd_grads(left: Tensor, right: Tensor, coef: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_h (coef/2)||L_hᵀ R_h||²``: ``coef (R_h R_hᵀ) L_h`` and ``coef (L_h L_hᵀ) R_h``."""
    dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    lf, rf = left.detach().to(dtype), right.detach().to(dtype)
    g_left = (rf @ rf.transpose(1, 2)) @ lf
    g_right = (lf @ lf.transpose(1, 2)) @ rf
    return g_left.mul_(coef), g_right.mul_(coef)


@torch.no_grad()
def add_quekey_fd_grad_(w_q: Tensor, w_k: Tensor, heads: int, coef: float) -> None:
    """Add the gradient of ``sum_h (coef/2) ||W_Q^hᵀ W_K^h||_F²`` to ``w_q.grad`` and ``w_k.grad``."""
    if coef == 0:
        return
    q, k = _rows(w_q, heads, "w_q"), _rows(w_k, heads, "w_k")
    _check_pair(q, k, "w_q and w_k")
    gq, gk = _form_fd_grads(q, k, coef)
    accumulate_grad_(w_q, gq.reshape(w_q.shape))
    accumulate_grad_(w_k, gk.reshape(w_k.shape))


@torch.no_grad()
def add_outval_fd_grad_(w_o: Tensor, w_v: Tensor, heads: int, coef: float) -> None:
    """Add the gradient of ``sum_h (coef/2) ||W_O^h W_V^h||_F²`` to ``w_o.grad`` and ``w_v.grad``."""
    if coef == 0:
        return
    o, v = _rows(w_o.T, heads, "w_o.T"), _rows(w_v, heads, "w_v")
    _check_pair(o, v, "w_o.T and w_v")
    go, gv = _form_fd_grads(o, v, coef)
    accumulate_grad_(w_o, go.reshape(w_o.shape[1], w_o.shape[0]).T)
    accumulate_grad_(w_v, gv.reshape(w_v.shape))


def _balancing_maps(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Per head, (d_h x d_h) maps ``G_l``, ``G_r`` with ``G_l G_rᵀ = I`` that balance the pair.

    With ``L_hᵀ = P_l R_l`` and ``R_hᵀ = P_r R_r`` (QR) and ``R_l R_rᵀ = X diag(s) Yᵀ`` (SVD),
    ``G_l = R_l⁻¹ X diag(√s)`` and ``G_r = R_r⁻¹ Y diag(√s)``: the new row factors ``G_lᵀ L_h`` and
    ``G_rᵀ R_h`` are ``(P_l X √s)ᵀ`` and ``(P_r Y √s)ᵀ``, whose product is unchanged and whose
    singular values are both ``√s``.
    """
    lf, rf = left.detach().to(torch.float64), right.detach().to(torch.float64)
    _, r_l = torch.linalg.qr(lf.transpose(1, 2))  # (heads, d_h, d_h)
    _, r_r = torch.linalg.qr(rf.transpose(1, 2))
    x, s, yh = torch.linalg.svd(r_l @ r_r.transpose(1, 2))
    root = s.sqrt().unsqueeze(1)  # scales columns
    g_l = torch.linalg.solve_triangular(r_l, x * root, upper=True)
    g_r = torch.linalg.solve_triangular(r_r, yh.transpose(1, 2) * root, upper=True)
    if not (torch.isfinite(g_l).all() and torch.isfinite(g_r).all()):
        raise ValueError("a head's projection is rank-deficient (d_h singular values of zero); it cannot be rebalanced")
    return g_l, g_r


def _apply_rows_(linear: nn.Linear, g: Tensor, heads: int, extra: Optional[Tensor] = None) -> None:
    """Row factor of each head, its bias and ``extra`` (more vectors in the projection's output space) ->
    ``gᵀ`` times them."""
    w = linear.weight
    rows = _rows(w, heads, "weight")
    w.copy_((g.transpose(1, 2).to(rows.dtype) @ rows).reshape(w.shape))
    for b in (linear.bias, extra):
        if b is not None:
            cols = b.reshape(-1, heads, g.shape[1]).permute(1, 2, 0)  # (heads, d_h, vectors)
            b.copy_((g.transpose(1, 2).to(b.dtype) @ cols).permute(2, 0, 1).reshape(b.shape))


def _check_extra(name: str, extra: Optional[Tensor], width: int, proj: str) -> None:
    if extra is None:
        return
    if not isinstance(extra, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(extra).__name__}")
    if extra.shape[-1] != width:
        raise ValueError(f"{name} must have last dimension {width} ({proj}.out_features), got shape "
                         f"{tuple(extra.shape)}")


def _check_linear(name: str, layer: nn.Module) -> None:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(layer).__name__}")


@torch.no_grad()
def balance_quekey_(q_proj: nn.Linear, k_proj: nn.Linear, heads: int, bias_k: Optional[Tensor] = None) -> None:
    """Spectrally rebalance each head's query/key pair in place (``--spectral-quekey``).

    Query and key vectors of head h are mapped by ``G_lᵀ`` and ``G_rᵀ`` with ``G_l G_rᵀ = I``, so every
    attention score ``q·k`` (biases included) is unchanged, and both factors of ``A_h`` get the
    singular values ``sqrt(s(A_h))``.

    Args:
        q_proj: the query projection, (heads*d_h) x d.
        k_proj: the key projection, (heads*d_h) x kdim.
        heads: the number of heads.
        bias_k: key vectors appended after the projection (fairseq's ``add_bias_kv``), of shape
            (..., heads*d_h): they are keys too, so they are mapped like ``k_proj``'s outputs. Leaving
            out a ``bias_k`` the attention uses changes its function.
    """
    _check_linear("q_proj", q_proj)
    _check_linear("k_proj", k_proj)
    q, k = _rows(q_proj.weight, heads, "q_proj.weight"), _rows(k_proj.weight, heads, "k_proj.weight")
    _check_pair(q, k, "q_proj.weight and k_proj.weight")
    _check_extra("bias_k", bias_k, k_proj.out_features, "k_proj")
    g_l, g_r = _balancing_maps(q, k)
    _apply_rows_(q_proj, g_l, heads)
    _apply_rows_(k_proj, g_r, heads, bias_k)


@torch.no_grad()
def balance_outval_(out_proj: nn.Linear, v_proj: nn.Linear, heads: int, bias_v: Optional[Tensor] = None) -> None:
    """Spectrally rebalance each head's output/value pair in place (``--spectral-outval``).

    ``W_O^h -> W_O^h G_l`` and ``W_V^h -> G_rᵀ W_V^h`` (and the value bias likewise) with
    ``G_l G_rᵀ = I``: the attention output is unchanged and both factors of ``B_h`` get the
    singular values ``sqrt(s(B_h))``.

    Args:
        out_proj: the output projection, d x (heads*d_h).
        v_proj: the value projection, (heads*d_h) x vdim.
        heads: the number of heads.
        bias_v: value vectors appended after the projection (fairseq's ``add_bias_kv``), of shape
            (..., heads*d_h): mapped like ``v_proj``'s outputs. Leaving out a ``bias_v`` the
            attention uses changes its function.
    """
    _check_linear("out_proj", out_proj)
    _check_linear("v_proj", v_proj)
    o, v = _rows(out_proj.weight.T, heads, "out_proj.weight.T"), _rows(v_proj.weight, heads, "v_proj.weight")
    _check_pair(o, v, "out_proj.weight.T and v_proj.weight")
    _check_extra("bias_v", bias_v, v_proj.out_features, "v_proj")
    g_l, g_r = _balancing_maps(o, v)
    w_o = out_proj.weight
    new_rows = (g_l.transpose(1, 2).to(o.dtype) @ o).reshape(w_o.shape[1], w_o.shape[0])
    w_o.copy_(new_rows.T)
    _apply_rows_(v_proj, g_r, heads, bias_v)
