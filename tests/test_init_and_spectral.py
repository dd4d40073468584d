"""Initialisation of the factorized layers (paper section 3): spectral factors and the default init.

The default-init stds are checked against closed forms: Kaiming-normal gives std sqrt(2 / fan_in);
torch's default Kaiming-uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std
1/sqrt(3 fan_in). The sample std of N values has relative standard error about 1/sqrt(2N), so
every tolerance below is several standard errors and far from the std of a wrong fan-in.
"""
import math

import pytest
import torch
from torch import nn

import fnl
from fnl.base import spectral_factors


def _kaiming_normal(w):
    return nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")


def _std(t):
    return t.detach().double().std().item()


# --- spectral factors --------------------------------------------------------------------------

def _matrix_with_spectrum(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(s)
    p, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (p * s) @ q.T


def test_spectral_factors_decaying_spectrum_reach_the_optimum_and_stay_balanced():
    """512 x 512, singular values 1 .. 1e-6, rank 480: the case where an fp32 Gram eigendecomposition
    was 20x off the optimum and its factors differed in norm by 1e28."""
    w = _matrix_with_spectrum(torch.logspace(0, -6, 512, dtype=torch.float64)).float()
    rank = 480
    u, s, v = spectral_factors(w, rank)
    assert s is None and u.dtype == v.dtype == torch.float32 and u.shape == v.shape == (512, rank)
    sv = torch.linalg.svdvals(w.double())
    optimum = sv[rank:].norm().item()  # Eckart-Young, in float64
    err = (u.double() @ v.double().T - w.double()).norm().item()
    # float64 SVD: the optimum up to the factors' float32 rounding (a float32 SVD is 1.4x, fp32 eigh 20x)
    assert err <= 1.05 * optimum, f"rank-{rank} error {err:.3e} vs optimum {optimum:.3e} ({err / optimum:.2f}x)"
    nu, nv = u.double().norm(dim=0), v.double().norm(dim=0)
    assert torch.allclose(nu, nv, rtol=1e-3), f"column norms of U / V differ up to {(nu / nv).max():.3e}x"
    expected = sv[:rank].sqrt()  # each column carries sqrt(s_i)
    assert torch.allclose(nu, expected, rtol=1e-3), f"{(nu / expected - 1).abs().max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spectral_factors_full_rank_reproduce_rectangular_weights(dtype):
    torch.manual_seed(1)
    for shape in ((7, 13), (13, 7)):
        w = torch.randn(shape).to(dtype)
        u, _, v = spectral_factors(w, min(shape))
        assert u.dtype == v.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
        err = (u.double() @ v.double().T - w.double()).abs().max().item()
        assert err < tol, f"{shape} {dtype}: {err:.3e}"


def test_spectral_factors_extra_rank_random_in_u_zero_in_v():
    torch.manual_seed(2)
    w = torch.randn(5, 3, dtype=torch.float64)
    u, _, v = spectral_factors(w, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u @ v.T, w, atol=1e-12)
    assert v[:, 3:].abs().max() == 0
    extra_std = u[:, 3:].std().item()
    assert 2e-4 < extra_std < 5e-3, f"extra columns of U: std {extra_std:.2e} (small, non-zero)"


# --- default (non-spectral) init: the reference's per-factor scheme ------------------------------

def test_conv_default_init_matches_reference_fan_ins():
    """64 -> 64, 3x3, rank 21 (ResNet20's last stage): U fan-in r = 21, V fan-in in*kw = 192."""
    torch.manual_seed(3)
    f = fnl.FactorizedConv2d(64, 64, 3, rank=21, init=_kaiming_normal)
    assert _std(f.U) == pytest.approx(math.sqrt(2 / 21), rel=0.05)  # 0.309 (fan-in r*kh would be 0.178)
    assert _std(f.V) == pytest.approx(math.sqrt(2 / 192), rel=0.05)
    # the kernel: a sum of r products, std sqrt(r) * std(U) * std(V) = 0.144
    assert _std(f.dense_weight()) == pytest.approx(math.sqrt(21 * 2 / 21 * 2 / 192), rel=0.05)


def test_conv_default_init_torch_default_fan_ins():
    torch.manual_seed(4)
    f = fnl.FactorizedConv2d(32, 48, (3, 5), rank=40)
    assert _std(f.U) == pytest.approx(1 / math.sqrt(3 * 40), rel=0.05)
    assert _std(f.V) == pytest.approx(1 / math.sqrt(3 * 32 * 5), rel=0.05)
    assert f.U.detach().abs().max() <= 1 / math.sqrt(40)  # uniform bound 1/sqrt(fan_in)


@pytest.mark.parametrize("init, std_v, std_u", [
    (_kaiming_normal, math.sqrt(2 / 96), math.sqrt(2 / 16)),
    (None, 1 / math.sqrt(3 * 96), 1 / math.sqrt(3 * 16)),
])
def test_linear_default_init_fan_ins(init, std_v, std_u):
    """Vᵀ is the weight of an in -> r layer (fan-in in = 96), U of an r -> out layer (fan-in r = 16)."""
    torch.manual_seed(5)
    f = fnl.FactorizedLinear(96, 200, rank=16, init=init)
    assert _std(f.V) == pytest.approx(std_v, rel=0.05)
    assert _std(f.U) == pytest.approx(std_u, rel=0.05)


def test_embedding_default_init_has_unit_variance_product():
    torch.manual_seed(6)
    f = fnl.FactorizedEmbedding(2000, 64, rank=16)
    assert _std(f.U) == pytest.approx(1.0, rel=0.05)  # N(0, 1) like nn.Embedding's table
    assert _std(f.V) == pytest.approx(1 / math.sqrt(16), rel=0.05)  # N(0, 1/r)
    assert _std(f.dense_weight()) == pytest.approx(1.0, rel=0.05)
    g = fnl.FactorizedEmbedding(2000, 64, rank=16, init=lambda w: nn.init.normal_(w, std=0.1))
    assert _std(g.U) == pytest.approx(0.1, rel=0.05) and _std(g.V) == pytest.approx(0.1, rel=0.05)
