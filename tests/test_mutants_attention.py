"""Tests that kill the mutants of `fnl/attention.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour: the argument checks and their messages, a zero coefficient leaving
``.grad`` untouched, the float32 computation for low-precision weights, the balancing of float32
projections with their extra key / value vectors.
"""
import pytest
import torch
from torch import nn

import fnl
from fnl import attention as att

HEADS, DH, D = 2, 3, 5


def _weights(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(HEADS * DH, D, generator=g, dtype=dtype) for _ in range(3))
    o = torch.randn(D, HEADS * DH, generator=g, dtype=dtype)
    return q, k, v, o


def test_one_head_is_the_whole_form():
    q, k, v, o = _weights()
    assert torch.allclose(fnl.quekey_norm_sq(q, k, 1), (q.T @ k).square().sum().reshape(1), rtol=1e-12)
    assert torch.allclose(fnl.outval_norm_sq(o, v, 1), (o @ v).square().sum().reshape(1), rtol=1e-12)


@pytest.mark.parametrize("heads", [0, -1, True, 2.0, "2"])
def test_bad_heads_are_named(heads):
    q, k, _, _ = _weights()
    with pytest.raises(ValueError, match=rf"^heads must be an int >= 1, got {heads!r}$"):
        fnl.quekey_norm_sq(q, k, heads)


def test_shape_messages_name_the_argument():
    q, k, v, o = _weights()
    with pytest.raises(ValueError, match=r"^w_q must be a \(heads\*d_h, d\) matrix with heads=4 dividing its rows, "
                                         r"got shape \(6, 5\)$"):
        fnl.quekey_norm_sq(q, k, 4)
    with pytest.raises(ValueError, match=r"^w_k must be a \(heads\*d_h, d\) matrix with heads=2 dividing its rows, "
                                         r"got shape \(6, 5, 1\)$"):
        fnl.quekey_norm_sq(q, k.unsqueeze(-1), 2)
    with pytest.raises(ValueError, match=r"^w_o\.T must be a \(heads\*d_h, d\) matrix with heads=4"):
        fnl.outval_norm_sq(o, v, 4)
    with pytest.raises(ValueError, match=r"^w_v must be a \(heads\*d_h, d\) matrix with heads=4"):
        fnl.outval_norm_sq(o[:, :4], v, 4)
    with pytest.raises(ValueError, match=r"^w_q and w_k must have the same heads and per-head dimension d_h "
                                         r"\(shapes \(heads, d_h, d\)\), got \(2, 3, 5\) and \(2, 2, 5\)$"):
        fnl.quekey_norm_sq(q, k[:4], 2)
    with pytest.raises(ValueError, match=r"^w_o\.T and w_v must have the same heads"):
        fnl.outval_norm_sq(o, v[:4], 2)
    with pytest.raises(ValueError, match=r"^w_q and w_k must have the same heads"):
        fnl.add_quekey_fd_grad_(q, k[:4], 2, 0.1)
    with pytest.raises(ValueError, match=r"^w_o\.T and w_v must have the same heads"):
        fnl.add_outval_fd_grad_(o, v[:4], 2, 0.1)


def test_zero_coefficient_leaves_grad_untouched():
    q, k, v, o = _weights()
    fnl.add_quekey_fd_grad_(q, k, HEADS, 0.0)
    fnl.add_outval_fd_grad_(o, v, HEADS, 0.0)
    assert q.grad is None and k.grad is None and o.grad is None and v.grad is None


def test_unit_coefficient_is_the_penalty_gradient():
    q, k, v, o = (w.requires_grad_() for w in _weights())
    penalty = 0.5 * (fnl.quekey_norm_sq(q, k, HEADS).sum() + fnl.outval_norm_sq(o, v, HEADS).sum())
    expected = torch.autograd.grad(penalty, (q, k, o, v))
    fnl.add_quekey_fd_grad_(q, k, HEADS, 1.0)
    fnl.add_outval_fd_grad_(o, v, HEADS, 1.0)
    for p, g in zip((q, k, o, v), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
        assert not p.grad.requires_grad


def test_bfloat16_weights_are_reduced_in_float32():
    q, k, v, o = _weights(torch.bfloat16, seed=1)
    norms = fnl.quekey_norm_sq(q, k, HEADS)
    assert norms.dtype == torch.float32
    exact = fnl.quekey_norm_sq(q.double(), k.double(), HEADS)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-6, atol=0)
    fnl.add_outval_fd_grad_(o, v, HEADS, 0.5)
    o64, v64 = o.double().requires_grad_(), v.double().requires_grad_()
    want = torch.autograd.grad(0.25 * fnl.outval_norm_sq(o64, v64, HEADS).sum(), (o64, v64))
    for p, g in zip((o, v), want):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad, g.to(torch.bfloat16), rtol=0, atol=0)


