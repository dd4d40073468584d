"""Query-key / output-value quadratic forms of attention (SPEC 3)."""
import pytest
import torch
from torch import nn

import fnl

D, HEADS, DH = 12, 3, 4


def _proj(out, inp, seed):
    torch.manual_seed(seed)
    return nn.Linear(inp, out).double()


def _forms(w_a_rows, w_b_rows):
    a = w_a_rows.reshape(HEADS, DH, D)
    b = w_b_rows.reshape(HEADS, DH, D)
    return a.transpose(1, 2) @ b  # (heads, d, d)


def test_norms_match_explicit_forms():
    q, k, v = (_proj(HEADS * DH, D, s).weight for s in (0, 1, 2))
    o = _proj(D, HEADS * DH, 3).weight
    qk = _forms(q, k)
    ov = torch.stack([o[:, h * DH:(h + 1) * DH] @ v[h * DH:(h + 1) * DH] for h in range(HEADS)])
    assert torch.allclose(fnl.quekey_norm_sq(q, k, HEADS), qk.pow(2).sum((1, 2)), rtol=1e-12)
    assert torch.allclose(fnl.outval_norm_sq(o, v, HEADS), ov.pow(2).sum((1, 2)), rtol=1e-12)


def test_fd_grads_match_autograd():
    q, k, v = (_proj(HEADS * DH, D, s).weight for s in (0, 1, 2))
    o = _proj(D, HEADS * DH, 3).weight
    coef = 0.3
    penalty = 0.5 * coef * (fnl.quekey_norm_sq(q, k, HEADS).sum() + fnl.outval_norm_sq(o, v, HEADS).sum())
    expected = torch.autograd.grad(penalty, (q, k, o, v))
    for p in (q, k, o, v):
        p.grad = None
    fnl.add_quekey_fd_grad_(q, k, HEADS, coef)
    fnl.add_outval_fd_grad_(o, v, HEADS, coef)
    for name, p, g in zip("qkov", (q, k, o, v), expected):
        assert torch.allclose(p.grad, g, rtol=1e-10), f"{name}: {(p.grad - g).abs().max():.3e}"


def _attention(x, q_proj, k_proj, v_proj, out_proj):
    t = x.shape[0]
    q = q_proj(x).view(t, HEADS, DH).transpose(0, 1)
    k = k_proj(x).view(t, HEADS, DH).transpose(0, 1)
    v = v_proj(x).view(t, HEADS, DH).transpose(0, 1)
    attn = torch.softmax(q @ k.transpose(1, 2) / DH ** 0.5, dim=-1)
    return out_proj((attn @ v).transpose(0, 1).reshape(t, HEADS * DH))


def test_balancing_keeps_outputs_and_balances_factors():
    q, k, v = (_proj(HEADS * DH, D, s) for s in (0, 1, 2))
    o = _proj(D, HEADS * DH, 3)
    x = torch.randn(5, D, dtype=torch.float64)
    y = _attention(x, q, k, v, o)
    qk_before, ov_before = _forms(q.weight, k.weight), _forms(o.weight.T, v.weight)
    fnl.balance_quekey_(q, k, HEADS)
    fnl.balance_outval_(o, v, HEADS)
    y2 = _attention(x, q, k, v, o)
    assert torch.allclose(y, y2, atol=1e-10), f"{(y - y2).abs().max():.3e}"
    assert torch.allclose(_forms(q.weight, k.weight), qk_before, atol=1e-10)
    assert torch.allclose(_forms(o.weight.T, v.weight), ov_before, atol=1e-10)
    for a, b in ((q.weight, k.weight), (o.weight.T, v.weight)):
        sa = torch.linalg.svdvals(a.reshape(HEADS, DH, D))
        sb = torch.linalg.svdvals(b.reshape(HEADS, DH, D))
        assert torch.allclose(sa, sb, rtol=1e-8), f"{sa} vs {sb}"
        form_sv = torch.linalg.svdvals(_forms(a, b))[:, :DH]
        assert torch.allclose(sa ** 2, form_sv, rtol=1e-8)


def test_bad_head_counts():
    q, k = torch.randn(12, 8), torch.randn(12, 8)
    with pytest.raises(ValueError, match="heads=5 dividing its rows"):
        fnl.quekey_norm_sq(q, k, 5)
    with pytest.raises(ValueError, match="heads must be an int >= 1"):
        fnl.quekey_norm_sq(q, k, 0)
    with pytest.raises(ValueError, match="matching per-head shapes"):
        fnl.quekey_norm_sq(q, torch.randn(12, 6), 3)
    with pytest.raises(TypeError, match="q_proj must be an nn.Linear"):
        fnl.balance_quekey_(nn.Conv1d(2, 2, 1), nn.Linear(2, 2), 1)
