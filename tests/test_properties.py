"""Property-based tests (hypothesis): closed forms that must hold over random shapes and settings.

Each property is checked against something computed independently of the code under test: the
rank rules and parameter counts of docs/method.md, ``torch.utils.flop_counter.FlopCounterMode`` on
a real forward pass, ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Embedding`` on the same weights, and
autograd of the Frobenius penalty computed in float64 from the factors. The example budget is
small and fixed (``derandomize=True``): the file runs in seconds and every run sees the same
cases.
"""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fnl

FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# rank_scales that include exact halves (round-half-to-even matters) and overcomplete values
SCALES = st.one_of(st.sampled_from([0.1, 0.25, 0.5, 1 / 3, 0.75, 1.0, 1.5, 2.0]),
                   st.floats(0.01, 2.0, allow_nan=False, allow_infinity=False))


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _close(a, b, atol, rtol=0.0):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs diff {(a - b).abs().max().item():.3e}"


def _on_meta(module):
    """A copy of ``module`` on the meta device: FlopCounterMode counts from shapes, so no arithmetic runs."""
    return copy.deepcopy(module).to("meta")


def _per_sample_macs(module, make_input):
    """Multiply-adds per sample of ``module``'s forward, from FlopCounterMode (2 flops per MAC).

    The batch-1 count is subtracted from the batch-2 count, so work done once per call (the
    product ``U S``, rebuilding a dense kernel) cancels out; a first uncounted call fills any cache
    of weights made once (eager inference). Counted on a meta-device copy.
    """
    module = _on_meta(module)
    dtype = next(module.parameters()).dtype

    def meta_input(batch):
        x = make_input(batch)
        return x.to("meta", dtype) if x.is_floating_point() else x.to("meta")

    module(meta_input(1))
    flops = []
    for batch in (1, 2):
        x = meta_input(batch)
        with FlopCounterMode(display=False) as counter:
            module(x)
        flops.append(counter.get_total_flops())
    assert (flops[1] - flops[0]) % 2 == 0
    return (flops[1] - flops[0]) // 2


def _call_macs(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def _randomize_(layer, generator, scale=1.0):
    """Random values in every factor (and S far from the identity), so the layout of each one matters."""
    with torch.no_grad():
        for p in layer.factor_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * scale)


# --- conv geometry ---------------------------------------------------------------------------------

@st.composite
def conv_geometry(draw, max_channels=6):
    """(in, out, kernel, stride, padding, dilation, (H, W)) with every argument in one of the forms
    ``nn.Conv2d`` accepts (an int, a tuple, a list; 'valid' / 'same' where defined)."""
    cin, cout = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    padding = draw(st.sampled_from(["pair", "list", "int", "valid", "same"]))
    if padding == "same" and ((sh, sw) != (1, 1) or dh * (kh - 1) % 2 or dw * (kw - 1) % 2):
        padding = "pair"
    if padding == "pair":
        padding = (ph, pw)
    elif padding == "list":
        padding = [ph, pw]
    elif padding == "int":
        padding, pw = ph, ph
    elif padding == "valid":
        ph = pw = 0
    else:
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    kernel = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    stride = sh if sh == sw and draw(st.booleans()) else (sh, sw)
    dilation = dh if dh == dw and draw(st.booleans()) else (dh, dw)
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 4))
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 4))
    return cin, cout, kernel, stride, padding, dilation, (h, w)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_kernel_from_factors(layer):
    """The dense kernel (out, in, kh, kw) of a FactorizedConv2d, from the layout of docs/method.md#conv2d:
    ``M[(o, h), (i, w)] = (U S Vᵀ)`` read back as ``K[o, i, h, w]``."""
    kh, kw = layer.kernel_size
    u, v = layer.U.detach().double(), layer.V.detach().double()
    if layer.S is not None:
        u = u @ layer.S.detach().double()
    m = u @ v.T
    return m.reshape(layer.out_channels, kh, layer.in_channels, kw).permute(0, 2, 1, 3)


# --- rank rules and parameter counts -------------------------------------------------------------

@FAST
@given(m=st.integers(1, 40), n=st.integers(1, 40), scale=SCALES, square=st.booleans(), bias=st.booleans())
def test_linear_rank_rule_and_parameter_count(m, n, scale, square, bias):
    layer = fnl.FactorizedLinear(n, m, bias, rank_scale=scale, square=square)
    r = max(1, round(scale * min(m, n)))
    assert layer.rank == r
    assert tuple(layer.U.shape) == (m, r) and tuple(layer.V.shape) == (n, r)
    assert (layer.S is not None) == square and (not square or tuple(layer.S.shape) == (r, r))
    assert layer.num_parameters() == r * (m + n) + (r * r if square else 0) + (m if bias else 0)
    assert layer.dense_num_parameters() == m * n + (m if bias else 0)
    assert layer.dense_num_parameters() == sum(p.numel() for p in layer.to_dense().parameters())


