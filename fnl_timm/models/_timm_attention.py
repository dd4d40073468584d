"""timm's ``Attention`` (one fused ``qkv`` Linear, then ``proj``) as the paper's factorized attention
(paper section 3.2): heads shrunk by rank_scale, the query-key / output-value forms rebalanced by SVD
and their Frobenius decay, on slices of the fused weight.

Head h's query rows are ``qkv.weight[h*d_h:(h+1)*d_h]``, its key rows the same slice of the second
third, its value rows of the last third, and its output columns ``proj.weight[:, h*d_h:(h+1)*d_h]``.
The forms ``A_h = W_Q^hᵀ W_K^h`` and ``B_h = W_O^h W_V^h`` are those of ``fnl.attention``; this
module only maps timm's layout onto its functions (the fairseq plugin is the other adapter).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from timm.layers import Attention

from fnl import balance_outval_, balance_quekey_
from fnl.fd_engine import FDEngine, FDTerm, form_term

__all__ = [
    'add_attention_fd_grad_', 'attention_fd_terms', 'attention_forms', 'attention_owner', 'balance_attention_',
    'mark_attention', 'shrink_heads_', 'timm_attentions',
]

# qkv / proj weight -> the Attention whose forms it holds (for the fd* optimizers)
_ATTENTION_OWNER = WeakIdKeyDictionary()


def timm_attentions(model: nn.Module) -> List[Tuple[str, Attention]]:
    """Every timm ``Attention`` (exact type) in ``model`` with its name."""
    return [(n, m) for n, m in model.named_modules() if type(m) is Attention]


def attention_forms(attn: Attention) -> Tuple[bool, bool]:
    """Whether the query-key and the output-value forms of ``attn`` are products of two matrices.

    ``qk_norm`` normalises queries and keys between the projection and the score, so ``A_h`` is not
    a bilinear form; ``scale_norm`` and ``gated`` act between the values and ``proj``, so ``B_h`` is
    not one. Either way the projections must be plain ``nn.Linear`` layers.
    """
    plain = type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear
    quekey = plain and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    outval = plain and isinstance(attn.norm, nn.Identity) and attn.gate is None
    return quekey, outval


def _projections(attn: Attention) -> Tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Copies of the query, key and value projections as three ``nn.Linear`` layers."""
    width, d = attn.attn_dim, attn.qkv.in_features
    out = []
    for i in range(3):
        lin = nn.Linear(d, width, bias=attn.qkv.bias is not None, device=attn.qkv.weight.device,
                        dtype=attn.qkv.weight.dtype)
        lin.weight.copy_(attn.qkv.weight[i * width:(i + 1) * width])
        if lin.bias is not None:
            lin.bias.copy_(attn.qkv.bias[i * width:(i + 1) * width])
        out.append(lin)
    return out[0], out[1], out[2]


