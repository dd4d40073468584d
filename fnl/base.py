"""Shared machinery of the factorized layers (paper sections 2-3; docs/method.md).

A factorized layer holds a dense weight ``W`` (m x n, read in the layer's own matrix layout) as
``W = U Vᵀ`` or, with ``square=True``, ``W = U S Vᵀ``, where ``U`` is (m x r), ``V`` is (n x r) and
``S`` is (r x r), initialised to the identity. This module has the rank rules, the spectral
initialisation (with the two corrections of docs/differences.md) and the Frobenius-decay algebra that every layer
shares; the layers only say how their matrix maps onto the dense layer's weight and how the
forward pass runs.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._validate import check_rank_choice

__all__ = ["FactorizedLayer", "LowRankLayer", "add_factor_fd_grad_", "gram_frobenius_sq", "resolve_rank", "spectral_factors"]

InitFn = Callable[[Tensor], object]

# Scale of the random values put in the extra columns of one factor when the rank exceeds
# min(m, n) (docs/differences.md): small against the spectral part, non-zero so that the zero columns of the
# other factor receive gradient.
_EXTRA_RANK_STD = 1e-3


def resolve_rank(rank: Optional[int], rank_scale: Optional[float], base: int) -> int:
    """The layer's rank from exactly one of ``rank`` / ``rank_scale``.

    Args:
        rank: an explicit rank, an int >= 1.
        rank_scale: a finite float > 0 (docs/method.md#rank-settings); the rank is
            ``max(1, round(rank_scale * base))``.
        base: what ``rank_scale`` multiplies (``min(m, n)`` for Linear/Embedding, ``out * kh`` for Conv2d).
    """
    check_rank_choice(rank, rank_scale, required=True, names=("rank", "rank_scale", "target_ratio"))
    if rank is not None:
        return rank
    return max(1, round(float(rank_scale) * base))


def spectral_factors(weight: Tensor, rank: int, square: bool = False,
                     generator: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Spectral factors of a matrix: ``U = P_r sqrt(s_r)``, ``V = Q_r sqrt(s_r)`` (paper section 3).

    ``W = P diag(s) Qᵀ`` is a thin SVD computed in float64 whatever the weight's dtype (half and
    bfloat16 included), and the factors come back in the input's dtype. ``U Vᵀ`` is then the best
    rank-r approximation of ``W`` (Eckart-Young), and ``W`` itself at full rank; the singular values
    are split evenly, so column i of ``U`` and of ``V`` both have norm ``sqrt(s_i)``. Float64 because
    it reaches the optimum where float32 does not: on a 512 x 512 matrix with singular values from 1
    to 1e-6, at rank 480 a float32 SVD gives 1.4x the optimal error, float64 1.0x (and an fp32
    eigendecomposition of ``W Wᵀ``, used before, 90x with factors of wildly different norms).

    For ``rank > min(m, n)`` (and for numerically zero singular values) the extra columns of ``U``
    hold small random values and those of ``V`` zeros: the product is unchanged and the extra rank
    still receives gradient (the reference left both zero, so it never learned).

    Args:
        weight: the (m x n) matrix.
        rank: the number of columns of the factors.
        square: also return an (r x r) identity ``S``.
        generator: random generator for the extra columns.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values (inf or nan); spectral init needs a finite weight")
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    keep = min(rank, m, n)
    p, s, qh = torch.linalg.svd(w, full_matrices=False)  # s descending
    s, p, q = s[:keep], p[:, :keep], qh[:keep].T
    tol = s[0] * max(m, n) * torch.finfo(torch.float64).eps if keep else 0  # numerically zero values
    valid = s > tol
    root = s.clamp_min(0).sqrt()
    u = w.new_zeros((m, rank))
    v = w.new_zeros((n, rank))
    u[:, :keep] = torch.where(valid, p * root, 0.0)
    v[:, :keep] = torch.where(valid, q * root, 0.0)
    dead = torch.cat([~valid, valid.new_ones(rank - keep)])  # zero directions and ranks beyond min(m, n)
    if dead.any():
        u[:, dead] = torch.randn((m, int(dead.sum())), generator=generator, dtype=torch.float64,
                                 device=w.device) * _EXTRA_RANK_STD
    sq = torch.eye(rank, dtype=weight.dtype, device=weight.device) if square else None
    return u.to(weight.dtype), sq, v.to(weight.dtype)


class FactorizedLayer(nn.Module, metaclass=abc.ABCMeta):
    """The protocol of every factorized layer: what the whole-model functions may rely on.

    Implemented by the matrix-product layers (``LowRankLayer``: ``FactorizedLinear``,
    ``FactorizedConv2d``, ``FactorizedEmbedding``, factors ``U``, ``S``, ``V``) and by the
    tensor-format convs (``TTConv2d``, ``TuckerConv2d``, factors the cores). ``fnl.factorize`` /
    ``collapse`` / ``summary`` / ``count_parameters``, ``fnl.to_inference_form`` /
    ``select_fastest_paths`` and Frobenius decay use only these members:

    * ``rank``: the layer's rank (an int, or the tuple of a tensor format's ranks), for reports;
    * ``factor_parameters()``: the parameters Frobenius decay regularises instead of weight decay;
    * ``factors()``: the factors of the product (``(U, S, V)``, ``S`` None unless square; the cores);
    * ``dense_weight()``: the weight of the equivalent dense layer (differentiable), of shape
      ``_dense_weight_shape()``;
    * ``frobenius_norm_sq()``: the squared Frobenius norm of the regularised matrix, never formed;
    * ``add_frobenius_grad_(coef)``: add the gradient of ``(coef/2) frobenius_norm_sq()`` to ``.grad``;
    * ``scale_matrix_(factor)``: multiply that matrix by ``factor`` > 0 (the normalisation experiment);
    * ``to_dense()`` / ``from_dense(layer, ...)``: the equivalent dense layer / the best approximation
      of a dense layer;
    * ``inference_form()``: the same function in plain torch layers (no fnl classes), when the
      layer has one (``has_inference_form``); else it raises ``ValueError`` saying why;
    * ``num_parameters()`` / ``dense_num_parameters()``, ``macs(input_shape)`` /
      ``dense_macs(input_shape)``: counts of this layer and of the dense layer it replaces.
    """

    # (``rank`` is set by each layer; not annotated here: TorchScript would read the annotation as its type)
    #: whether ``inference_form()`` gives a plain-torch equivalent
    has_inference_form: bool = True

    # --- factors -------------------------------------------------------------------------------
    @abc.abstractmethod
    def factor_parameters(self) -> list[nn.Parameter]:
        """The factor parameters (those that Frobenius decay replaces weight decay on)."""

    @abc.abstractmethod
    def factors(self) -> tuple[Optional[Tensor], ...]:
        """The factors of the product: ``(U, S, V)`` for a matrix product (``S`` may be None)."""

    @abc.abstractmethod
    def dense_weight(self) -> Tensor:
        """The weight of the equivalent dense layer, in its layout (differentiable)."""

    @abc.abstractmethod
    def _dense_weight_shape(self) -> Sequence[int]:
        """Shape of the dense layer's weight."""

    # --- Frobenius decay -----------------------------------------------------------------------
    @abc.abstractmethod
    def frobenius_norm_sq(self) -> Tensor:
        """The squared Frobenius norm of the regularised matrix, in float32 (float64 kept)."""

    @torch.no_grad()
    def add_frobenius_grad_(self, coef: float) -> None:
        """Add the gradient of ``(coef/2) ||U S Vᵀ||_F²`` to the factors' ``.grad``.

        This default reads ``factors()`` as ``(U, S, V)`` of one product:
        ``dU = coef U (S VᵀV Sᵀ)``, ``dS = coef UᵀU S VᵀV``, ``dV = coef V (Sᵀ UᵀU S)``; O((m+n) r²).
        Layers whose factors are not one product (the tensor formats) override it.
        """
        u, s, v = self.factors()
        add_factor_fd_grad_(u, v, coef, s)

    @abc.abstractmethod
    def scale_matrix_(self, factor: Union[float, Tensor]) -> None:
        """Multiply the regularised matrix by ``factor`` (> 0), in place."""

    # --- conversions ---------------------------------------------------------------------------
    @abc.abstractmethod
    def to_dense(self) -> nn.Module:
        """The dense torch layer computing the same function."""

    @classmethod
    @abc.abstractmethod
    def from_dense(cls, layer: nn.Module, **kwargs: object) -> "FactorizedLayer":
        """The factorized layer closest to a (trained) dense layer at the given rank."""

    @abc.abstractmethod
    def inference_form(self) -> nn.Module:
        """The same function as plain torch layers (``nn.Sequential`` of two), factorization kept."""

    # --- counts --------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of this layer (factors, bias and any other parameter)."""
        return sum(p.numel() for p in self.parameters())

    def dense_num_parameters(self) -> int:
        """Parameters of the dense layer this one replaces."""
        bias = getattr(self, "bias", None)
        return math.prod(self._dense_weight_shape()) + (bias.numel() if bias is not None else 0)

    @abc.abstractmethod
    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of one sample (``input_shape`` without the batch dim) through this layer."""

    @abc.abstractmethod
    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of the dense layer for the same input."""

    # --- shared helpers ------------------------------------------------------------------------
    def _reset_bias(self) -> None:
        bias = getattr(self, "bias", None)
        if bias is not None:
            fan_in = self._dense_fan_in()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound)

    def _dense_fan_in(self) -> int:
        raise NotImplementedError


