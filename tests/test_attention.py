"""Query-key / output-value quadratic forms of attention (paper section 6; docs/method.md#attention-quadratic-forms)."""
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
    with pytest.raises(ValueError, match="same heads and per-head dimension d_h"):
        fnl.quekey_norm_sq(q, torch.randn(9, 8), 3)
    with pytest.raises(ValueError, match=r"bias_k must have last dimension 12 \(k_proj.out_features\)"):
        fnl.balance_quekey_(nn.Linear(8, 12), nn.Linear(8, 12), 3, bias_k=torch.zeros(1, 1, 8))
    with pytest.raises(TypeError, match="bias_v must be a tensor or None"):
        fnl.balance_outval_(nn.Linear(12, 8), nn.Linear(8, 12), 3, bias_v=[0.0] * 12)
    with pytest.raises(TypeError, match="q_proj must be an nn.Linear"):
        fnl.balance_quekey_(nn.Conv1d(2, 2, 1), nn.Linear(2, 2), 1)


def test_forms_with_different_key_and_query_widths():
    """Encoder-decoder attention: keys of width kdim != d; the form W_Q^hᵀ W_K^h is d x kdim."""
    torch.manual_seed(4)
    q, k = nn.Linear(D, HEADS * DH).double().weight, nn.Linear(7, HEADS * DH).double().weight
    form = q.reshape(HEADS, DH, D).transpose(1, 2) @ k.reshape(HEADS, DH, 7)  # (heads, d, kdim)
    norms = fnl.quekey_norm_sq(q, k, HEADS)
    assert torch.allclose(norms, form.pow(2).sum((1, 2)), rtol=1e-12)
    expected = torch.autograd.grad(0.5 * 0.3 * norms.sum(), (q, k))
    fnl.add_quekey_fd_grad_(q, k, HEADS, 0.3)
    for p, g in zip((q, k), expected):
        assert torch.allclose(p.grad, g, rtol=1e-10), f"{(p.grad - g).abs().max():.3e}"


# --- fairseq's MultiheadAttention: every option it has -------------------------------------------------
FAIRSEQ_OPTIONS = {
    "self": dict(self_attention=True),
    "bias_kv": dict(self_attention=True, add_bias_kv=True),
    "zero_attn": dict(self_attention=True, add_zero_attn=True),
    "bias_kv+zero_attn": dict(self_attention=True, add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(self_attention=True, bias=False),
    "enc_dec_kdim_vdim": dict(encoder_decoder_attention=True, kdim=6, vdim=10),
    "enc_dec_bias_kv": dict(encoder_decoder_attention=True, kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True),
    "cross_not_self": dict(self_attention=False, kdim=5, vdim=5),
}


def _fairseq_attention(options, shrink):
    pytest.importorskip("fairseq")
    from fairseq.modules import MultiheadAttention

    from fnl_fairseq.modules.attention import shrink_heads_
    torch.manual_seed(5)
    attn = MultiheadAttention(8, 2, **options).eval()
    if shrink:  # the plugin's attention: d_h 4 -> 3
        shrink_heads_(attn, 3)
    with torch.no_grad():  # non-zero biases everywhere (fairseq initialises some to zero)
        for p in attn.parameters():
            if p.dim() != 2:
                p.normal_()
    return attn


def _run(attn, x, kv, static_kv):
    key = x if attn.self_attention else kv[0]
    value = x if attn.self_attention else kv[1]
    return attn(x, key, value, static_kv=static_kv, need_weights=False)[0]


def _paths(options, shrink):
    """The forward paths fairseq 0.12 runs for these options (static_kv: whether to pass static_kv=True)."""
    if shrink:  # the plugin's own path for training and scoring, fairseq's explicit one otherwise
        return [False, True]
    paths = []
    # fairseq's explicit path (static_kv=True) fails on bias_k and reads values through v_proj(key)
    if not options.get("add_bias_kv") and options.get("kdim", 8) == options.get("vdim", 8):
        paths.append(True)
    if options.get("bias", True):  # its call of torch's fused path needs q/k/v biases
        paths.append(False)
    return paths


@pytest.mark.parametrize("shrink", [False, True])
@pytest.mark.parametrize("name", list(FAIRSEQ_OPTIONS))
def test_fairseq_balancing_keeps_outputs(name, shrink):
    """``--spectral-quekey`` / ``--spectral-outval`` keep the function with every fairseq attention option."""
    options = FAIRSEQ_OPTIONS[name]
    if shrink and options.get("add_bias_kv"):
        with pytest.raises(ValueError, match="cannot shrink the heads of an attention built with add_bias_kv"):
            _fairseq_attention(options, shrink)
        return
    from fnl_fairseq.modules.attention import balance_attention_
    attn = _fairseq_attention(options, shrink)
    x = torch.randn(5, 3, 8)
    kv = (torch.randn(7, 3, attn.kdim), torch.randn(7, 3, attn.vdim))
    paths = _paths(options, shrink)
    before = [_run(attn, x, kv, p) for p in paths]
    heads, dh = attn.num_heads, attn.head_dim
    weights = {n: getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    balance_attention_(attn, quekey=True, outval=True)
    for p, y in zip(paths, before):
        y2 = _run(attn, x, kv, p)
        rel = ((y2 - y).norm() / y.norm()).item()
        assert rel < 1e-5, f"{name}, static_kv={p}: outputs changed by {rel:.2e} (relative)"
    for left, right in (("q_proj", "k_proj"), ("out_proj", "v_proj")):  # rebalanced: equal per-head spectra
        w_l = getattr(attn, left).weight.detach().double()
        w_l = w_l.T if left == "out_proj" else w_l
        s_l = torch.linalg.svdvals(w_l.reshape(heads, dh, -1))
        s_r = torch.linalg.svdvals(getattr(attn, right).weight.detach().double().reshape(heads, dh, -1))
        assert torch.allclose(s_l, s_r, rtol=1e-4), f"{left}/{right}: {s_l} vs {s_r}"
        assert not torch.allclose(getattr(attn, left).weight, weights[left], rtol=1e-2), f"{left} unchanged"
