"""Tests aimed at the mutants of `fnl/tensor_decompositions.py` (the tensor formats of the paper's
tensor comparison, section 4; docs/method.md#tensor-formats).

Each asserts an exact behaviour or a closed form, against references written here with numpy:
the derived modes are the near-equal factorisation the module docstring describes (checked by brute
force); the rank rules from a scale (Python's ``round``, floor 1); TT-SVD at full rank reconstructs
the tensor to float64 precision and truncated equals the sequential SVD truncation (exact core shapes,
left-orthogonal cores, discarded energies = the tails of the singular values, the error identity);
HOSVD's factors span the leading left singular vectors of each unfolding and its core is the
contraction with them; the dense reconstructions ``_tt_full`` / ``_tucker_full`` against einsum;
``_balance`` against its closed form; the exact messages of rejected arguments.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from fnl.tensor_decompositions import (
    NUM_MODES, _balance, _check_modes, _check_scale, _mode_unfold, _near_equal_factors, _resolve_ranks,
    _tt_full, _tt_ranks_from_scale, _tucker_full, _tucker_ranks_from_scale, hosvd, tensor_modes, tt_svd,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- modes ------------------------------------------------------------------------------------
def _ref_factors(n, d):
    """Brute force: all ascending d-tuples multiplying to n, minimising (max/min, max)."""
    divisors = [f for f in range(1, n + 1) if n % f == 0]
    cands = [c for c in itertools.combinations_with_replacement(divisors, d) if math.prod(c) == n]
    return min(cands, key=lambda c: (c[-1] / c[0], c[-1]))


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_near_equal_factors_is_the_brute_force_optimum(d):
    # 1008: (7, 12, 12) beats (8, 9, 14) (ratios 12/7 < 14/8)
    for n in list(range(1, 73)) + [96, 128, 240, 256, 360, 384, 512, 640, 768, 1000, 1008, 2016, 2400]:
        got = _near_equal_factors(n, d)
        assert isinstance(got, tuple) and len(got) == d and math.prod(got) == n
        assert all(type(f) is int for f in got), got  # ints, not floats equal to them
        assert list(got) == sorted(got)
        want = _ref_factors(n, d)
        if d <= 3:  # the optimum is unique up to d = 3 (max, max/min and the product fix the rest)
            assert got == want, (n, d)
        else:  # ties are possible from d = 4 on: (1, 1, 4, 5) and (1, 2, 2, 5) for 20
            assert (got[-1] / got[0], got[-1]) == (want[-1] / want[0], want[-1]), (n, d)


def test_near_equal_factors_known_values():
    assert _near_equal_factors(640, 3) == (8, 8, 10)
    assert _near_equal_factors(64, 3) == (4, 4, 4)
    assert _near_equal_factors(12, 3) == (2, 2, 3)
    assert _near_equal_factors(7, 3) == (1, 1, 7)
    assert _near_equal_factors(1, 3) == (1, 1, 1)
    assert _near_equal_factors(36, 2) == (6, 6)
    assert _near_equal_factors(24, 3) == (2, 3, 4)
    assert _near_equal_factors(30, 3) == (2, 3, 5)
    assert _near_equal_factors(27, 3) == (3, 3, 3)
    assert _near_equal_factors(8, 3) == (2, 2, 2)
    assert _near_equal_factors(16, 2) == (4, 4)
    assert _near_equal_factors(48, 3) == (3, 4, 4)
    assert _near_equal_factors(1008, 3) == (7, 12, 12)
    assert all(type(f) is int for f in _near_equal_factors(1000, 3))


def _ref_modes(out_channels, in_channels):
    o = sorted(_ref_factors(out_channels, 3), reverse=True)
    i = sorted(_ref_factors(in_channels, 3))
    pairs = sorted(zip(o, i), key=lambda p: -p[0] * p[1])
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def test_tensor_modes_paper_example_and_rule():
    assert tensor_modes(640, 640) == ((10, 8, 8), (8, 10, 8))
    assert tensor_modes(64, 64) == ((4, 4, 4), (4, 4, 4))
    # o = (4, 3, 2), i = (2, 3, 5): n = (8, 9, 10), sorted largest first
    assert tensor_modes(24, 30) == ((2, 3, 4), (5, 3, 2))
    for out_c, in_c in [(24, 30), (30, 24), (12, 64), (7, 9), (640, 320), (128, 256), (1, 8), (48, 20)]:
        o, i = tensor_modes(out_c, in_c)
        assert (o, i) == _ref_modes(out_c, in_c), (out_c, in_c)
        assert math.prod(o) == out_c and math.prod(i) == in_c
        n = [a * b for a, b in zip(o, i)]
        assert n == sorted(n, reverse=True)
        assert isinstance(o, tuple) and isinstance(i, tuple) and len(o) == len(i) == NUM_MODES
        assert all(type(m) is int for m in o + i), (o, i)


def test_tensor_modes_sorted_by_mode_size():
    # o = (5, 3, 2), i = (2, 3, 5): n = (10, 9, 10) -> sorted, ties keep pairing order
    assert tensor_modes(30, 30) == ((5, 2, 3), (2, 5, 3))
    # o = (4, 3, 2), i = (1, 1, 7): n = (4, 3, 14) -> (14, 4, 3)
    assert tensor_modes(24, 7) == ((2, 4, 3), (7, 1, 1))


@pytest.mark.parametrize("name,args,exc,msg", [
    ("out", (0, 4), ValueError, "out_channels must be an int >= 1, got 0"),
    ("in", (4, -2), ValueError, "in_channels must be an int >= 1, got -2"),
    ("outbool", (True, 4), TypeError, "out_channels must be an int >= 1, got bool True"),
    ("infloat", (4, 2.0), TypeError, "in_channels must be an int >= 1, got float 2.0"),
])
def test_tensor_modes_refusals(name, args, exc, msg):
    with pytest.raises(exc) as e:
        tensor_modes(*args)
    assert str(e.value) == msg


def test_check_modes():
    assert _check_modes("out_modes", None, 24) is None
    got = _check_modes("out_modes", [2, 3, 4], 24)
    assert got == (2, 3, 4) and isinstance(got, tuple)
    assert _check_modes("in_modes", (1, 1, 5), 5) == (1, 1, 5)
    for bad in [(2, 12), (2, 3, 2, 2), (2, 3, 4.0), (2, 3, True), (0, 3, 8), (-1, -3, 8), "234", 24, {2, 3, 4}]:
        with pytest.raises(TypeError) as e:
            _check_modes("in_modes", bad, 24)
        assert str(e.value) == f"in_modes must be a sequence of 3 ints >= 1, got {bad!r}"
    with pytest.raises(ValueError) as e:
        _check_modes("out_modes", [2, 3, 5], 24)
    assert str(e.value) == "out_modes=(2, 3, 5) must multiply to 24, got 30"


# --- ranks ------------------------------------------------------------------------------------
def test_check_scale():
    assert _check_scale(0.5) == 0.5 and _check_scale(1) == 1.0 and isinstance(_check_scale(1), float)
    for bad in [0, 1.5, -0.1, float("nan"), float("inf")]:
        with pytest.raises(ValueError) as e:
            _check_scale(bad)
        assert "rank_scale must be a finite float in (0, 1]" in str(e.value)
    with pytest.raises(TypeError) as e:
        _check_scale("0.5")
    assert "rank_scale must be a finite float in (0, 1]" in str(e.value)


def test_rank_rules_from_scale():
    n = (80, 80, 64)
    assert _tt_ranks_from_scale(n, 0.5) == (40, 32)
    assert _tt_ranks_from_scale(n, 1.0) == (80, 64)
    assert _tucker_ranks_from_scale(n, 0.5) == (40, 40, 32)
    assert _tucker_ranks_from_scale(n, 1.0) == (80, 80, 64)
    assert all(type(r) is int for r in _tt_ranks_from_scale(n, 0.37) + _tucker_ranks_from_scale(n, 0.37))
    # floor at 1
    assert _tt_ranks_from_scale(n, 1e-3) == (1, 1)
    assert _tucker_ranks_from_scale(n, 1e-3) == (1, 1, 1)
    # Python's round (half to even) of s * min(n_k, n_k+1) and of s * n_k
    assert _tt_ranks_from_scale((5, 7, 3), 0.5) == (2, 2)  # 2.5 -> 2, 1.5 -> 2
    assert _tt_ranks_from_scale((10, 7, 9), 0.5) == (4, 4)  # 3.5 -> 4
    assert _tucker_ranks_from_scale((5, 7, 3), 0.5) == (2, 4, 2)
    assert _tucker_ranks_from_scale((10, 9, 11), 0.3) == (3, 3, 3)  # 3.0, 2.7, 3.3
    assert _tucker_ranks_from_scale((10, 9, 11), 0.75) == (8, 7, 8)  # 7.5 -> 8, 6.75 -> 7, 8.25 -> 8
    # a 4-way tensor: one bond rank fewer than the modes
    assert _tt_ranks_from_scale((4, 6, 8, 2), 0.5) == (2, 3, 1)
    for s in [0.1, 0.25, 0.4, 0.6, 0.9]:
        m = (12, 20, 7)
        assert _tt_ranks_from_scale(m, s) == tuple(max(1, round(s * min(a, b))) for a, b in zip(m, m[1:]))
        assert _tucker_ranks_from_scale(m, s) == tuple(max(1, round(s * a)) for a in m)


def test_resolve_ranks():
    seen = []

    def from_scale(s):
        seen.append(s)
        return (7, 8)

    assert _resolve_ranks(None, 0.5, 2, from_scale) == (7, 8) and seen == [0.5]
    assert _resolve_ranks(None, 1, 2, from_scale) == (7, 8) and seen == [0.5, 1.0] and isinstance(seen[1], float)
    got = _resolve_ranks(3, None, 2, from_scale)
    assert got == (3, 3) and isinstance(got, tuple)
    assert _resolve_ranks(3, None, 3, from_scale) == (3, 3, 3)
    got = _resolve_ranks([2, 5], None, 2, from_scale)
    assert got == (2, 5) and isinstance(got, tuple)
    assert _resolve_ranks((1, 1, 4), None, 3, from_scale) == (1, 1, 4)
    got = _resolve_ranks([2, 5], None, 2, from_scale) + _resolve_ranks(4, None, 3, from_scale)
    assert all(type(r) is int for r in got)
    assert len(seen) == 2


@pytest.mark.parametrize("rank,scale", [(None, None), (2, 0.5), ((2, 2), 1.0)])
def test_resolve_ranks_needs_exactly_one(rank, scale):
    with pytest.raises(ValueError) as e:
        _resolve_ranks(rank, scale, 2, lambda s: (1, 1))
    assert str(e.value) == ("give exactly one of rank (an int >= 1 or 2 of them) or rank_scale (a float in "
                            f"(0, 1]); got rank={rank!r}, rank_scale={scale!r}")


def test_resolve_ranks_refusals():
    for bad in [True, 2.0, (2,), (2, 2, 2), (2, 2.0), (2, False), "22", {2, 3}]:
        with pytest.raises(TypeError) as e:
            _resolve_ranks(bad, None, 2, lambda s: (1, 1))
        assert str(e.value) == f"rank must be an int >= 1 or a sequence of 2 ints >= 1, got {bad!r}"
    for bad in [0, -3, (2, 0), [0, 5], (-1, 4)]:
        with pytest.raises(ValueError) as e:
            _resolve_ranks(bad, None, 2, lambda s: (1, 1))
        assert str(e.value) == f"rank must be >= 1, got {bad!r}"
    for bad in [0, 1.5]:
        with pytest.raises(ValueError) as e:
            _resolve_ranks(None, bad, 2, lambda s: (1, 1))
        assert "rank_scale must be a finite float in (0, 1]" in str(e.value)


# --- TT-SVD -----------------------------------------------------------------------------------
def _np_tt_svd(t, ranks):
    """Reference TT-SVD in numpy: the dense tensor of the sequential rank-r SVD truncations, and the
    discarded energies."""
    n = t.shape
    c = t.copy()
    r_prev = 1
    cores, disc = [], []
    for k, r in enumerate(ranks):
        mat = c.reshape(r_prev * n[k], -1)
        u, s, vh = np.linalg.svd(mat, full_matrices=False)
        disc.append(float((s[r:] ** 2).sum()))
        cores.append(u[:, :r].reshape(r_prev, n[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, n[-1], 1))
    full = cores[0]
    for core in cores[1:]:
        full = np.tensordot(full, core, axes=([-1], [0]))
    return full.reshape(n), disc, [s for s in (None,)]


def _tt_dense(cores):
    full = cores[0].numpy()
    for core in cores[1:]:
        full = np.tensordot(full, core.numpy(), axes=([-1], [0]))
    assert full.shape[0] == 1 and full.shape[-1] == 1
    return full[0, ..., 0]


def test_tt_svd_full_rank_reconstructs_float32_input_to_float64_precision():
    t = _rand(4, 5, 6, seed=1, dtype=torch.float32)
    cores, disc = tt_svd(t, (4, 6))
    assert [tuple(c.shape) for c in cores] == [(1, 4, 4), (4, 5, 6), (6, 6, 1)]
    assert all(c.dtype == torch.float64 for c in cores) and all(d.dtype == torch.float64 for d in disc)
    want = t.double().numpy()
    np.testing.assert_allclose(_tt_dense(cores), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_tt_full(cores).numpy(), want, rtol=0, atol=1e-12)
    assert len(disc) == 2 and all(abs(float(d)) < 1e-20 for d in disc)
    assert all(not c.requires_grad for c in cores)


def test_tt_svd_detaches_and_keeps_the_input():
    t = _rand(3, 4, 5, seed=2).requires_grad_(True)
    before = t.detach().clone()
    cores, disc = tt_svd(t, [2, 3])
    assert all(not c.requires_grad and c.grad_fn is None for c in cores)
    assert all(d.grad_fn is None for d in disc)
    assert torch.equal(t.detach(), before)


@pytest.mark.parametrize("shape,ranks", [
    ((4, 5, 6), (2, 3)), ((4, 5, 6), (3, 5)), ((6, 3, 4), (2, 2)), ((3, 4, 2, 5), (2, 3, 2)),
    ((5, 4), (2,)), ((4, 5, 6), (1, 1)),
])
def test_tt_svd_truncated_is_the_sequential_svd_truncation(shape, ranks):
    t = _rand(*shape, seed=3)
    cores, disc = tt_svd(t, ranks)
    full_ranks = (1, *ranks, 1)
    assert [tuple(c.shape) for c in cores] == [(full_ranks[k], shape[k], full_ranks[k + 1])
                                               for k in range(len(shape))]
    want, want_disc, _ = _np_tt_svd(t.numpy(), ranks)
    got = _tt_dense(cores)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_tt_full(cores).numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose([float(d) for d in disc], want_disc, rtol=1e-10, atol=1e-12)
    # ||T - TT||^2 = sum(discarded) exactly; each term is at most the discarded energy of the
    # same unfolding of T itself
    err = float(((got - t.numpy()) ** 2).sum())
    assert err == pytest.approx(sum(want_disc), rel=1e-9, abs=1e-12)
    for k, r in enumerate(ranks):
        s = np.linalg.svd(t.numpy().reshape(math.prod(shape[:k + 1]), -1), compute_uv=False)
        assert float(disc[k]) <= float((s[r:] ** 2).sum()) * (1 + 1e-9) + 1e-12
    # left-orthogonal cores, all but the last
    for c in cores[:-1]:
        m = c.reshape(-1, c.shape[-1])
        torch.testing.assert_close(m.T @ m, torch.eye(c.shape[-1], dtype=torch.float64), rtol=0, atol=1e-12)
    # the first step's discarded energy is the tail of the mode-1 unfolding's singular values
    s0 = torch.linalg.svdvals(t.reshape(shape[0], -1))
    torch.testing.assert_close(disc[0], s0[ranks[0]:].square().sum(), rtol=1e-10, atol=1e-12)


def test_tt_svd_first_core_holds_the_leading_singular_vectors():
    t = _rand(4, 5, 6, seed=4)
    cores, _ = tt_svd(t, (2, 3))
    u = torch.linalg.svd(t.reshape(4, -1), full_matrices=False)[0][:, :2]
    got = cores[0].reshape(4, 2)
    torch.testing.assert_close(got @ got.T, u @ u.T, rtol=0, atol=1e-12)


def test_tt_svd_refusals():
    t = _rand(4, 5, 6)
    for ranks in [(2,), [2, 2, 2], ()]:
        with pytest.raises(ValueError) as e:
            tt_svd(t, ranks)
        assert str(e.value) == f"ranks must have 2 entries for a 3-way tensor, got {tuple(ranks)}"
    with pytest.raises(ValueError) as e:
        tt_svd(_rand(3, 4, 2, 5), [2, 2])
    assert str(e.value) == "ranks must have 3 entries for a 4-way tensor, got (2, 2)"
    with pytest.raises(ValueError) as e:
        tt_svd(t, [5, 2])
    assert str(e.value) == ("ranks[0]=5 exceeds 4, the largest rank of TT-SVD step 0 for modes (4, 5, 6) "
                            "and ranks (5, 2)")
    # step 1: (r_0 n_2) x n_3 = 15 x 6 -> at most 6
    with pytest.raises(ValueError) as e:
        tt_svd(t, [3, 7])
    assert str(e.value) == ("ranks[1]=7 exceeds 6, the largest rank of TT-SVD step 1 for modes (4, 5, 6) "
                            "and ranks (3, 7)")
    # step 1 bounded by r_0 n_2: (1 * 5) x 6 -> at most 5
    with pytest.raises(ValueError) as e:
        tt_svd(t, (1, 6))
    assert str(e.value) == ("ranks[1]=6 exceeds 5, the largest rank of TT-SVD step 1 for modes (4, 5, 6) "
                            "and ranks (1, 6)")
    # the largest allowed ranks pass
    cores, _ = tt_svd(t, (1, 5))
    assert [tuple(c.shape) for c in cores] == [(1, 4, 1), (1, 5, 5), (5, 6, 1)]


# --- HOSVD ------------------------------------------------------------------------------------
def _tucker_dense_np(core, factors):
    return np.einsum("abc,ia,jb,kc->ijk", core, *factors)


def test_mode_unfold():
    t = _rand(2, 3, 4, seed=5)
    for k in range(3):
        want = np.moveaxis(t.numpy(), k, 0).reshape(t.shape[k], -1)
        np.testing.assert_array_equal(_mode_unfold(t, k).numpy(), want)


def test_hosvd_full_rank_reconstructs_float32_input_to_float64_precision():
    t = _rand(3, 4, 5, seed=6, dtype=torch.float32)
    core, factors, disc = hosvd(t, (3, 4, 5))
    assert tuple(core.shape) == (3, 4, 5) and [tuple(a.shape) for a in factors] == [(3, 3), (4, 4), (5, 5)]
    assert core.dtype == torch.float64 and all(a.dtype == torch.float64 for a in factors)
    assert all(d.dtype == torch.float64 for d in disc) and len(disc) == 3
    want = t.double().numpy()
    np.testing.assert_allclose(_tucker_dense_np(core.numpy(), [a.numpy() for a in factors]), want,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(_tucker_full(core, factors).numpy(), want, rtol=0, atol=1e-12)
    assert all(abs(float(d)) < 1e-10 for d in disc)
    assert all(a.is_contiguous() for a in factors)


@pytest.mark.parametrize("shape,ranks", [((4, 5, 6), (2, 3, 4)), ((5, 3, 4), (1, 3, 2)), ((6, 4, 5), (6, 2, 5))])
def test_hosvd_truncated_is_the_projection_on_leading_singular_vectors(shape, ranks):
    t = _rand(*shape, seed=7)
    tn = t.numpy()
    core, factors, disc = hosvd(t, list(ranks))
    assert tuple(core.shape) == ranks
    assert [tuple(a.shape) for a in factors] == [(shape[k], ranks[k]) for k in range(3)]
    us = []
    for k, (a, r) in enumerate(zip(factors, ranks)):
        unf = np.moveaxis(tn, k, 0).reshape(shape[k], -1)
        u, s, _ = np.linalg.svd(unf, full_matrices=False)
        us.append(u[:, :r])
        an = a.numpy()
        np.testing.assert_allclose(an.T @ an, np.eye(r), rtol=0, atol=1e-12)
        np.testing.assert_allclose(an @ an.T, u[:, :r] @ u[:, :r].T, rtol=0, atol=1e-10)
        assert float(disc[k]) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9, abs=1e-12)
    # core = T x_k A_k^T
    np.testing.assert_allclose(core.numpy(), np.einsum("ijk,ia,jb,kc->abc", tn, *[a.numpy() for a in factors]),
                               rtol=0, atol=1e-12)
    approx = _tucker_dense_np(core.numpy(), [a.numpy() for a in factors])
    # the projection on the leading singular subspaces (independent of the basis chosen)
    proj = [u @ u.T for u in us]
    np.testing.assert_allclose(approx, np.einsum("ijk,ia,jb,kc->abc", tn, *proj), rtol=0, atol=1e-10)
    np.testing.assert_allclose(_tucker_full(core, factors).numpy(), approx, rtol=0, atol=1e-12)
    err = float(((tn - approx) ** 2).sum())
    assert err == pytest.approx(float((tn ** 2).sum() - (core.numpy() ** 2).sum()), rel=1e-9, abs=1e-12)
    d = [float(x) for x in disc]
    assert max(d) * (1 - 1e-9) <= err <= sum(d) * (1 + 1e-9)


def test_hosvd_discarded_is_never_negative_for_a_rank_deficient_tensor():
    a, b, c = _rand(4, seed=8), _rand(5, seed=9), _rand(3, seed=10)
    t = torch.einsum("i,j,k->ijk", a, b, c)  # rank 1: the Gram matrices have zero eigenvalues
    core, factors, disc = hosvd(t, (1, 1, 1))
    for d in disc:
        assert 0.0 <= float(d) < 1e-12
    core, factors, disc = hosvd(t, (2, 3, 2))
    assert all(float(d) >= 0.0 for d in disc)
    np.testing.assert_allclose(_tucker_full(core, factors).numpy(), t.numpy(), rtol=0, atol=1e-12)


def test_hosvd_detaches_and_keeps_the_input():
    t = _rand(3, 4, 5, seed=11).requires_grad_(True)
    before = t.detach().clone()
    core, factors, disc = hosvd(t, (2, 2, 2))
    assert core.grad_fn is None and all(a.grad_fn is None for a in factors) and all(d.grad_fn is None for d in disc)
    assert torch.equal(t.detach(), before)


def test_hosvd_refusals():
    t = _rand(3, 4, 5)
    for ranks in [(2, 2), [2, 2, 2, 2], ()]:
        with pytest.raises(ValueError) as e:
            hosvd(t, ranks)
        assert str(e.value) == f"ranks must have 3 entries for a 3-way tensor, got {tuple(ranks)}"
    with pytest.raises(ValueError) as e:
        hosvd(_rand(2, 3), [1, 1, 1])
    assert str(e.value) == "ranks must have 2 entries for a 2-way tensor, got (1, 1, 1)"
    with pytest.raises(ValueError) as e:
        hosvd(t, [4, 2, 2])
    assert str(e.value) == "ranks[0]=4 exceeds the mode size n_1=3"
    with pytest.raises(ValueError) as e:
        hosvd(t, (3, 4, 6))
    assert str(e.value) == "ranks[2]=6 exceeds the mode size n_3=5"
    with pytest.raises(ValueError) as e:
        hosvd(t, (3, 5, 5))
    assert str(e.value) == "ranks[1]=5 exceeds the mode size n_2=4"


# --- reconstructions and balancing ------------------------------------------------------------
def test_tt_full_against_einsum():
    cores = [_rand(1, 3, 2, seed=12), _rand(2, 4, 5, seed=13), _rand(5, 2, 1, seed=14)]
    want = np.einsum("aib,bjc,ckd->ijk", *[c.numpy() for c in cores])
    got = _tt_full(cores)
    assert tuple(got.shape) == (3, 4, 2)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    cores4 = [_rand(1, 2, 3, seed=15), _rand(3, 3, 2, seed=16), _rand(2, 4, 3, seed=17), _rand(3, 2, 1, seed=18)]
    want4 = np.einsum("aib,bjc,ckd,dle->ijkl", *[c.numpy() for c in cores4])
    got4 = _tt_full(cores4)
    assert tuple(got4.shape) == (2, 3, 4, 2)
    np.testing.assert_allclose(got4.numpy(), want4, rtol=0, atol=1e-12)
    # a single core
    one = _rand(1, 5, 1, seed=19)
    torch.testing.assert_close(_tt_full([one]), one.reshape(5), rtol=0, atol=0)


def test_tucker_full_against_einsum():
    core = _rand(2, 3, 4, seed=20)
    factors = [_rand(5, 2, seed=21), _rand(6, 3, seed=22), _rand(7, 4, seed=23)]
    got = _tucker_full(core, factors)
    assert tuple(got.shape) == (5, 6, 7)
    np.testing.assert_allclose(got.numpy(), _tucker_dense_np(core.numpy(), [a.numpy() for a in factors]),
                               rtol=0, atol=1e-12)


def test_balance_closed_form():
    parts = [torch.full((2, 2), 1.0, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64),
             _rand(4, 2, seed=24)]
    before = [p.clone() for p in parts]
    ids = [id(p) for p in parts]
    norms = [float(p.norm()) for p in before]
    target = math.prod(norms) ** (1 / 3)
    _balance(parts)
    assert [id(p) for p in parts] == ids
    for p, b, v in zip(parts, before, norms):
        torch.testing.assert_close(p, b * (target / v), rtol=1e-14, atol=0)
        assert float(p.norm()) == pytest.approx(target, rel=1e-13)
    # the product of the scales is 1: a product of the parts is unchanged
    scale = math.prod(float(p.norm()) / v for p, v in zip(parts, norms))
    assert scale == pytest.approx(1.0, rel=1e-13)
    # two parts
    a, b = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([0.0, 20.0], dtype=torch.float64)
    _balance([a, b])
    torch.testing.assert_close(a, torch.tensor([6.0, 8.0], dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(b, torch.tensor([0.0, 10.0], dtype=torch.float64), rtol=1e-14, atol=0)
    # a part of norm exactly 1 is balanced like any other
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    _balance([a, b])
    torch.testing.assert_close(a, torch.tensor([2.0, 0.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(b, torch.tensor([0.0, 2.0]), rtol=1e-6, atol=0)


def test_balance_leaves_parts_alone_when_one_is_zero():
    parts = [torch.tensor([3.0, 4.0]), torch.zeros(3), torch.tensor([1.0])]
    before = [p.clone() for p in parts]
    _balance(parts)
    assert all(torch.equal(p, b) for p, b in zip(parts, before))


def test_balance_balances_a_tt_decomposition_without_changing_it():
    t = _rand(3, 4, 5, seed=25)
    cores, _ = tt_svd(t, (3, 5))
    _balance(cores)
    norms = [float(c.norm()) for c in cores]
    assert max(norms) / min(norms) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(_tt_full(cores).numpy(), t.numpy(), rtol=0, atol=1e-12)