class LowRankLayer(FactorizedLayer):
    """Base of the matrix-product layers: factors ``U`` (m x r), optional ``S`` (r x r), ``V`` (n x r).

    Subclasses set ``self.rank``, ``self.square``, create the parameters with ``_create_factors``,
    and implement ``_matrix_from_weight`` / ``_weight_from_matrix`` (the dense layer's weight layout
    <-> the (m x n) matrix), ``forward``, ``to_dense``, ``from_dense``, ``inference_form``,
    ``_default_init_`` and the counts.
    """

    def _create_factors(self, m: int, n: int, rank: int, square: bool, factory_kwargs: dict) -> None:
        self.rank = rank
        self.square = square
        self.U = nn.Parameter(torch.empty((m, rank), **factory_kwargs))
        self.V = nn.Parameter(torch.empty((n, rank), **factory_kwargs))
        if square:
            self.S = nn.Parameter(torch.empty((rank, rank), **factory_kwargs))
        else:
            self.register_parameter("S", None)

    # --- factors -------------------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """``(U, S, V)``; ``S`` is None unless ``square``."""
        return self.U, self.S, self.V

    def factor_parameters(self) -> list[nn.Parameter]:
        """The factor parameters (those that Frobenius decay replaces weight decay on)."""
        return [p for p in (self.U, self.S, self.V) if p is not None]

    def matrix(self) -> Tensor:
        """The (m x n) product ``U S Vᵀ`` (differentiable)."""
        u = self.U if self.S is None else self.U @ self.S
        return u @ self.V.T

    def dense_weight(self) -> Tensor:
        """The product in the dense layer's weight layout (differentiable)."""
        return self._weight_from_matrix(self.matrix())

    # --- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise the factors (spectral or per-factor default) and the bias like the dense layer.

        On the ``meta`` device (no values) this does nothing: build there, ``to_empty(device=...)``, then
        call ``reset_parameters()``, as with torch's layers.
        """
        if self.U.is_meta:
            return
        with torch.no_grad():
            if self.spectral:
                dense = torch.empty(self._dense_weight_shape(), device=self.U.device, dtype=self.U.dtype)
                self._dense_init_(dense)
                self.set_from_weight_(dense)
            else:
                self._default_init_()
                if self.S is not None:
                    self.S.copy_(torch.eye(self.rank, dtype=self.S.dtype, device=self.S.device))
            self._reset_bias()

    def set_from_weight_(self, weight: Tensor) -> None:
        """Set the factors to the spectral factorisation of a dense weight (dense layer layout).

        With ``rank >= min(m, n)`` the product reproduces ``weight`` up to rounding; below, it is
        the best rank-r approximation (Eckart-Young).
        """
        if tuple(weight.shape) != tuple(self._dense_weight_shape()):
            raise ValueError(f"weight must have shape {tuple(self._dense_weight_shape())}, got {tuple(weight.shape)}")
        u, s, v = spectral_factors(self._matrix_from_weight(weight.detach()).to(self.U.dtype), self.rank, self.square)
        with torch.no_grad():
            self.U.copy_(u)
            self.V.copy_(v)
            if self.S is not None:
                self.S.copy_(s)

    def _dense_init_(self, weight: Tensor) -> None:
        if self.init is not None:
            self.init(weight)
        else:
            self._torch_default_init_(weight)

    # --- Frobenius decay -----------------------------------------------------------------------
    def frobenius_norm_sq(self) -> Tensor:
        """``||U S Vᵀ||_F²`` through r x r Gram matrices, in float32 (or float64 for float64 factors)."""
        u, s, v = _promoted(self.factors())
        return gram_frobenius_sq(u, v, s)

    @torch.no_grad()
    def scale_matrix_(self, factor: Union[float, Tensor]) -> None:
        """Multiply the product by ``factor`` (> 0): ``U`` and ``V`` each by ``sqrt(factor)``, ``S`` unchanged."""
        # the root in float32 at least (float64 for float64 factors), then cast to each factor's dtype
        work = torch.promote_types(self.U.dtype, torch.float32)
        root = torch.as_tensor(factor, dtype=work, device=self.U.device).sqrt()
        self.U.mul_(root.to(self.U.dtype))
        self.V.mul_(root.to(self.V.dtype))

    # --- subclass hooks ------------------------------------------------------------------------
    def _matrix_from_weight(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _weight_from_matrix(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    def _default_init_(self) -> None:
        raise NotImplementedError

    def _torch_default_init_(self, weight: Tensor) -> None:
        raise NotImplementedError

    def _extra_repr_common(self) -> str:
        s = f"rank={self.rank}"
        if self.square:
            s += ", square=True"
        return s


@torch.no_grad()
def add_factor_fd_grad_(u: Tensor, v: Tensor, coef: float, s: Optional[Tensor] = None) -> None:
    """Add the gradient of ``(coef/2) ||U S Vᵀ||_F²`` to ``u.grad``, ``v.grad`` (and ``s.grad``).

    The tensors are a layer's factors (``U`` m x r, ``V`` n x r, ``S`` r x r or None) or copies of
    them that an optimizer steps instead, such as fp32 master copies under mixed precision. The
    gradient is computed in float32 (float64 kept) and cast to each tensor's dtype.
    """
    if coef == 0:
        return
    uf, sf, vf = _promoted((u, s, v))
    gu, gv = uf.T @ uf, vf.T @ vf
    if sf is None:
        grads = ((u, uf @ gv), (v, vf @ gu))
    else:
        grads = ((u, uf @ (sf @ gv @ sf.T)), (s, gu @ sf @ gv), (v, vf @ (sf.T @ gu @ sf)))
    for p, g in grads:
        accumulate_grad_(p, g.mul_(coef))


def accumulate_grad_(p: Tensor, g: Tensor) -> None:
    """Add ``g`` (cast to ``p``'s dtype) to ``p.grad``, or set it when there is none."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)


def gram_frobenius_sq(u: Tensor, v: Tensor, s: Optional[Tensor] = None) -> Tensor:
    """``||U S Vᵀ||_F² = sum((Sᵀ UᵀU S) * (VᵀV))``: O((m+n) r²), the product is never formed."""
    gu, gv = u.T @ u, v.T @ v
    if s is not None:
        gu = s.T @ gu @ s
    return (gu * gv).sum()


def _promoted(factors: tuple[Tensor, Optional[Tensor], Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Detached copies of the factors in float32 (float64 kept): FD is computed in float32 under AMP."""
    dtype = torch.float64 if factors[0].dtype == torch.float64 else torch.float32
    return tuple(None if f is None else f.to(dtype) for f in factors)  # type: ignore[return-value]


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph: a host-side query, no device sync, and
    never one that starts CUDA (no capture can run before CUDA is initialized, so a CPU-only process on
    a GPU machine gets no CUDA context from it)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value