@FAST
@given(geo=conv_geometry(), scale=SCALES, square=st.booleans(), bias=st.booleans())
def test_conv_rank_rule_and_parameter_count(geo, scale, square, bias):
    cin, cout, kernel, stride, padding, dilation, _ = geo
    kh, kw = _pair(kernel)
    layer = fnl.FactorizedConv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, rank_scale=scale,
                                 square=square)
    r = max(1, round(scale * cout * kh))  # the paper's convention: out * kh, even above min(out*kh, in*kw)
    assert layer.rank == r
    assert tuple(layer.U.shape) == (cout * kh, r) and tuple(layer.V.shape) == (cin * kw, r)
    assert layer.num_parameters() == r * (cout * kh + cin * kw) + (r * r if square else 0) + (cout if bias else 0)
    assert layer.dense_num_parameters() == cout * cin * kh * kw + (cout if bias else 0)
    assert layer.dense_num_parameters() == sum(p.numel() for p in layer.to_dense().parameters())


@FAST
@given(vocab=st.integers(1, 50), dim=st.integers(1, 30), scale=SCALES, square=st.booleans())
def test_embedding_rank_rule_and_parameter_count(vocab, dim, scale, square):
    layer = fnl.FactorizedEmbedding(vocab, dim, rank_scale=scale, square=square)
    r = max(1, round(scale * min(vocab, dim)))
    assert layer.rank == r
    assert tuple(layer.U.shape) == (vocab, r) and tuple(layer.V.shape) == (dim, r)
    assert layer.num_parameters() == r * (vocab + dim) + (r * r if square else 0)
    assert layer.dense_num_parameters() == vocab * dim == layer.to_dense().weight.numel()


# --- MAC counts against FlopCounterMode ----------------------------------------------------------

@FAST
@given(m=st.integers(1, 24), n=st.integers(1, 24), rank=st.integers(1, 12), square=st.booleans(),
       bias=st.booleans(), lead=st.lists(st.integers(1, 3), max_size=2))
def test_linear_macs_match_flop_counter(m, n, rank, square, bias, lead):
    layer = fnl.FactorizedLinear(n, m, bias, rank=rank, square=square)
    shape = (*lead, n)
    assert layer.macs(shape) == _per_sample_macs(layer, lambda b: torch.randn(b, *shape))
    assert layer.dense_macs(shape) == _per_sample_macs(layer.to_dense(), lambda b: torch.randn(b, *shape))


@FAST
@given(geo=conv_geometry(), rank=st.integers(1, 12), square=st.booleans(), bias=st.booleans(),
       path=st.sampled_from(["auto", "factored", "dense"]))
def test_conv_macs_match_flop_counter(geo, rank, square, bias, path):
    """Per-sample MACs of the path forward takes, and of the dense conv, as torch counts them
    (stride, asymmetric padding and dilation all change the output size)."""
    cin, cout, kernel, stride, padding, dilation, (h, w) = geo
    layer = fnl.FactorizedConv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, rank=rank,
                                 square=square, path=path)
    shape = (cin, h, w)
    assert layer.macs(shape) == _per_sample_macs(layer, lambda b: torch.randn(b, *shape))
    dense = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias)
    assert layer.dense_macs(shape) == _per_sample_macs(dense, lambda b: torch.randn(b, *shape))
    with torch.no_grad():  # eager inference: the same convs (their weights are made once and reused)
        assert layer.macs(shape) == _per_sample_macs(layer, lambda b: torch.randn(b, *shape))


@FAST
@given(vocab=st.integers(2, 30), dim=st.integers(1, 20), rank=st.integers(1, 10), square=st.booleans(),
       length=st.integers(1, 6))
def test_embedding_macs_match_flop_counter(vocab, dim, rank, square, length):
    layer = fnl.FactorizedEmbedding(vocab, dim, rank=rank, square=square)
    assert layer.macs((length,)) == _per_sample_macs(layer, lambda b: torch.randint(0, vocab, (b, length)))
    assert layer.dense_macs((length,)) == 0 == _per_sample_macs(layer.to_dense(),
                                                                 lambda b: torch.randint(0, vocab, (b, length)))


class _Net(nn.Module):
    def __init__(self, c, k, stride, padding, dilation):
        super().__init__()
        self.conv = nn.Conv2d(3, c, k, stride, padding, dilation)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.keep_same = nn.Conv2d(c, c, (3, 1), padding="same", dilation=2)  # left dense: string paddings
        self.keep_valid = nn.Conv2d(c, c, (1, 2), padding="valid")
        self.mix = nn.Linear(c, 6)  # applied at every pixel: MACs scale with the pixels
        self.mix_dense = nn.Linear(6, 6)  # the same, left dense
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.keep_valid(self.keep_same(self.conv2(torch.relu(self.bn(self.conv(x))))))
        x = self.mix_dense(self.mix(x.flatten(2).transpose(1, 2)))  # (B, H*W, 6)
        return self.fc(x.mean(1))


