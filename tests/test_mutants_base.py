"""Tests aimed at the mutants of `fnl/base.py` (spectral initialisation, rank rule, shared checks).

Each asserts an exact behaviour: the random extra columns are exactly ``1e-3`` times the generator's
normal draws, the threshold below which singular directions count as zero, the rounding of the rank
rule, and the messages of rejected arguments.
"""
import pytest
import torch

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
    # an all-zero weight: every direction is a zero direction (0 is not above a threshold of 0)
    u0, _, v0 = spectral_factors(torch.zeros(3, 2, dtype=torch.float64), 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(v0, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(u0, torch.randn((3, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-3)
