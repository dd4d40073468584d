"""Tensor decompositions of a 1x1 convolution's matrix: modes, rank rules, TT-SVD and HOSVD
(paper section 4, the tensor comparison; docs/method.md#tensor-formats).

Pure maths on tensors, no layers: ``fnl.tensor_conv`` holds the layers built on it.

**Modes.** ``out = o_1 o_2 o_3`` and ``in = i_1 i_2 i_3`` (row-major), and ``W`` is read as the
3-way tensor ``T[n_1, n_2, n_3]`` with ``n_k = (o_k, i_k)``, i.e. mode k has size ``n_k = o_k i_k``
(the "TT-matrix" layout, which is what lets the cores be contracted with the input directly).
Derived modes: each channel count is split into 3 factors as equal as possible, the output
factors in decreasing and the input factors in increasing order are paired (balancing the
``n_k``), and the pairs are sorted by ``n_k``, largest first. 640 x 640 gives ``o = (10, 8, 8)``,
``i = (8, 10, 8)``, ``n = (80, 80, 64)``, the paper's modes.

**Ranks from a scale s** (the paper's rule): Tensor-Train bond ranks ``r_k = max(1, round(s min(n_k,
n_{k+1})))`` for k = 1, 2; Tucker ranks ``R_k = max(1, round(s n_k))``; s in (0, 1].
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._validate import check_rank_scale
from .base import check_positive_int

__all__ = ["NUM_MODES", "RankArg", "hosvd", "tensor_modes", "tt_svd"]

NUM_MODES = 3  # the paper's tensor models: the matrix as a 3-way tensor
RankArg = Union[int, Sequence[int], None]


# --- modes and ranks ---------------------------------------------------------------------------
def _near_equal_factors(n: int, d: int) -> tuple[int, ...]:
    """``d`` factors of ``n`` (ascending), as equal as possible: smallest max/min, then smallest max."""
    best: Optional[tuple[int, ...]] = None

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]):
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                key = (cand[-1] / cand[0], cand[-1])
                if best is None or key < (best[-1] / best[0], best[-1]):
                    best = cand
            return
        for f in range(lo, int(round(rest ** (1 / k))) + 2):
            if rest % f == 0:
                rec(rest // f, k - 1, f, acc + (f,))

    rec(n, d, 1, ())
    assert best is not None  # n = 1 * ... * 1 * n always qualifies
    return best


def tensor_modes(out_channels: int, in_channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The derived ``(out_modes, in_modes)`` of an (out x in) matrix (see the module docstring)."""
    check_positive_int("out_channels", out_channels)
    check_positive_int("in_channels", in_channels)
    o = sorted(_near_equal_factors(out_channels, NUM_MODES), reverse=True)
    i = sorted(_near_equal_factors(in_channels, NUM_MODES))
    pairs = sorted(zip(o, i), key=lambda p: -p[0] * p[1])  # stable: ties keep the pairing order
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _check_modes(name: str, modes: Optional[Sequence[int]], channels: int) -> Optional[tuple[int, ...]]:
    if modes is None:
        return None
    if (not isinstance(modes, (tuple, list)) or len(modes) != NUM_MODES
            or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes)):
        raise TypeError(f"{name} must be a sequence of {NUM_MODES} ints >= 1, got {modes!r}")
    if math.prod(modes) != channels:
        raise ValueError(f"{name}={tuple(modes)} must multiply to {channels}, got {math.prod(modes)}")
    return tuple(modes)


def _check_scale(rank_scale: object) -> float:
    return check_rank_scale(rank_scale, at_most_one=True)


def _tt_ranks_from_scale(n: Sequence[int], s: float) -> tuple[int, ...]:
    return tuple(max(1, round(s * min(n[k], n[k + 1]))) for k in range(len(n) - 1))


def _tucker_ranks_from_scale(n: Sequence[int], s: float) -> tuple[int, ...]:
    return tuple(max(1, round(s * nk)) for nk in n)