def _fairseq_like_attention(x, q_proj, k_proj, v_proj, out_proj, bias_k, bias_v):
    """Single-sequence attention with extra key / value vectors appended, as fairseq's add_bias_kv."""
    t = x.shape[0]
    k_all = torch.cat([k_proj(x), bias_k.reshape(-1, HEADS * DH)])
    v_all = torch.cat([v_proj(x), bias_v.reshape(-1, HEADS * DH)])
    q = q_proj(x).view(t, HEADS, DH).transpose(0, 1)
    k = k_all.view(k_all.shape[0], HEADS, DH).transpose(0, 1)
    v = v_all.view(v_all.shape[0], HEADS, DH).transpose(0, 1)
    attn = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    return out_proj((attn @ v).transpose(0, 1).reshape(t, HEADS * DH))


@pytest.mark.parametrize("vectors", [1, 2])
def test_balancing_float32_projections_with_bias_kv_keeps_the_function(vectors):
    torch.manual_seed(3)
    q_proj, k_proj, v_proj = (nn.Linear(D, HEADS * DH) for _ in range(3))
    out_proj = nn.Linear(HEADS * DH, D)
    bias_k = torch.randn(vectors, 1, HEADS * DH)
    bias_v = torch.randn(vectors, 1, HEADS * DH)
    x = torch.randn(4, D)
    before = _fairseq_like_attention(x, q_proj, k_proj, v_proj, out_proj, bias_k, bias_v)
    q0, k0 = q_proj.weight.detach().clone(), k_proj.weight.detach().clone()
    fnl.balance_quekey_(q_proj, k_proj, HEADS, bias_k=bias_k)
    fnl.balance_outval_(out_proj, v_proj, HEADS, bias_v=bias_v)
    assert q_proj.weight.dtype == torch.float32 and bias_k.dtype == torch.float32
    assert not torch.allclose(q_proj.weight, q0) and not torch.allclose(k_proj.weight, k0)  # it did rebalance
    after = _fairseq_like_attention(x, q_proj, k_proj, v_proj, out_proj, bias_k, bias_v)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_balancing_a_rank_deficient_head_is_refused():
    q_proj, k_proj = nn.Linear(D, HEADS * DH).double(), nn.Linear(D, HEADS * DH).double()
    with torch.no_grad():
        q_proj.weight[:DH].zero_()
    with pytest.raises(ValueError, match=r"^a head's projection is rank-deficient \(d_h singular values of zero\); "
                                         r"it cannot be rebalanced$"):
        fnl.balance_quekey_(q_proj, k_proj, HEADS)


def test_balancing_argument_messages():
    lin = nn.Linear(D, HEADS * DH)
    with pytest.raises(TypeError, match=r"^k_proj must be an nn\.Linear, got Conv1d$"):
        fnl.balance_quekey_(lin, nn.Conv1d(2, 2, 1), HEADS)
    with pytest.raises(TypeError, match=r"^out_proj must be an nn\.Linear, got Conv1d$"):
        fnl.balance_outval_(nn.Conv1d(2, 2, 1), lin, HEADS)
    with pytest.raises(TypeError, match=r"^v_proj must be an nn\.Linear, got Conv1d$"):
        fnl.balance_outval_(nn.Linear(HEADS * DH, D), nn.Conv1d(2, 2, 1), HEADS)
    with pytest.raises(TypeError, match=r"^bias_k must be a tensor or None, got list$"):
        fnl.balance_quekey_(lin, nn.Linear(D, HEADS * DH), HEADS, bias_k=[0.0])
    with pytest.raises(ValueError, match=r"^bias_v must have last dimension 6 \(v_proj\.out_features\), "
                                         r"got shape \(1, 1, 5\)$"):
        fnl.balance_outval_(nn.Linear(HEADS * DH, D), lin, HEADS, bias_v=torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match=r"^q_proj\.weight and k_proj\.weight must have the same heads"):
        fnl.balance_quekey_(lin, nn.Linear(D, 4), HEADS)
    with pytest.raises(ValueError, match=r"^out_proj\.weight\.T and v_proj\.weight must have the same heads"):
        fnl.balance_outval_(nn.Linear(4, D), lin, HEADS)
    assert att._check_extra("bias_k", None, 6, "k_proj") is None


def test_float32_weights_get_float32_arithmetic():
    """Float32 weights: the FD gradient is the float32 product (what a GPU computes fast), bit for bit, not a
    float64 one rounded to float32."""
    q, k, _, _ = _weights(torch.float32, seed=2)
    fnl.add_quekey_fd_grad_(q, k, HEADS, 0.5)
    qr, kr = q.reshape(HEADS, DH, D), k.reshape(HEADS, DH, D)
    want_q = ((kr @ kr.transpose(1, 2)) @ qr).mul_(0.5).reshape(q.shape)
    assert torch.equal(q.grad, want_q)
    q64, k64 = qr.double(), kr.double()
    in_float64 = ((k64 @ k64.transpose(1, 2)) @ q64).mul_(0.5).reshape(q.shape).float()
    assert not torch.equal(in_float64, want_q)  # the check above can tell the two apart