@FAST
@given(c=st.integers(2, 8), kernel=st.sampled_from([1, 3, (3, 1), (1, 3), (2, 3)]),
       stride=st.sampled_from([1, 2, (2, 1), (1, 2)]), padding=st.sampled_from([0, 1, (0, 2), (2, 0)]),
       dilation=st.sampled_from([1, 2, (1, 2)]), scale=st.sampled_from([0.2, 0.5, 1.0, 2.0]),
       square=st.booleans())
def test_summary_and_count_macs_match_flop_counter(c, kernel, stride, padding, dilation, scale, square):
    """Whole-model counts: ``summary`` / ``count_macs`` against a traced forward of the model, and of
    the collapsed (dense) model; parameters against the collapsed model."""
    torch.manual_seed(0)
    model = fnl.factorize(_Net(c, kernel, stride, padding, dilation), rank_scale=scale, square=square,
                          exclude=["mix_dense", "keep_*"]).eval()
    size = (3, 9, 10)
    s = fnl.summary(model, size)
    assert s.total_macs == fnl.count_macs(model, size) == _per_sample_macs(model, lambda b: torch.randn(b, *size))
    assert s.total_params == fnl.count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert s.dense_macs == fnl.count_macs(model, size, dense=True)
    assert s.macs_ratio == s.total_macs / s.dense_macs and s.param_ratio == s.total_params / s.dense_params
    dense = fnl.collapse(model)
    assert s.dense_macs == _per_sample_macs(dense, lambda b: torch.randn(b, *size))
    assert s.dense_params == fnl.count_parameters(dense) == sum(p.numel() for p in dense.parameters())


# --- the conv path rule ----------------------------------------------------------------------------