def _set_qkv_(attn: Attention, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
    weight = torch.cat([q.weight, k.weight, v.weight])
    bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
    if weight.shape == attn.qkv.weight.shape:
        attn.qkv.weight.copy_(weight)
        if bias is not None:
            attn.qkv.bias.copy_(bias)
        return
    qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    qkv.weight.copy_(weight)
    if bias is not None:
        qkv.bias.copy_(bias)
    attn.qkv = qkv


def _check_forms(attn: Attention, name: str, quekey: bool, outval: bool, what: str) -> None:
    has_qk, has_ov = attention_forms(attn)
    if quekey and not has_qk:
        raise ValueError(f'{what}: the query-key form of {name!r} is not a product of two matrices (qk_norm, or '
                         'qkv is not a plain nn.Linear)')
    if outval and not has_ov:
        raise ValueError(f'{what}: the output-value form of {name!r} is not a product of two matrices (scale_norm, '
                         'gated, or qkv / proj is not a plain nn.Linear)')


@torch.no_grad()
def balance_attention_(attn: Attention, quekey: bool = True, outval: bool = True, name: str = 'attn') -> None:
    """Spectrally rebalance each head's query-key (``quekey``) and output-value (``outval``) factor
    pairs in place (the paper's ``--spectral-quekey`` / ``--spectral-outval``): the attention's
    outputs are unchanged, biases included."""
    _check_forms(attn, name, quekey, outval, 'spectral_quekey' if quekey else 'spectral_outval')
    q, k, v = _projections(attn)
    if quekey:
        balance_quekey_(q, k, attn.num_heads)
    if outval:
        balance_outval_(attn.proj, v, attn.num_heads)
    _set_qkv_(attn, q, k, v)


@torch.no_grad()
def shrink_heads_(attn: Attention, head_dim: int, spectral: bool, name: str = 'attn') -> None:
    """Shrink every head of ``attn`` to ``head_dim`` dimensions in place.

    With ``spectral`` the query-key and output-value forms of each head are replaced by their best
    rank-``head_dim`` approximations, in balanced factors (both forms are rebalanced by SVD and the
    rows of the largest singular values kept; the queries and keys are rescaled so that the score
    scale ``head_dim ** -0.5`` gives the scores of the kept part): at ``head_dim`` = the current one
    the attention computes the same function. Without it, the first ``head_dim`` rows of each head
    are kept (timm's init draws them independently, so they are a draw of the smaller layer's init).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= attn.head_dim:
        raise ValueError(f'head_dim of {name!r} must be an int in [1, {attn.head_dim}], got {head_dim!r}')
    _check_forms(attn, name, True, True, "attention='heads'")
    heads, old = attn.num_heads, attn.head_dim
    q, k, v = _projections(attn)
    keep_qk = keep_ov = torch.arange(head_dim).repeat(heads) + torch.arange(heads).repeat_interleave(head_dim) * old
    if spectral:
        balance_quekey_(q, k, heads)
        balance_outval_(attn.proj, v, heads)
        keep_qk, keep_ov = _largest_rows(q, heads, head_dim), _largest_rows(v, heads, head_dim)
        root = (head_dim / old) ** 0.25  # scale1 * (r q)·(r k) = scale0 * q·k
        for lin in (q, k):
            lin.weight.mul_(root)
            if lin.bias is not None:
                lin.bias.mul_(root)
    for lin, keep in ((q, keep_qk), (k, keep_qk), (v, keep_ov)):
        lin.weight = nn.Parameter(lin.weight[keep])
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias[keep])
    proj = nn.Linear(heads * head_dim, attn.proj.out_features, bias=attn.proj.bias is not None,
                     device=attn.proj.weight.device, dtype=attn.proj.weight.dtype)
    proj.weight.copy_(attn.proj.weight[:, keep_ov])
    if proj.bias is not None:
        proj.bias.copy_(attn.proj.bias)
    attn.proj = proj
    _set_qkv_(attn, q, k, v)
    attn.head_dim, attn.attn_dim, attn.scale = head_dim, heads * head_dim, head_dim ** -0.5


def _largest_rows(lin: nn.Linear, heads: int, head_dim: int) -> Tensor:
    """Indices of the ``head_dim`` rows of each head with the largest norms (after balancing a row's
    norm is the square root of its singular value; the bias entry is part of the row)."""
    rows = lin.weight if lin.bias is None else torch.cat([lin.weight, lin.bias[:, None]], dim=1)
    norms = rows.float().norm(dim=1).reshape(heads, -1)  # (heads, old d_h)
    top = norms.topk(head_dim, dim=1).indices.sort(dim=1).values
    return (top + torch.arange(heads, device=top.device)[:, None] * norms.shape[1]).reshape(-1).cpu()


def mark_attention(model: nn.Module) -> int:
    """Register the ``qkv`` / ``proj`` weights of every timm ``Attention`` of ``model`` whose forms are
    products of two matrices, for Frobenius decay on the forms; returns how many."""
    count = 0
    for _, attn in timm_attentions(model):
        if any(attention_forms(attn)):
            _ATTENTION_OWNER[attn.qkv.weight] = attn
            _ATTENTION_OWNER[attn.proj.weight] = attn
            count += 1
    return count


def attention_owner(param: Tensor) -> Optional[Attention]:
    """The timm ``Attention`` whose ``qkv`` or ``proj`` weight ``param`` is (see :func:`mark_attention`)."""
    return _ATTENTION_OWNER.get(param)


def attention_fd_terms(attn: Attention, quekey: bool = True, outval: bool = True) -> List[FDTerm]:
    """The core FD terms (``fnl.fd_engine``) of the query-key and output-value forms of ``attn``: per-head
    views of the fused ``qkv`` weight's query / key / value rows and of ``proj``'s columns (no copies)."""
    _check_forms(attn, 'attn', quekey, outval, 'wd2fd_quekey' if quekey else 'wd2fd_outval')
    width, heads, w = attn.attn_dim, attn.num_heads, attn.qkv.weight
    terms = []
    if quekey:
        terms.append(form_term('quekey', w, w, heads, slice(0, width), slice(width, 2 * width)))
    if outval:
        terms.append(form_term('outval', attn.proj.weight, w, heads, right_rows=slice(2 * width, 3 * width)))
    return terms


@torch.no_grad()
def add_attention_fd_grad_(attn: Attention, coef: float, quekey: bool = True, outval: bool = True) -> None:
    """Add the gradient of ``sum_h (coef/2) ||A_h||_F²`` (``quekey``) and ``sum_h (coef/2) ||B_h||_F²``
    (``outval``) to ``qkv.weight.grad`` / ``proj.weight.grad``, batched over heads, in place, through the
    core's FD engine (the ``fd*`` optimizers use the same terms).

    Weights without a ``.grad`` this step get no FD (as torch's weight decay).
    """
    FDEngine(attention_fd_terms(attn, quekey, outval)).apply_(coef)