def _resolve_ranks(rank: RankArg, rank_scale: Optional[float], count: int,
                   from_scale: Callable[[float], tuple[int, ...]]) -> tuple[int, ...]:
    if (rank is None) == (rank_scale is None):
        raise ValueError(f"give exactly one of rank (an int >= 1 or {count} of them) or rank_scale (a float in "
                         f"(0, 1]); got rank={rank!r}, rank_scale={rank_scale!r}")
    if rank_scale is not None:
        return from_scale(_check_scale(rank_scale))
    ranks = (rank,) * count if isinstance(rank, int) and not isinstance(rank, bool) else rank
    if (not isinstance(ranks, (tuple, list)) or len(ranks) != count
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        raise TypeError(f"rank must be an int >= 1 or a sequence of {count} ints >= 1, got {rank!r}")
    if min(ranks) < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    return tuple(int(r) for r in ranks)


# --- decompositions ----------------------------------------------------------------------------
def _decomposition_dtype(t: Tensor) -> torch.dtype:
    return torch.float64  # decompositions run in float64 and are cast back (they run once)


def tt_svd(tensor: Tensor, ranks: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
    """TT-SVD (Oseledets 2011): sequential truncated SVDs, left-orthogonal cores.

    Args:
        tensor: a d-way tensor (n_1, ..., n_d).
        ranks: the d-1 bond ranks; ``ranks[k]`` must not exceed the rank the k-th step can have
            (``r_{k-1} n_k`` and ``n_{k+1} ... n_d``).

    Returns:
        ``(cores, discarded)``: cores (r_{k-1}, n_k, r_k) in float64, and for each step the sum of
        the squared singular values it discarded. ``||T - TT(cores)||_F² = sum(discarded)``
        exactly (the cores are left-orthogonal, so the step errors are orthogonal), and each term
        is at most the discarded energy of the same unfolding of ``T`` itself.
    """
    n = tuple(tensor.shape)
    if len(ranks) != len(n) - 1:
        raise ValueError(f"ranks must have {len(n) - 1} entries for a {len(n)}-way tensor, got {tuple(ranks)}")
    c = tensor.detach().to(_decomposition_dtype(tensor))
    cores, discarded = [], []
    r_prev = 1
    for k, r in enumerate(ranks):
        mat = c.reshape(r_prev * n[k], -1)
        if r > min(mat.shape):
            raise ValueError(f"ranks[{k}]={r} exceeds {min(mat.shape)}, the largest rank of TT-SVD step {k} "
                             f"for modes {n} and ranks {tuple(ranks)}")
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        discarded.append(s[r:].square().sum())
        cores.append(u[:, :r].reshape(r_prev, n[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, n[-1], 1))
    return cores, discarded


def _mode_unfold(t: Tensor, k: int) -> Tensor:
    return t.movedim(k, 0).reshape(t.shape[k], -1)


def hosvd(tensor: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Truncated higher-order SVD (De Lathauwer, De Moor, Vandewalle 2000).

    Args:
        tensor: a d-way tensor (n_1, ..., n_d).
        ranks: d ranks, ``ranks[k] <= n_k``.

    Returns:
        ``(core, factors, discarded)``: factors (n_k, R_k) with orthonormal columns (the leading
        left singular vectors of the mode-k unfolding), core ``T x_k A_kᵀ`` (R_1, ..., R_d), all
        float64, and per mode the discarded squared singular values of the unfolding. The error
        satisfies ``||T - T_hat||² = ||T||² - ||core||²`` exactly and
        ``max(discarded) <= ||T - T_hat||² <= sum(discarded)``.
    """
    n = tuple(tensor.shape)
    if len(ranks) != len(n):
        raise ValueError(f"ranks must have {len(n)} entries for a {len(n)}-way tensor, got {tuple(ranks)}")
    t = tensor.detach().to(_decomposition_dtype(tensor))
    factors, discarded = [], []
    for k, r in enumerate(ranks):
        if r > n[k]:
            raise ValueError(f"ranks[{k}]={r} exceeds the mode size n_{k + 1}={n[k]}")
        unf = _mode_unfold(t, k)
        evals, evecs = torch.linalg.eigh(unf @ unf.T)  # n_k x n_k Gram: cheaper than the SVD of unf
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        factors.append(evecs[:, :r].contiguous())
        discarded.append(evals[r:].sum())
    core = t
    for k, a in enumerate(factors):
        core = torch.tensordot(core, a, dims=([0], [0]))  # contracts mode k; it moves to the end
    return core, factors, discarded


def _tucker_full(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    t = core
    for a in factors:
        t = torch.tensordot(t, a, dims=([0], [1]))
    return t


def _tt_full(cores: List[Tensor]) -> Tensor:
    """The tensor (n_1, ..., n_d) of 3-way cores (r_{k-1}, n_k, r_k)."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        t = t @ c.reshape(c.shape[0], -1)
        t = t.reshape(-1, c.shape[-1])
    return t.reshape([c.shape[1] for c in cores])


def _balance(parts: Sequence[Tensor]) -> None:
    """Rescale the parts in place (product of the scales 1) so that they have equal Frobenius norms."""
    norms = [float(p.norm()) for p in parts]
    if min(norms) == 0:
        return
    target = math.exp(sum(math.log(v) for v in norms) / len(norms))
    for p, v in zip(parts, norms):
        p.mul_(target / v)