@FAST
@given(cin=st.integers(1, 64), cout=st.integers(1, 64), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 4), sw=st.integers(1, 4), rank=st.integers(1, 200))
def test_conv_auto_path_rule(cin, cout, kh, kw, sh, sw, rank):
    """'auto' takes the dense path exactly when the two convs cost at least as much per output pixel:
    ``r (in kw sh + out kh) >= out in kh kw`` (the (1 x kw) conv runs on every input row, sh per
    output row). Checked on the MAC counts too: well away from the boundary the chosen path is the
    cheaper one on a large input, whichever the strides."""
    layer = fnl.FactorizedConv2d(cin, cout, (kh, kw), (sh, sw), padding=(kh // 2, kw // 2), rank=rank, bias=False)
    factored = rank * (cin * kw * sh + cout * kh)
    assert layer.uses_dense_path == (factored >= cout * cin * kh * kw)
    shape = (cin, 96, 96)
    layer.path = "factored"
    factored_macs = layer.macs(shape)
    layer.path = "auto"
    ratio = factored_macs / layer.dense_macs(shape)
    if ratio < 0.85:
        assert not layer.uses_dense_path, ratio
    elif ratio > 1.2:
        assert layer.uses_dense_path, ratio


# --- full-rank round trips -------------------------------------------------------------------------

def _assert_balanced(layer, tol):
    """Spectral factors split each singular value evenly: column i of U and of V both have norm
    sqrt(s_i). Columns of numerically zero singular values and beyond min(m, n) are zero in V (and
    small random values in U, so that they can train)."""
    m, n = layer.U.shape[0], layer.V.shape[0]
    k = min(m, n, layer.rank)
    s = torch.linalg.svdvals(layer.matrix().detach().double())[:k]
    live = s > 1e-5 * s.max()
    u, v = layer.U.detach()[:, :k][:, live], layer.V.detach()[:, :k][:, live]
    atol = tol * 10 * (1 + s.max().sqrt().item())
    _close(u.norm(dim=0), s[live].sqrt(), atol)
    _close(v.norm(dim=0), s[live].sqrt(), atol)
    dead = torch.cat([layer.V.detach()[:, :k][:, ~live], layer.V.detach()[:, k:]], 1)
    assert torch.equal(dead, torch.zeros_like(dead))


@FAST
@given(m=st.integers(1, 20), n=st.integers(1, 20), bias=st.booleans(), square=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_linear_full_rank_round_trip(m, n, bias, square, dtype, seed):
    torch.manual_seed(seed)
    dense = nn.Linear(n, m, bias, dtype=dtype)
    layer = fnl.FactorizedLinear.from_dense(dense, rank_scale=1.0, square=square)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert layer.U.dtype == dtype
    _assert_balanced(layer, tol)
    back = layer.to_dense()
    _close(back.weight, dense.weight, tol)
    if bias:
        assert torch.equal(back.bias, dense.bias)
    x = torch.randn(3, n, dtype=dtype)
    _close(layer(x), dense(x), tol * 10)


@FAST
@given(vocab=st.integers(2, 25), dim=st.integers(1, 20), square=st.booleans(), pad=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_embedding_full_rank_round_trip(vocab, dim, square, pad, dtype, seed):
    torch.manual_seed(seed)
    padding_idx = -1 if pad else None
    dense = nn.Embedding(vocab, dim, padding_idx, dtype=dtype)
    layer = fnl.FactorizedEmbedding.from_dense(dense, rank_scale=1.0, square=square)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_balanced(layer, tol)
    back = layer.to_dense()
    assert back.padding_idx == dense.padding_idx
    _close(back.weight, dense.weight, tol)
    idx = torch.randint(0, vocab, (2, 7))
    _close(layer(idx), dense(idx), tol)
    if pad:
        assert torch.equal(layer(torch.tensor([vocab - 1])), torch.zeros(1, dim, dtype=dtype))


@FAST
@given(geo=conv_geometry(), bias=st.booleans(), square=st.booleans(),
       path=st.sampled_from(["auto", "factored", "dense"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_conv_full_rank_round_trip(geo, bias, square, path, dtype, seed):
    """rank_scale 1 (rank out*kh >= min(out*kh, in*kw)) reproduces any conv on every path."""
    cin, cout, kernel, stride, padding, dilation, (h, w) = geo
    torch.manual_seed(seed)
    dense = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, dtype=dtype)
    layer = fnl.FactorizedConv2d.from_dense(dense, rank_scale=1.0, square=square, path=path)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert layer.path == path
    _assert_balanced(layer, tol)
    back = layer.to_dense()
    assert (back.stride, back.dilation, back.kernel_size) == (dense.stride, dense.dilation, dense.kernel_size)
    _close(back.weight, dense.weight, tol)
    x = torch.randn(2, cin, h, w, dtype=dtype)
    ref = dense(x)
    _close(layer(x), ref, tol * 10)
    _close(back(x), ref, tol * 10)


@FAST
@given(geo=conv_geometry(), rank=st.integers(1, 10), square=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_random_factors_agree_with_the_closed_form_kernel(geo, rank, square, seed):
    """Random U, S, V (S not the identity): both paths, eager inference (cached weights) and
    ``to_dense`` compute ``F.conv2d`` with the kernel of docs/method.md#conv2d."""
    cin, cout, kernel, stride, padding, dilation, (h, w) = geo
    g = torch.Generator().manual_seed(seed)
    layer = fnl.FactorizedConv2d(cin, cout, kernel, stride, padding, dilation, rank=rank, square=square,
                                 dtype=torch.float64)
    _randomize_(layer, g)
    kernel_ref = _conv_kernel_from_factors(layer)
    _close(layer.dense_weight(), kernel_ref, 1e-12)
    x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
    ref = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(kernel_ref)
        ref.bias.copy_(layer.bias)
    y_ref = ref(x)
    for path in ("factored", "dense"):
        layer.path = path
        _close(layer(x), y_ref, 1e-10)
        with torch.no_grad():
            _close(layer(x), y_ref, 1e-10)
    _close(layer.to_dense()(x), y_ref, 1e-10)


@FAST
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_linear_and_embedding_random_square_factors_match_the_dense_layer(m, n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    lin = fnl.FactorizedLinear(n, m, rank=rank, square=True, dtype=torch.float64)
    emb = fnl.FactorizedEmbedding(m, n, rank=rank, square=True, dtype=torch.float64)
    for layer in (lin, emb):
        _randomize_(layer, g)
        _close(layer.dense_weight(), layer.U.detach() @ layer.S.detach() @ layer.V.detach().T, 1e-12)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    _close(lin(x), x @ (lin.U @ lin.S @ lin.V.T).T + lin.bias, 1e-10)
    idx = torch.randint(0, m, (3, 5), generator=g)
    _close(emb(idx), emb.to_dense()(idx), 1e-10)
    _close(emb(idx), (emb.U @ emb.S @ emb.V.T)[idx], 1e-10)


@FAST
@given(geo=conv_geometry(), rank=st.integers(1, 10), square=st.booleans(), bias=st.booleans(),
       path=st.sampled_from(["auto", "factored", "dense"]), seed=st.integers(0, 2 ** 16))
def test_conv_inference_form_is_the_same_function_in_plain_layers(geo, rank, square, bias, path, seed):
    """``inference_form()``: plain torch layers (no fnl class), same outputs, the MACs and parameters
    of the path the layer takes (``U S`` stored as one factor)."""
    cin, cout, kernel, stride, padding, dilation, (h, w) = geo
    g = torch.Generator().manual_seed(seed)
    layer = fnl.FactorizedConv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, rank=rank,
                                 square=square, path=path, dtype=torch.float64)
    _randomize_(layer, g)
    plain = layer.inference_form()
    assert not any(type(m).__module__.startswith("fnl") for m in plain.modules())
    x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
    _close(plain(x), layer(x), 1e-10)
    shape = (cin, h, w)
    assert _per_sample_macs(plain, lambda b: torch.randn(b, *shape)) == layer.macs(shape)
    kh, kw = _pair(kernel)
    expected = cout * cin * kh * kw if layer.uses_dense_path else rank * (cout * kh + cin * kw)
    assert sum(p.numel() for p in plain.parameters()) == expected + (cout if bias else 0)


@FAST
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(1, 8), square=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear_and_embedding_inference_forms(m, n, rank, square, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = fnl.FactorizedLinear(n, m, bias, rank=rank, square=square, dtype=torch.float64)
    emb = fnl.FactorizedEmbedding(m, n, padding_idx=0, rank=rank, square=square, dtype=torch.float64)
    for layer in (lin, emb):
        _randomize_(layer, g)
    x = torch.randn(3, 2, n, generator=g, dtype=torch.float64)
    idx = torch.randint(0, m, (3, 4), generator=g)
    for layer, inp, extra in ((lin, x, m if bias else 0), (emb, idx, 0)):
        plain = layer.inference_form()
        assert not any(type(mod).__module__.startswith("fnl") for mod in plain.modules())
        _close(plain(inp), layer(inp), 1e-10)
        assert sum(p.numel() for p in plain.parameters()) == rank * (m + n) + extra
        assert _per_sample_macs(plain, lambda b: inp[:1].expand(b, *inp.shape[1:])) == layer.macs(tuple(inp.shape[1:]))


@FAST
@given(geo=conv_geometry(), padding_mode=st.sampled_from(["reflect", "replicate", "circular"]))
def test_conv_rejects_unsupported_settings(geo, padding_mode):
    cin, cout, kernel, stride, padding, dilation, _ = geo
    with pytest.raises(ValueError, match="groups"):
        fnl.FactorizedConv2d(cin * 2, cout * 2, kernel, stride, padding, dilation, groups=2, rank=1)
    with pytest.raises(ValueError, match="padding_mode"):
        fnl.FactorizedConv2d(cin, cout, kernel, stride, padding, dilation, rank=1, padding_mode=padding_mode)
    with pytest.raises(ValueError, match="groups"):
        fnl.FactorizedConv2d.from_dense(nn.Conv2d(cin * 2, cout * 2, kernel, stride, padding, dilation, groups=2),
                                        rank=1)


# --- Frobenius decay ---------------------------------------------------------------------------------

def _make_layer(kind, dims, rank, square, dtype):
    a, b, kh, kw = dims
    if kind == "linear":
        return fnl.FactorizedLinear(a, b, rank=rank, square=square, dtype=dtype)
    if kind == "embedding":
        return fnl.FactorizedEmbedding(a, b, rank=rank, square=square, dtype=dtype)
    return fnl.FactorizedConv2d(a, b, (kh, kw), rank=rank, square=square, dtype=dtype)


def _penalty_grads_f64(layer, coef):
    """Autograd of ``(coef/2) ||U S Vᵀ||_F²`` with the product formed explicitly, in float64."""
    fs = [p.detach().double().requires_grad_() for p in layer.factor_parameters()]
    u, v = fs[0], fs[-1]
    if len(fs) == 3:
        u = u @ fs[1]
    penalty = 0.5 * coef * (u @ v.T).square().sum()
    return penalty.detach(), torch.autograd.grad(penalty, fs)


DIMS = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 3), st.integers(1, 3))


@FAST
@given(kind=st.sampled_from(["linear", "conv", "embedding"]), dims=DIMS, rank=st.integers(1, 8),
       square=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       coef=st.floats(1e-3, 10.0), seed=st.integers(0, 2 ** 16))
def test_fd_step_equals_autograd_of_the_penalty(kind, dims, rank, square, dtype, coef, seed):
    """``add_frobenius_grad_`` adds exactly the autograd gradient of the penalty to existing gradients,
    leaves no autograd graph on ``.grad``, and ``frobenius_norm_sq`` is the norm of the product."""
    g = torch.Generator().manual_seed(seed)
    layer = _make_layer(kind, dims, rank, square, dtype)
    _randomize_(layer, g)
    penalty, expected = _penalty_grads_f64(layer, coef)
    before = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in layer.factor_parameters()]
    for p, b in zip(layer.factor_parameters(), before):
        p.grad = b.clone()
    layer.add_frobenius_grad_(coef)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for p, b, e in zip(layer.factor_parameters(), before, expected):
        assert p.grad.dtype == dtype and p.grad.grad_fn is None and not p.grad.requires_grad
        scale = e.abs().max().item() + b.abs().max().item()
        _close(p.grad, b.double() + e, rtol * scale)
    norm_sq = layer.frobenius_norm_sq()
    assert norm_sq.dtype == dtype
    _close(norm_sq, penalty * 2 / coef, rtol * penalty.item() * 2 / coef)
    assert norm_sq.requires_grad  # differentiable (used by frobenius_penalty)
    _close(fnl.frobenius_penalty(layer, coef), penalty, rtol * penalty.item())


def _bf16_ulp(t):
    return torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(t.abs().clamp_min(1e-30)))


def _assert_bf16_correctly_rounded(got, ref64):
    """``got`` (bf16) is ``ref64`` rounded once to bf16: within one bf16 unit in the last place of
    the float64 value (plus float32-level slack for cancellation) on every element. FD computed in
    bf16 is off by many units on about a third of the elements."""
    ref = ref64.double()
    err = (got.double() - ref).abs()
    allowed = _bf16_ulp(ref) + 1e-6 * ref.abs().max()
    assert bool((err <= allowed).all()), f"{int((err > allowed).sum())} of {err.numel()} elements off by > 1 ulp"


@FAST
@given(kind=st.sampled_from(["linear", "conv", "embedding"]), dims=DIMS, rank=st.integers(1, 8),
       square=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fd_step_of_bf16_factors_is_computed_in_float32(kind, dims, rank, square, seed):
    g = torch.Generator().manual_seed(seed)
    layer = _make_layer(kind, dims, rank, square, torch.bfloat16)
    _randomize_(layer, g)
    penalty, expected = _penalty_grads_f64(layer, 1.0)
    layer.add_frobenius_grad_(1.0)
    for p, e in zip(layer.factor_parameters(), expected):
        assert p.grad.dtype == torch.bfloat16
        _assert_bf16_correctly_rounded(p.grad, e)
    norm_sq = layer.frobenius_norm_sq()
    assert norm_sq.dtype == torch.float32
    _close(norm_sq, 2 * penalty, 1e-5 * 2 * penalty.item())


def test_fd_step_of_bf16_factors_is_computed_in_float32_large():
    """One layer large enough that FD computed in bf16 rounds most of the r x r Gram entries."""
    g = torch.Generator().manual_seed(0)
    for square in (False, True):
        layer = fnl.FactorizedLinear(48, 64, rank=16, square=square, dtype=torch.bfloat16)
        _randomize_(layer, g)
        _, expected = _penalty_grads_f64(layer, 0.5)
        layer.add_frobenius_grad_(0.5)
        for p, e in zip(layer.factor_parameters(), expected):
            _assert_bf16_correctly_rounded(p.grad, e)


@FAST
@given(kind=st.sampled_from(["linear", "conv", "embedding"]), dims=DIMS, rank=st.integers(1, 6),
       square=st.booleans(), factor=st.floats(0.01, 100.0))
def test_scale_matrix_scales_the_product_and_keeps_the_balance(kind, dims, rank, square, factor):
    layer = _make_layer(kind, dims, rank, square, torch.float64)
    _randomize_(layer, torch.Generator().manual_seed(rank))
    before = layer.matrix().detach().clone()
    norms = [p.detach().norm().item() for p in (layer.U, layer.V)]
    layer.scale_matrix_(factor)
    # float64 factors get a float64 square root: agreement to float64 precision, not float32's
    _close(layer.matrix().detach(), factor * before, 1e-12 * factor * before.abs().max().item())
    for p, n in zip((layer.U, layer.V), norms):  # each of U and V by sqrt(factor)
        assert p.detach().norm().item() == pytest.approx(n * math.sqrt(factor), rel=1e-12)


# --- tensor convs (TT, Tucker) ----------------------------------------------------------------------

TENSOR_CLASSES = st.sampled_from([fnl.TTConv2d, fnl.TuckerConv2d])
CHANNELS = st.sampled_from([1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24])


def _tensor_from_cores(layer):
    """The 3-way tensor (n_1, n_2, n_3) of a TT or Tucker layer, contracted here in float64."""
    if isinstance(layer, fnl.TTConv2d):
        c1, c2, c3 = (c.detach().double().reshape(c.shape[0], -1, c.shape[-1]) for c in layer.factor_parameters())
        return torch.einsum("xia,ajb,bky->ijk", c1, c2, c3)
    g, a1, a2, a3 = (p.detach().double() for p in layer.factor_parameters())
    return torch.einsum("abc,ia,jb,kc->ijk", g, a1, a2, a3)


def _matrix_from_tensor(layer, t):
    """``n_k = (o_k, i_k)`` row-major: T[(o1 i1), (o2 i2), (o3 i3)] -> W[(o1 o2 o3), (i1 i2 i3)]."""
    (o1, o2, o3), (i1, i2, i3) = layer.out_modes, layer.in_modes
    return t.reshape(o1, i1, o2, i2, o3, i3).permute(0, 2, 4, 1, 3, 5).reshape(layer.out_channels, layer.in_channels)


def _full_ranks(cls, n):
    if cls is fnl.TuckerConv2d:
        return tuple(n)
    return (min(n[0], n[1] * n[2]), min(n[0] * n[1], n[2]))


@FAST
@given(cls=TENSOR_CLASSES, cin=CHANNELS, cout=CHANNELS, k=st.sampled_from([1, 3, (1, 3), (3, 2)]),
       scale=st.floats(0.05, 1.0), bias=st.booleans())
def test_tensor_conv_rank_rule_and_parameter_count(cls, cin, cout, k, scale, bias):
    layer = cls(cin, cout, k, rank_scale=scale, bias=bias)
    o, i = fnl.tensor_modes(cout, cin)
    assert (layer.out_modes, layer.in_modes) == (o, i)
    assert math.prod(o) == cout and math.prod(i) == cin
    n = [a * b for a, b in zip(o, i)]
    kh, kw = _pair(k)
    fixed = (cin * kh * kw if (kh, kw) != (1, 1) else 0) + (cout if bias else 0)
    if cls is fnl.TTConv2d:
        ranks = tuple(max(1, round(scale * min(n[j], n[j + 1]))) for j in range(2))
        r = (1, *ranks, 1)
        cores = sum(r[j] * n[j] * r[j + 1] for j in range(3))
    else:
        ranks = tuple(max(1, round(scale * nk)) for nk in n)
        cores = math.prod(ranks) + sum(a * b for a, b in zip(n, ranks))
    assert layer.ranks == ranks
    assert layer.num_parameters() == cores + fixed == sum(p.numel() for p in layer.parameters())
    assert layer.dense_num_parameters() == cout * cin * kh * kw + (cout if bias else 0)


@FAST
@given(cls=TENSOR_CLASSES, cin=CHANNELS, cout=CHANNELS, geo=conv_geometry(max_channels=1), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_tensor_conv_layout_paths_and_full_rank_round_trip(cls, cin, cout, geo, bias, seed):
    """Random cores: the 1x1 matrix is the closed-form layout of the cores, every path computes
    ``nn.Conv2d`` with the kernel ``W[o, i] D[i]`` (strides, asymmetric paddings, dilations; 1x1
    kernels pad and subsample without a depthwise conv), and at full ranks ``from_dense`` of that
    conv gives the same layer back."""
    _, _, kernel, stride, padding, dilation, (h, w) = geo
    if isinstance(padding, str):
        padding = 0 if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(_pair(dilation), _pair(kernel)))
    g = torch.Generator().manual_seed(seed)
    o, i = fnl.tensor_modes(cout, cin)
    ranks = _full_ranks(cls, [a * b for a, b in zip(o, i)])
    layer = cls(cin, cout, kernel, stride, padding, dilation, bias=bias, rank=ranks, dtype=torch.float64)
    _randomize_(layer, g, scale=0.7)
    mat = _matrix_from_tensor(layer, _tensor_from_cores(layer))
    _close(layer.matrix(), mat, 1e-12)
    kh, kw = _pair(kernel)
    kernel_ref = mat[:, :, None, None] * (layer.depthwise.detach().view(1, cin, kh, kw) if (kh, kw) != (1, 1) else 1)
    ref = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(kernel_ref)
        if bias:
            ref.bias.copy_(layer.bias)
    x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
    y_ref = ref(x)
    for path in ("auto", "factored", "dense"):
        layer.path = path
        _close(layer(x), y_ref, 1e-10)
    _close(layer.to_dense().weight, kernel_ref, 1e-12)
    back = cls.from_dense(ref, rank=ranks)
    _close(back.dense_weight(), kernel_ref, 1e-9)
    _close(back(x), y_ref, 1e-9)


@FAST
@given(cls=TENSOR_CLASSES, cin=CHANNELS, cout=CHANNELS, k=st.sampled_from([1, 3, (1, 3)]),
       stride=st.sampled_from([1, 2, (2, 1)]), scale=st.floats(0.1, 1.0))
def test_tensor_conv_macs_match_flop_counter(cls, cin, cout, k, stride, scale):
    """Per-sample MACs of each path as torch counts them; 'auto' never costs more than the cheaper of
    the two for the batch at hand (both contraction directions tried)."""
    layer = cls(cin, cout, k, stride, padding=1, rank_scale=scale)
    shape = (cin, 7, 6)
    per_path = {}
    for path in ("factored", "dense"):
        layer.path = path
        per_path[path] = layer.macs(shape)
        assert per_path[path] == _per_sample_macs(layer, lambda b: torch.randn(b, *shape)), path
    layer.path = "auto"
    assert layer.macs(shape) == min(per_path.values())
    n, r = layer.modes, layer.ranks
    extra = r[0] * r[1] * r[2] * n[1] if cls is fnl.TuckerConv2d else 0  # G x_2 A_2, once per call on both paths
    layer = _on_meta(layer)
    for batch in (1, 4, 32):
        x = torch.randn(batch, *shape, device="meta")
        calls = {}
        for path in ("factored", "dense", "auto"):
            layer.path = path
            calls[path] = _call_macs(layer, x)
        assert calls["auto"] <= min(calls["factored"], calls["dense"]) + extra, (batch, calls)
    dense = nn.Conv2d(cin, cout, k, stride, 1)
    assert layer.dense_macs(shape) == _per_sample_macs(dense, lambda b: torch.randn(b, *shape))


def _core_tensor(cls, cores):
    """The full (in, out, kernel) tensor a TT or Tucker conv's cores stand for, built by einsum."""
    if cls is fnl.TTConv2d:
        return torch.einsum("xia,ajb,bky->ijk", *(c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores))
    return torch.einsum("abc,ia,jb,kc->ijk", *cores)


@FAST
@given(cls=TENSOR_CLASSES, cin=CHANNELS, cout=CHANNELS, scale=st.floats(0.1, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float64]), coef=st.floats(1e-2, 5.0),
       seed=st.integers(0, 2 ** 16))
def test_tensor_conv_fd_step_equals_autograd_of_the_penalty(cls, cin, cout, scale, dtype, coef, seed):
    g = torch.Generator().manual_seed(seed)
    layer = cls(cin, cout, 3, rank_scale=scale, dtype=dtype)
    _randomize_(layer, g, scale=0.5)
    cores = [p.detach().double().requires_grad_() for p in layer.factor_parameters()]
    t = _core_tensor(cls, cores)
    penalty = 0.5 * coef * t.square().sum()
    expected = torch.autograd.grad(penalty, cores)
    layer.add_frobenius_grad_(coef)
    rtol = 1e-10 if dtype == torch.float64 else 3e-5
    for p, e in zip(layer.factor_parameters(), expected):
        assert p.grad.dtype == dtype and p.grad.grad_fn is None
        _close(p.grad, e, rtol * e.abs().max().item())
    assert layer.depthwise.grad is None  # the depthwise filters are not factors
    _close(layer.frobenius_norm_sq(), 2 * penalty.detach() / coef, rtol * 2 * penalty.item() / coef)


@FAST
@given(cls=TENSOR_CLASSES, cin=CHANNELS, cout=CHANNELS, seed=st.integers(0, 2 ** 16))
def test_tensor_conv_fd_step_of_bf16_cores_is_computed_in_float32(cls, cin, cout, seed):
    g = torch.Generator().manual_seed(seed)
    layer = cls(cin, cout, 1, rank_scale=1.0, dtype=torch.bfloat16)
    _randomize_(layer, g, scale=0.5)
    cores = [p.detach().double().requires_grad_() for p in layer.factor_parameters()]
    t = _core_tensor(cls, cores)
    expected = torch.autograd.grad(0.5 * t.square().sum(), cores)
    layer.add_frobenius_grad_(1.0)
    for p, e in zip(layer.factor_parameters(), expected):
        assert p.grad.dtype == torch.bfloat16
        _assert_bf16_correctly_rounded(p.grad, e)


# --- the normalisation experiment ----------------------------------------------------------------------

@FAST
@given(square=st.booleans(), scales=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6),
       steps_per_epoch=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_recorder_and_normalizer_follow_the_product_norms(square, scales, steps_per_epoch, seed):
    """``FrobeniusNormRecorder`` records ``||U S Vᵀ||_F`` of every layer (tensor cores included) in
    ``modules()`` order, epoch-major; ``FrobeniusNormalizer`` brings each layer back to the recorded
    norm of each step, scaling U and V alike (cores alike) so the product's direction is kept."""
    scales = scales[:len(scales) // steps_per_epoch * steps_per_epoch]
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(fnl.FactorizedLinear(6, 5, rank=3, square=square, dtype=torch.float64),
                          fnl.FactorizedConv2d(2, 3, (3, 2), rank=4, square=square, dtype=torch.float64),
                          fnl.TTConv2d(4, 6, 3, rank=2, dtype=torch.float64),
                          fnl.FactorizedEmbedding(7, 4, rank=2, square=square, dtype=torch.float64))
    layers = list(model)
    for layer in layers:
        _randomize_(layer, g)
    recorder = fnl.FrobeniusNormRecorder(model)
    expected = []
    for c in scales:  # each "step" multiplies every product by c
        for layer in layers:
            layer.scale_matrix_(c)
        recorder.record()
        expected.append([layer.matrix().detach().norm().item() for layer in layers])
    norms = recorder.norms(steps_per_epoch)
    assert norms.shape == (len(scales) // steps_per_epoch, steps_per_epoch, len(layers))
    _close(norms.reshape(-1, len(layers)), torch.tensor(expected), 1e-5 * max(map(max, expected)))
    # replay: perturb the norms, then the normaliser restores the recorded ones
    normalizer = fnl.FrobeniusNormalizer(model, norms)
    for step in range(len(scales)):
        before = [layer.matrix().detach().clone() for layer in layers]
        ratios = [layer.factor_parameters()[0].norm().item() / layer.factor_parameters()[-1].norm().item()
                  for layer in layers]
        normalizer.step()
        for layer, b, r, want in zip(layers, before, ratios, norms.reshape(-1, len(layers))[step]):
            w = layer.matrix().detach()
            assert w.norm().item() == pytest.approx(want.item(), rel=1e-5)
            _close(w / w.norm(), b / b.norm(), 1e-6)  # same direction
            fs = layer.factor_parameters()
            assert fs[0].norm().item() / fs[-1].norm().item() == pytest.approx(r, rel=1e-5)  # scaled alike
