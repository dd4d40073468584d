"""Tests aimed at the mutants of `fnl/base.py` (spectral initialisation, rank rule, default init, FD algebra).

Each asserts an exact behaviour or a closed form: the spectral factors are the balanced truncated
SVD of the weight (paper section 3.1: ``UVᵀ`` the rank-r truncation to float64 precision, ``UᵀU =
VᵀV = diag(s)``), computed in float64 and made on the weight's device; the layers' spectral init
factorizes the init applied to the dense weight and their default init gives each factor the bounds
of the layer it acts as, the bias those of the dense layer; the random extra columns are exactly
``1e-3`` times the generator's normal draws; the threshold below which singular directions count as
zero; the rounding of the rank rule; Frobenius decay against autograd; the messages of rejected
arguments.
"""
import math

import pytest
import torch
from torch import nn

import fnl
from fnl.base import check_positive_int, resolve_rank, spectral_factors


def test_extra_columns_are_small_normal_draws_of_the_generator():
    w = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, s, v = spectral_factors(w, 5, generator=torch.Generator().manual_seed(7))
    assert s is None and u.shape == (4, 5) and v.shape == (3, 5)
    want = torch.randn((4, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e-3
    assert torch.equal(u[:, 3:], want)
    assert torch.equal(v[:, 3:], torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(u @ v.T, w, rtol=0, atol=1e-12)


def test_rank_deficient_directions_are_treated_as_extra():
    # rank-1 matrix: the second singular value is rounding noise, far below s0 * max(m, n) * eps
    a = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    w = a @ torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    u, _, v = spectral_factors(w, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(v[:, 1], torch.zeros(2, dtype=torch.float64))
    want = torch.randn((3, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64)[:, 0] * 1e-3
    assert torch.equal(u[:, 1], want)
    torch.testing.assert_close(u @ v.T, w, rtol=0, atol=1e-12)
    # a small but genuine singular value (1e-8 of the largest, far above the threshold) is kept
    w2 = torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64))
    u2, _, v2 = spectral_factors(w2, 2)
    torch.testing.assert_close(u2 @ v2.T, w2, rtol=0, atol=1e-20)


def test_square_factor_dtype_and_device():
    w = torch.randn(3, 4).to(torch.bfloat16)
    u, s, v = spectral_factors(w, 2, square=True)
    assert u.dtype == v.dtype == s.dtype == torch.bfloat16
    assert torch.equal(s, torch.eye(2, dtype=torch.bfloat16))


def test_spectral_messages():
    with pytest.raises(ValueError, match=r"^weight must be a matrix, got shape \(2, 2, 2\)$"):
        spectral_factors(torch.ones(2, 2, 2), 1)
    with pytest.raises(ValueError, match=r"^weight has non-finite values \(inf or nan\); spectral init needs a "
                                         r"finite weight$"):
        spectral_factors(torch.tensor([[1.0, float("inf")]]), 1)


@pytest.mark.parametrize("scale, base, rank", [(0.5, 5, 2), (0.7, 5, 4), (0.01, 5, 1), (1.0, 7, 7), (0.3, 10, 3)])
def test_rank_rule_rounds_half_to_even_with_a_floor_of_one(scale, base, rank):
    assert resolve_rank(None, scale, base) == rank
    assert resolve_rank(3, None, base) == 3


def test_check_positive_int():
    assert check_positive_int("n", 1) == 1
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        check_positive_int("n", 0)
    with pytest.raises(TypeError, match=r"^n must be an int >= 1, got bool True$"):
        check_positive_int("n", True)
    with pytest.raises(TypeError, match=r"^n must be an int >= 1, got float 2\.0$"):
        check_positive_int("n", 2.0)


def test_zero_threshold_is_largest_singular_value_times_size_times_eps():
    # 2e-16 lies below 1 * 2 * eps (4.4e-16): a zero direction, not a kept one
    w = torch.diag(torch.tensor([1.0, 2e-16], dtype=torch.float64))
    u, _, v = spectral_factors(w, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(v[:, 1], torch.zeros(2, dtype=torch.float64))
    want = torch.randn((2, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)[:, 0] * 1e-3
    assert torch.equal(u[:, 1], want)
    # the size in the threshold is the larger side: 8e-16 is below 1 * 6 * eps (1.3e-15), above 1 * 2 * eps
    w = torch.zeros(2, 6, dtype=torch.float64)
    w[0, 0], w[1, 1] = 1.0, 8e-16
    for t in (w, w.T):
        u, _, v = spectral_factors(t, 2, generator=torch.Generator().manual_seed(5))
        assert torch.equal(v[:, 1], torch.zeros(v.shape[0], dtype=torch.float64))
        want = torch.randn((u.shape[0], 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)[:, 0]
        assert torch.equal(u[:, 1], want * 1e-3)
    # an all-zero weight: every direction is a zero direction (0 is not above a threshold of 0)
    u0, _, v0 = spectral_factors(torch.zeros(3, 2, dtype=torch.float64), 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(v0, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(u0, torch.randn((3, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-3)


# --- the rank rule's messages ----------------------------------------------------------------

def test_rank_rule_refusals_name_the_arguments():
    with pytest.raises(ValueError, match=r"^give exactly one of rank, rank_scale or target_ratio; got none$"):
        resolve_rank(None, None, 5)
    with pytest.raises(ValueError, match=r"^give exactly one of rank, rank_scale or target_ratio; got rank=2, "
                                         r"rank_scale=0\.5$"):
        resolve_rank(2, 0.5, 5)
    with pytest.raises(TypeError, match=r"^rank must be an int >= 1, got float 2\.0$"):
        resolve_rank(2.0, None, 5)
    with pytest.raises(ValueError, match=r"^rank_scale must be a finite float > 0 \(leave it unset for the dense "
                                         r"model\), got 0$"):
        resolve_rank(None, 0, 5)


# --- spectral factors against the truncated SVD (paper section 3.1) ------------------------------

def _truncation(w, r):
    """The best rank-r approximation of ``w`` (Eckart-Young), its singular values, all in float64."""
    p, s, qh = torch.linalg.svd(w.double(), full_matrices=False)
    return (p[:, :r] * s[:r]) @ qh[:r], s[:r]


@pytest.mark.parametrize("m, n", [(7, 4), (4, 7), (5, 5)])
@pytest.mark.parametrize("rank", [1, 3, 4, 6, 9])
def test_spectral_factors_are_the_balanced_truncated_svd(m, n, rank):
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m * 10 + n))
    u, s, v = spectral_factors(w, rank, generator=torch.Generator().manual_seed(1))
    assert s is None and u.shape == (m, rank) and v.shape == (n, rank) and u.dtype == v.dtype == torch.float64
    keep = min(rank, m, n)
    best, sv = _truncation(w, keep)
    torch.testing.assert_close(u @ v.T, best, rtol=0, atol=1e-12)
    # the singular values split evenly: UᵀU = VᵀV = diag(s) on the spectral columns
    torch.testing.assert_close(u[:, :keep].T @ u[:, :keep], torch.diag(sv), rtol=0, atol=1e-12)
    torch.testing.assert_close(v[:, :keep].T @ v[:, :keep], torch.diag(sv), rtol=0, atol=1e-12)
    # columns beyond min(m, n): V zero, U small non-zero draws (so the product is unchanged)
    assert torch.equal(v[:, keep:], torch.zeros(n, rank - keep, dtype=torch.float64))
    extra = u[:, keep:]
    assert bool((extra != 0).all()) and bool((extra.abs() < 1e-2).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spectral_factors_compute_in_float64_and_return_the_input_dtype(dtype):
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    u, s, v = spectral_factors(w, 3, square=True)
    u64, _, v64 = spectral_factors(w.double(), 3)
    assert u.dtype == v.dtype == s.dtype == dtype
    assert torch.equal(u, u64.to(dtype)) and torch.equal(v, v64.to(dtype))
    assert torch.equal(s, torch.eye(3, dtype=dtype))


def test_spectral_factors_of_empty_matrices_and_rank_zero():
    # no singular values at all: every column is an extra one (U the generator's draws, V empty)
    u, _, v = spectral_factors(torch.zeros(4, 0, dtype=torch.float64), 2, generator=torch.Generator().manual_seed(4))
    assert v.shape == (0, 2)
    assert torch.equal(u, torch.randn((4, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e-3)
    u, s, v = spectral_factors(torch.ones(4, 3), 0, square=True)
    assert u.shape == (4, 0) and v.shape == (3, 0) and s.shape == (0, 0)


def test_spectral_factors_follow_the_weight_device_not_the_default_device():
    # every tensor made inside is made on the weight's device: under a default device of "meta" a CPU
    # weight still gives the same CPU factors (a tensor made on the default device would be meta)
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    want = spectral_factors(w, 6, square=True, generator=torch.Generator().manual_seed(8))
    with torch.device("meta"):
        got = spectral_factors(w, 6, square=True, generator=torch.Generator().manual_seed(8))
    for a, b in zip(got, want):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_spectral_factors_never_form_the_full_basis(monkeypatch):
    # a tall matrix (an embedding table) needs only min(m, n) singular vectors: the full m x m basis
    # would cost m² memory (50,000² float64 = 20 GB for a 50k-word vocabulary)
    shapes = []
    svd = torch.linalg.svd

    def recording_svd(*args, **kwargs):
        out = svd(*args, **kwargs)
        shapes.append((tuple(out[0].shape), tuple(out[2].shape)))
        return out

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    spectral_factors(torch.randn(50, 3), 2)
    spectral_factors(torch.randn(3, 40), 5)
    assert shapes == [((50, 3), (3, 3)), ((3, 3), (3, 40))]


# --- the layers' initialisation: spectral and default -------------------------------------------

def _layers(square=False, spectral=False, init=None, dtype=torch.float64):
    """A Linear (out 6, in 9), a Conv2d (out 3, in 4, 3x2 kernel: matrix 9 x 8) and an Embedding (10 x 7)."""
    kw = dict(square=square, spectral=spectral, init=init, dtype=dtype)
    return [fnl.FactorizedLinear(9, 6, rank=4, **kw), fnl.FactorizedConv2d(4, 3, (3, 2), rank=4, **kw),
            fnl.FactorizedEmbedding(10, 7, rank=4, **kw)]


@pytest.mark.parametrize("square", [False, True])
def test_spectral_init_is_the_truncated_svd_of_the_init_applied_to_the_dense_weight(square):
    fixed = {}

    def init(t):  # a fixed dense weight per shape, so the closed form needs no random stream
        g = torch.Generator().manual_seed(t.numel())
        fixed[tuple(t.shape)] = torch.randn(t.shape, generator=g, dtype=t.dtype)
        t.copy_(fixed[tuple(t.shape)])

    for layer in _layers(square=square, spectral=True, init=init):
        dense = fixed[tuple(layer._dense_weight_shape())]
        best, sv = _truncation(layer._matrix_from_weight(dense), 4)
        torch.testing.assert_close(layer.matrix(), best, rtol=0, atol=1e-12)
        u, v = layer.U.detach(), layer.V.detach()
        torch.testing.assert_close(u.T @ u, torch.diag(sv), rtol=0, atol=1e-12)
        torch.testing.assert_close(v.T @ v, torch.diag(sv), rtol=0, atol=1e-12)
        assert (layer.S is None) != square
        if square:
            assert torch.equal(layer.S.detach(), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_default_init_factorizes_torchs_dense_init(kind):
    # the dense weight is drawn as torch draws it for the dense layer (Kaiming-uniform a=sqrt(5), fan-in
    # of the dense layer), then the bias U(±1/sqrt(fan_in)) from the same stream
    torch.manual_seed(11)
    if kind == "linear":
        layer = fnl.FactorizedLinear(8, 5, rank=5, spectral=True, dtype=torch.float64)
    else:
        layer = fnl.FactorizedConv2d(3, 4, 3, rank=9, spectral=True, dtype=torch.float64)
    torch.manual_seed(11)
    shape = tuple(layer._dense_weight_shape())
    dense = torch.empty(shape, dtype=torch.float64)
    nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    bias = torch.empty(shape[0], dtype=torch.float64).uniform_(-bound, bound)
    torch.testing.assert_close(layer.dense_weight(), dense, rtol=0, atol=1e-12)  # full rank: the weight itself
    assert torch.equal(layer.bias.detach(), bias)


def test_spectral_embedding_default_init_factorizes_a_unit_normal_table():
    torch.manual_seed(12)
    layer = fnl.FactorizedEmbedding(6, 4, rank=4, spectral=True, dtype=torch.float64)
    torch.manual_seed(12)
    torch.testing.assert_close(layer.dense_weight(), torch.randn(6, 4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_default_init_applies_the_init_to_each_factor_as_the_layer_it_acts_as():
    seen = []

    def init(t):
        seen.append(tuple(t.shape))
        t.fill_(0.5)

    lin, conv, emb = _layers(square=True, init=init)
    # Linear: Vᵀ (r x in), U (out x r); Conv2d: Vᵀ (r x in*kw), U (out*kh x r); Embedding: U, V
    assert seen == [(4, 9), (6, 4), (4, 8), (9, 4), (10, 4), (7, 4)]
    for layer in (lin, conv, emb):
        assert bool((layer.U == 0.5).all()) and bool((layer.V == 0.5).all())
        assert torch.equal(layer.S.detach(), torch.eye(4, dtype=torch.float64))  # S never goes through init


def _uniform_bound_check(t, bound, std=True):
    t = t.detach().double()
    assert float(t.abs().max()) <= bound
    assert float(t.abs().max()) >= 0.8 * bound  # tens of draws or more: the largest is near the bound
    if std:  # hundreds of draws: the std of U(-b, b), b / sqrt(3), within 10%
        assert abs(t.std().item() / (bound / math.sqrt(3)) - 1) < 0.1


def test_default_init_bounds_per_layer_kind():
    """torch's default init on each factor as the weight of the layer it acts as, the bias as the dense layer's."""
    torch.manual_seed(13)
    lin = fnl.FactorizedLinear(400, 64, rank=16, square=True)
    _uniform_bound_check(lin.V, 1 / math.sqrt(400))  # fan-in of Vᵀ: in, not r
    _uniform_bound_check(lin.U, 1 / math.sqrt(16))   # fan-in of U: r
    _uniform_bound_check(lin.bias, 1 / math.sqrt(400), std=False)
    assert torch.equal(lin.S.detach(), torch.eye(16))
    conv = fnl.FactorizedConv2d(30, 40, 3, rank=10)
    _uniform_bound_check(conv.V, 1 / math.sqrt(30 * 3))  # Vᵀ is r x in*kw
    _uniform_bound_check(conv.U, 1 / math.sqrt(10))
    _uniform_bound_check(conv.bias, 1 / math.sqrt(30 * 9), std=False)  # the dense conv's fan-in in*kh*kw
    emb = fnl.FactorizedEmbedding(500, 64, rank=16)
    assert abs(emb.U.detach().std().item() - 1) < 0.05 and abs(emb.U.detach().mean().item()) < 0.05
    assert abs(emb.V.detach().std().item() * 4 - 1) < 0.1  # N(0, 1/r): the product has unit variance


def test_reset_parameters_makes_its_tensors_on_the_layers_device():
    # under a default device of "meta", re-initialising a CPU layer works and gives CPU values
    for spectral in (False, True):
        for layer in _layers(square=True, spectral=spectral):
            with torch.device("meta"):
                layer.reset_parameters()
            assert all(p.device.type == "cpu" for p in layer.parameters())
            assert bool(torch.isfinite(layer.matrix()).all())
            assert torch.equal(layer.S.detach(), torch.eye(4, dtype=torch.float64))


def test_bias_of_a_zero_fan_in_is_zero():
    # as torch's layers: the bound 1/sqrt(fan_in) is 0 when the dense layer has no inputs
    layer = fnl.FactorizedLinear(3, 4, rank=2)
    layer._dense_fan_in = lambda: 0
    layer._reset_bias()
    assert torch.equal(layer.bias.detach(), torch.zeros(4))


# --- set_from_weight_ ----------------------------------------------------------------------------

def test_set_from_weight_refuses_a_wrong_shape():
    lin, conv, emb = _layers()
    with pytest.raises(ValueError, match=r"^weight must have shape \(6, 9\), got \(9, 6\)$"):
        lin.set_from_weight_(torch.zeros(9, 6))
    with pytest.raises(ValueError, match=r"^weight must have shape \(3, 4, 3, 2\), got \(3, 4, 2, 3\)$"):
        conv.set_from_weight_(torch.zeros(3, 4, 2, 3))
    with pytest.raises(ValueError, match=r"^weight must have shape \(10, 7\), got \(7, 10\)$"):
        emb.set_from_weight_(torch.zeros(7, 10))


def test_set_from_weight_keeps_the_layers_precision():
    # a half-precision weight into a float32 layer: the factors are float32 spectral factors of the
    # (exactly converted) weight, not half-precision ones
    layer = fnl.FactorizedLinear(5, 4, rank=4, square=True)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(14)).half().requires_grad_()
    layer.set_from_weight_(w)
    u, s, v = spectral_factors(w.detach().float(), 4, square=True)
    assert torch.equal(layer.U.detach(), u) and torch.equal(layer.V.detach(), v) and torch.equal(layer.S.detach(), s)
    torch.testing.assert_close(layer.dense_weight(), w.detach().float(), rtol=0, atol=1e-6)


# --- scale_matrix_ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor", [2.0, 0.3])
def test_scale_matrix_multiplies_u_and_v_by_the_root(dtype, factor):
    layer = fnl.FactorizedLinear(5, 4, rank=3, square=True, dtype=dtype)
    with torch.no_grad():
        layer.S.mul_(1.5)
    u, s, v = (t.detach().clone() for t in layer.factors())
    layer.scale_matrix_(torch.tensor(factor) if dtype == torch.float32 else factor)
    # the root in float32 at least, float64 for float64 factors, cast to the factors' dtype
    root = torch.tensor(factor, dtype=torch.promote_types(dtype, torch.float32)).sqrt().to(dtype)
    assert torch.equal(layer.U.detach(), u * root) and torch.equal(layer.V.detach(), v * root)
    assert torch.equal(layer.S.detach(), s)
    if dtype == torch.float64:
        torch.testing.assert_close(layer.matrix(), factor * (u @ s @ v.T), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("fan_in", [1, 2, 5])
def test_bias_is_uniform_within_one_over_root_fan_in(fan_in):
    # the bias draw is the last of reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear's
    layer = fnl.FactorizedLinear(fan_in, 6, rank=1, dtype=torch.float64)
    bound = 1 / math.sqrt(fan_in)
    torch.manual_seed(15)
    layer._reset_bias()
    torch.manual_seed(15)
    assert torch.equal(layer.bias.detach(), torch.empty(6, dtype=torch.float64).uniform_(-bound, bound))


# --- Frobenius-decay algebra and counts shared by the matrix-product layers ---------------------

@pytest.mark.parametrize("square", [False, True])
def test_fd_gradient_and_norm_match_autograd_of_the_dense_product(square):
    layer = fnl.FactorizedLinear(5, 4, rank=3, square=square, bias=False, dtype=torch.float64)
    with torch.no_grad():
        if square:
            layer.S.copy_(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(16)))
    dense = layer.matrix()
    torch.testing.assert_close(layer.frobenius_norm_sq(), (dense ** 2).sum(), rtol=1e-13, atol=0)
    assert layer.frobenius_norm_sq().dtype == torch.float64
    want = torch.autograd.grad(0.7 / 2 * (dense ** 2).sum(), layer.factor_parameters())
    layer.add_frobenius_grad_(0.0)  # coef 0: nothing, not even a zero .grad
    assert all(p.grad is None for p in layer.factor_parameters())
    layer.add_frobenius_grad_(0.7)
    for p, g in zip(layer.factor_parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=1e-15)
        assert p.grad.dtype == torch.float64 and p.grad.grad_fn is None
    layer.add_frobenius_grad_(0.7)  # accumulates onto the existing .grad
    for p, g in zip(layer.factor_parameters(), want):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-13, atol=1e-15)


def test_fd_of_half_precision_factors_is_computed_in_float32():
    layer = fnl.FactorizedLinear(6, 5, rank=3, square=True, dtype=torch.bfloat16)
    u, s, v = (t.detach().double() for t in layer.factors())
    norm = layer.frobenius_norm_sq()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), ((u @ s @ v.T) ** 2).sum(), rtol=1e-6, atol=0)
    layer.add_frobenius_grad_(1.0)
    for p, g in zip(layer.factor_parameters(), (u @ (s @ v.T @ v @ s.T), u.T @ u @ s @ v.T @ v,
                                                 v @ (s.T @ u.T @ u @ s))):
        assert p.grad.dtype == torch.bfloat16
        # float32 then one rounding to bfloat16: within half a bfloat16 ulp (2^-9 relative) of the exact value
        assert bool(((p.grad.double() - g).abs() <= g.abs() * 2 ** -8 + 1e-30).all())


def test_counts_of_the_shared_protocol():
    lin, conv, emb = _layers(square=True)
    assert lin.num_parameters() == 6 * 4 + 16 + 9 * 4 + 6 and lin.dense_num_parameters() == 6 * 9 + 6
    assert conv.num_parameters() == 9 * 4 + 16 + 8 * 4 + 3 and conv.dense_num_parameters() == 3 * 4 * 3 * 2 + 3
    assert emb.num_parameters() == 10 * 4 + 16 + 7 * 4 and emb.dense_num_parameters() == 10 * 7
    assert [p.shape for p in lin.factor_parameters()] == [(6, 4), (4, 4), (9, 4)]
    assert [t.shape for t in _layers()[0].factors() if t is not None] == [(6, 4), (9, 4)]
    assert _layers()[0].factors()[1] is None
