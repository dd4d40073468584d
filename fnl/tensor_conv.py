"""Tensor-decomposed convolutions: Tensor-Train and Tucker (paper section 4, the tensor comparison;
docs/method.md#tensor-formats).

A k x k convolution becomes a depthwise k x k convolution (one filter per input channel, carrying
the stride, padding and dilation) followed by a 1x1 convolution whose (out x in) matrix ``W`` is
held in a tensor format. A 1x1 convolution (the WRN shortcuts) has no depthwise part: a per-channel
scale would add nothing a 1x1 matrix cannot hold but does not fit the tensor format either.

**Modes and ranks**: ``fnl.tensor_decompositions`` (the matrix as a 3-way tensor of modes
``n_k = o_k i_k``, and the paper's rank rules).

**Forward.** Depthwise conv, then the cheaper (by multiply-adds, counted for the actual batch) of
contracting the cores with the input one at a time (no permutation of the activations: each step
is one batched matmul, in whichever direction, left-to-right or right-to-left, is cheaper) or
rebuilding ``W`` once per call and running one 1x1 conv. A Tucker tensor is contracted through the
equivalent 3-core Tensor-Train (``A_1``, ``G x_2 A_2``, ``A_3ᵀ``; bond ranks R_1, R_3).

**Initialisation.** Spectral (``spectral=True``): ``W`` gets the layer's dense init, then its
TT-SVD (Oseledets 2011) or truncated HOSVD (De Lathauwer et al. 2000) at the layer's ranks, with
the norm spread evenly over the cores by scalars (the tensor-format analogue of spectral initialisation's even split
of the singular values); the depthwise filters keep their dense init. Default: every core is
Gaussian with one std chosen so that the entries of the rebuilt ``W`` have the variance of the
dense init.

**Frobenius decay** (docs/method.md#frobenius-decay): ``(lambda/2) ||W||_F²`` of the rebuilt matrix, its gradient added
to the cores by ``add_frobenius_grad_`` in closed form (TT: left/right environments,
``dG_k = lambda L_{k-1} G_k R_{k+1}``; Tucker: mode Gram matrices), ``W`` never formed. The
depthwise filters are not factors: they keep ordinary weight decay. **(fix)** the reference added
this penalty to the loss after ``backward()``, so it had no effect.

**Dense conversions.** ``to_dense`` is exact: depthwise then pointwise is the k x k conv with kernel
``K[o, i] = W[o, i] D[i]``. ``from_dense`` of an arbitrary k x k conv cannot be exact: the kernels
this layer represents are those whose every input-channel slice ``K[:, i]`` (out x kh kw) has rank
<= 1. It takes the Frobenius-best such kernel (the leading singular pair of every slice, by
Eckart-Young: ``D[i]`` the unit right vector, ``W[:, i] = s_i u_i``), then TT-SVD / HOSVD of ``W``.
It is exact for 1x1 convs and for kernels made by ``to_dense`` (at full ranks).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FactorizedLayer, InitFn, accumulate_grad_
from .conv import IntPair, conv_output_hw, conv_repr_options, set_conv_geometry
from .tensor_decompositions import (  # noqa: F401  (re-exported: the public names of fnl.tensor_conv)
    NUM_MODES, RankArg, _balance, _check_modes, _check_scale, _near_equal_factors, _resolve_ranks,
    _tt_full, _tt_ranks_from_scale, _tucker_full, _tucker_ranks_from_scale, hosvd, tensor_modes, tt_svd,
)

__all__ = [
    "TTConv2d", "TensorConv2d", "TuckerConv2d", "hosvd", "solve_tensor_scale", "tensor_modes", "tensorize",
    "tt_svd",
]


# --- the layers --------------------------------------------------------------------------------
class TensorConv2d(FactorizedLayer):
    """Base of the tensor-format convs: depthwise k x k conv, then a 1x1 conv held in a tensor format.

    Subclasses (``TTConv2d``, ``TuckerConv2d``) hold the cores and implement the ranks rule, the
    decomposition, the default init, the TT-core view (for the forward pass) and the FD algebra.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: (kh, kw) or an int; 1x1 kernels have no depthwise part.
        stride: as in ``nn.Conv2d`` (applied by the depthwise conv).
        padding: an int or a pair (applied by the depthwise conv).
        dilation: as in ``nn.Conv2d``.
        groups: must be 1.
        bias: learn an additive bias (on the 1x1 conv).
        rank: explicit ranks: an int (every rank) or one int per rank (exactly one of rank / rank_scale).
        rank_scale: the scale s of the rank rules (docs/method.md#tensor-formats), a float in (0, 1].
        out_modes: 3 ints multiplying to out_channels (None: derived, see ``fnl.tensor_decompositions``).
        in_modes: 3 ints multiplying to in_channels (None: derived).
        spectral: give the dense 1x1 matrix ``init`` and decompose it (TT-SVD / HOSVD).
        init: in-place init of the dense 1x1 weight (out, in, 1, 1); None is torch's ``nn.Conv2d``
            init. Without ``spectral`` it sets the variance the random cores reproduce.
        depthwise_init: in-place init of the depthwise weight (in, 1, kh, kw); None is torch's
            ``nn.Conv2d`` init.
        path: ``'auto'`` (the cheaper by multiply-adds, for the batch at hand), ``'factored'``
            (contract the cores with the input) or ``'dense'`` (rebuild the 1x1 matrix).
        padding_mode: only ``'zeros'``.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    tensor_format = ""
    # ``ranks`` (a tuple of ints) is set in __init__; not annotated here: TorchScript would read the annotation
    has_inference_form = False

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: IntPair,
            stride: IntPair = 1,
            padding: IntPair = 0,
            dilation: IntPair = 1,
            groups: int = 1,
            bias: bool = True,
            *,
            rank: RankArg = None,
            rank_scale: Optional[float] = None,
            out_modes: Optional[Sequence[int]] = None,
            in_modes: Optional[Sequence[int]] = None,
            spectral: bool = False,
            init: Optional[InitFn] = None,
            depthwise_init: Optional[InitFn] = None,
            path: str = "auto",
            padding_mode: str = "zeros",
            device: Optional[torch.device | str] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if type(self) is TensorConv2d:
            raise TypeError("TensorConv2d is abstract: use TTConv2d or TuckerConv2d")
        factory_kwargs = {"device": device, "dtype": dtype}
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                          padding_mode, path, string_padding=False)
        out_modes = _check_modes("out_modes", out_modes, out_channels)
        in_modes = _check_modes("in_modes", in_modes, in_channels)
        if (out_modes is None) != (in_modes is None):
            raise ValueError("give both out_modes and in_modes, or neither (derived)")
        if out_modes is None:
            out_modes, in_modes = tensor_modes(out_channels, in_channels)
        self.out_modes, self.in_modes = out_modes, in_modes
        self.modes = tuple(o * i for o, i in zip(out_modes, in_modes))
        self.ranks = self._ranks(rank, rank_scale)
        self.rank = self.ranks  # shown by fnl.summary
        self.square = False
        self.spectral = bool(spectral)
        self.init = init
        self.depthwise_init = depthwise_init
        self.has_depthwise = self.kernel_size != (1, 1)
        if self.has_depthwise:
            self.depthwise = nn.Parameter(torch.empty((in_channels, 1, *self.kernel_size), **factory_kwargs))
        else:
            if self.dilation != (1, 1):
                self.dilation = (1, 1)  # no effect on a 1x1 kernel
            self.register_parameter("depthwise", None)
        self._create_cores(factory_kwargs)
        # the forward pass's plan reads these (fixed by the ranks and modes), computed once here
        self._rtl_macs = self._contract_macs("rtl")
        self._ltr_macs = self._contract_macs("ltr")
        self._rebuild_macs = self.rebuild_macs()
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_rtl_macs" not in self.__dict__:  # pickled before the plan's counts were cached
            self._rtl_macs = self._contract_macs("rtl")
            self._ltr_macs = self._contract_macs("ltr")
            self._rebuild_macs = self.rebuild_macs()

    # --- subclass hooks ------------------------------------------------------------------------
    def _ranks(self, rank: RankArg, rank_scale: Optional[float]) -> tuple[int, ...]:
        raise NotImplementedError

    def _create_cores(self, factory_kwargs: dict) -> None:
        raise NotImplementedError

    def tt_cores(self) -> list[Tensor]:
        """Equivalent Tensor-Train cores (r_{k-1}, o_k, i_k, r_k) of the 1x1 matrix (differentiable)."""
        raise NotImplementedError

    def _set_tensor_(self, tensor: Tensor) -> None:
        raise NotImplementedError

    def _random_cores_(self, variance: float) -> None:
        raise NotImplementedError

    def _tt_rebuild_extra_macs(self) -> int:
        return 0

    # --- layout --------------------------------------------------------------------------------
    def matrix_to_tensor(self, matrix: Tensor) -> Tensor:
        """The (out x in) matrix as the 3-way tensor (n_1, n_2, n_3), ``n_k = (o_k, i_k)``."""
        o, i = self.out_modes, self.in_modes
        return matrix.reshape(*o, *i).permute(0, 3, 1, 4, 2, 5).reshape(self.modes)

    def tensor_to_matrix(self, tensor: Tensor) -> Tensor:
        """Inverse of ``matrix_to_tensor``."""
        o, i = self.out_modes, self.in_modes
        return tensor.reshape(o[0], i[0], o[1], i[1], o[2], i[2]).permute(0, 2, 4, 1, 3, 5).reshape(
            self.out_channels, self.in_channels)

    def matrix(self) -> Tensor:
        """The (out x in) matrix of the 1x1 conv, rebuilt from the cores (differentiable)."""
        cores = self.tt_cores()
        return self.tensor_to_matrix(_tt_full([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]))

    def dense_weight(self) -> Tensor:
        """The k x k kernel (out, in, kh, kw) of the equivalent dense conv, ``K[o, i] = W[o, i] D[i]``."""
        w = self.matrix()[:, :, None, None]
        return w * self.depthwise.view(1, self.in_channels, *self.kernel_size) if self.has_depthwise else w

    def _dense_weight_shape(self) -> Sequence[int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _dense_fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def factors(self) -> tuple[Tensor, ...]:  # type: ignore[override]
        """The cores (the factor parameters)."""
        return tuple(self.factor_parameters())

    # --- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Depthwise filters and the 1x1 matrix get their dense inits; the cores the spectral or random init.
        Nothing on the ``meta`` device (``to_empty`` then ``reset_parameters()`` initialises)."""
        ref = self.factor_parameters()[0]
        if ref.is_meta:
            return
        with torch.no_grad():
            if self.has_depthwise:
                (self.depthwise_init or _torch_conv_init_)(self.depthwise)
            dense = torch.empty((self.out_channels, self.in_channels, 1, 1), device=ref.device, dtype=ref.dtype)
            (self.init or _torch_conv_init_)(dense)
            if self.spectral:
                self.set_matrix_(dense[:, :, 0, 0])
            else:
                self._random_cores_(float(dense.double().square().mean()))
            self._reset_bias()

    @torch.no_grad()
    def set_matrix_(self, matrix: Tensor) -> None:
        """Set the cores to the TT-SVD / HOSVD of an (out x in) matrix, the norm spread evenly over them."""
        if tuple(matrix.shape) != (self.out_channels, self.in_channels):
            raise ValueError(f"matrix must have shape {(self.out_channels, self.in_channels)}, got {tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix has non-finite values (inf or nan); spectral init needs a finite matrix")
        self._set_tensor_(self.matrix_to_tensor(matrix.detach()))
        _balance(self.factor_parameters())

    @torch.no_grad()
    def set_from_weight_(self, weight: Tensor) -> None:
        """Set the depthwise filters and the cores from a dense k x k kernel (out, in, kh, kw).

        The Frobenius-best depthwise-separable kernel (leading singular pair of each input-channel
        slice ``K[:, i]``, out x kh kw), then TT-SVD / HOSVD of its 1x1 matrix (module docstring).
        """
        if tuple(weight.shape) != tuple(self._dense_weight_shape()):
            raise ValueError(f"weight must have shape {tuple(self._dense_weight_shape())}, got {tuple(weight.shape)}")
        w = weight.detach().double()
        if not self.has_depthwise:
            self.set_matrix_(w[:, :, 0, 0])
            return
        slices = w.permute(1, 0, 2, 3).reshape(self.in_channels, self.out_channels, -1)  # (in, out, kh*kw)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)
        d = vh[:, 0, :]  # unit-norm depthwise filters
        sign = torch.where(d.sum(1) < 0, -1.0, 1.0).to(d)  # a deterministic sign: filters sum >= 0
        self.depthwise.copy_((d * sign[:, None]).view_as(self.depthwise))
        self.set_matrix_((u[:, :, 0] * (s[:, 0] * sign)[:, None]).T)

    @staticmethod
    def separable_error_sq(weight: Tensor) -> Tensor:
        """``||K - K_sep||_F²`` of the best depthwise-separable approximation of a kernel (out, in, kh, kw)."""
        s = torch.linalg.svdvals(weight.detach().double().permute(1, 0, 2, 3).reshape(
            weight.shape[1], weight.shape[0], -1))
        return s[:, 1:].square().sum()

    @torch.no_grad()
    def scale_matrix_(self, factor: Union[float, Tensor]) -> None:
        """Multiply the 1x1 matrix by ``factor`` (> 0), spread evenly over the cores (each by its k-th root).

        The tensor-format counterpart of rescaling ``U`` and ``V`` each by ``sqrt(factor)`` in the
        normalisation experiment (docs/method.md#normalisation-experiment).
        """
        ps = self.factor_parameters()
        root = torch.as_tensor(factor, dtype=torch.float64) ** (1.0 / len(ps))
        for p in ps:
            p.mul_(root.to(device=p.device, dtype=p.dtype))

    # --- forward -------------------------------------------------------------------------------
    def _contract_macs(self, direction: str) -> int:
        """Multiply-adds per output pixel of contracting the TT cores with one input pixel."""
        o, i, r = self.out_modes, self.in_modes, (1, *self._tt_bond_ranks(), 1)
        total = 0
        for k in range(NUM_MODES):
            if direction == "rtl":  # state (I_{<=k}, r_k, O_{>k}) -> (I_{<k}, r_{k-1}, O_{>=k})
                total += math.prod(i[:k]) * r[k] * o[k] * i[k] * r[k + 1] * math.prod(o[k + 1:])
            else:  # state (O_{<k}, r_{k-1}, I_{>=k}) -> (O_{<=k}, r_k, I_{>k})
                total += math.prod(o[:k]) * o[k] * r[k + 1] * r[k] * i[k] * math.prod(i[k + 1:])
        return total

    def _tt_bond_ranks(self) -> tuple[int, ...]:
        raise NotImplementedError

    def rebuild_macs(self) -> int:
        """Multiply-adds of rebuilding the 1x1 matrix from the cores (once per forward on the dense path)."""
        n, r = self.modes, self._tt_bond_ranks()
        return n[0] * r[0] * n[1] * r[1] + n[0] * n[1] * r[1] * n[2] + self._tt_rebuild_extra_macs()

    def _plan(self, pixels: int) -> tuple[bool, str]:
        """(use the dense path, contraction direction) for ``pixels`` = batch x output pixels."""
        rtl, ltr = self._rtl_macs, self._ltr_macs
        direction = "rtl" if rtl <= ltr else "ltr"
        if self.path == "auto":
            dense = self._rebuild_macs + pixels * self.out_channels * self.in_channels
            return pixels * min(rtl, ltr) >= dense, direction
        return self.path == "dense", direction

    def forward(self, x: Tensor) -> Tensor:
        depthwise, bias = self.depthwise, self.bias  # locals: TorchScript refines Optional on them
        if depthwise is not None:
            x = F.conv2d(x, depthwise, None, self.stride, self.padding, self.dilation, self.in_channels)
        elif self.padding != (0, 0) or self.stride != (1, 1):
            (ph, pw), (sh, sw) = self.padding, self.stride
            x = F.pad(x, [pw, pw, ph, ph])[:, :, ::sh, ::sw]
        b, h, w = x.shape[0], x.shape[2], x.shape[3]  # x: (B, in, H_out, W_out)
        dense, direction = self._plan(b * h * w)
        if dense:
            return F.conv2d(x, self.matrix()[:, :, None, None], bias)
        y = _tt_contract(x.reshape(b, self.in_channels, h * w), self.tt_cores(), direction)  # (B, out, H*W)
        y = y.view(b, self.out_channels, h, w)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    # --- Frobenius decay -----------------------------------------------------------------------
    def _promoted_cores(self) -> list[Tensor]:
        ps = self.factor_parameters()
        dtype = torch.float64 if ps[0].dtype == torch.float64 else torch.float32
        return [p.to(dtype) for p in ps]

    @torch.no_grad()
    def add_frobenius_grad_(self, coef: float) -> None:
        """Add the gradient of ``(coef/2) ||W||_F²`` (W the rebuilt 1x1 matrix) to the cores' ``.grad``."""
        if coef == 0:
            return
        for p, g in zip(self.factor_parameters(), self._frobenius_grads(self._promoted_cores())):
            accumulate_grad_(p, g.mul_(coef))

    def _frobenius_grads(self, cores: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    # --- counts and conversions ----------------------------------------------------------------
    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds for one sample (in_channels, H, W): depthwise conv plus the cheaper 1x1 path.

        The rebuild of the 1x1 matrix is once per batch, not per sample, and is not counted
        (``rebuild_macs()`` gives it); with ``path='factored'`` / ``'dense'`` that path is counted.
        """
        h_out, w_out = conv_output_hw(self, input_shape)
        pixels = h_out * w_out
        depthwise = self.in_channels * self.kernel_size[0] * self.kernel_size[1] * pixels if self.has_depthwise else 0
        contract = min(self._contract_macs("rtl"), self._contract_macs("ltr"))
        dense = self.out_channels * self.in_channels
        per_pixel = {"auto": min(contract, dense), "factored": contract, "dense": dense}[self.path]
        return depthwise + per_pixel * pixels

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of the dense k x k conv for the same input."""
        h_out, w_out = conv_output_hw(self, input_shape)
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * h_out * w_out

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, *, rank: RankArg = None, rank_scale: Optional[float] = None,
                   out_modes: Optional[Sequence[int]] = None, in_modes: Optional[Sequence[int]] = None,
                   path: str = "auto") -> "TensorConv2d":
        """From a (trained) ``nn.Conv2d``: best depthwise-separable kernel, then TT-SVD / HOSVD (exact for 1x1
        kernels and for ``to_dense()`` outputs at full ranks; see the module docstring)."""
        if cls is TensorConv2d:
            raise TypeError("TensorConv2d is abstract: use TTConv2d.from_dense or TuckerConv2d.from_dense")
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"layer.groups must be 1 for {cls.__name__}, got {layer.groups}")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"layer must have padding_mode 'zeros' and numeric padding for {cls.__name__}, got "
                             f"padding_mode={layer.padding_mode!r}, padding={layer.padding!r}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, 1, layer.bias is not None, rank=rank, rank_scale=rank_scale, out_modes=out_modes,
                  in_modes=in_modes, path=path, device=w.device, dtype=w.dtype)
        new.set_from_weight_(w)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (exact: kernel ``W[o, i] D[i]``)."""
        ref = self.factor_parameters()[0]
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, 1, self.bias is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def inference_form(self) -> nn.Module:
        """Refused: no plain-torch layers hold the cores (their contraction is reshapes and batched matmuls).

        Raises:
            ValueError: always, naming the alternatives.
        """
        raise ValueError(f"{type(self).__name__} has no plain-torch inference form that keeps its "
                         f"{self.tensor_format} cores; keep the layer (it runs in eager, TorchScript and export), "
                         "or convert it to its dense conv with fnl.collapse / to_dense()")

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"ranks={self.ranks}, out_modes={self.out_modes}, in_modes={self.in_modes}")
        return s + conv_repr_options(self)


class TTConv2d(TensorConv2d):
    """Depthwise k x k conv, then a 1x1 conv whose matrix is a Tensor-Train (TT-matrix) of 3 cores.

    Cores ``core{k}`` have shape (r_{k-1}, o_k, i_k, r_k), r_0 = r_3 = 1, and
    ``W[(o_1 o_2 o_3), (i_1 i_2 i_3)] = G_1[o_1, i_1] G_2[o_2, i_2] G_3[o_3, i_3]`` (a product of
    r_{k-1} x r_k matrices). Ranks: ``r_k = max(1, round(rank_scale * min(n_k, n_{k+1})))`` with
    ``n_k = o_k i_k`` (docs/method.md#tensor-formats), or ``rank`` (an int or 2 ints). Arguments as in ``TensorConv2d``.
    """

    tensor_format = "tt"

    def _ranks(self, rank: RankArg, rank_scale: Optional[float]) -> tuple[int, ...]:
        n = self.modes
        ranks = _resolve_ranks(rank, rank_scale, NUM_MODES - 1, lambda s: _tt_ranks_from_scale(n, s))
        r = (1, *ranks, 1)
        for k in range(1, NUM_MODES):
            if r[k] > r[k - 1] * n[k - 1] or r[k] > n[k] * r[k + 1]:
                raise ValueError(f"rank: TT rank r_{k}={r[k]} exceeds what its neighbours allow "
                                 f"(r_{k - 1} n_{k}={r[k - 1] * n[k - 1]}, n_{k + 1} r_{k + 1}={n[k] * r[k + 1]}) "
                                 f"for modes n={n}")
        return ranks

    def _tt_bond_ranks(self) -> tuple[int, ...]:
        return self.ranks

    def _create_cores(self, factory_kwargs: dict) -> None:
        r = (1, *self.ranks, 1)
        for k in range(NUM_MODES):
            shape = (r[k], self.out_modes[k], self.in_modes[k], r[k + 1])
            setattr(self, f"core{k + 1}", nn.Parameter(torch.empty(shape, **factory_kwargs)))

    def factor_parameters(self) -> list[nn.Parameter]:
        return [self.core1, self.core2, self.core3]

    def tt_cores(self) -> list[Tensor]:
        return [self.core1, self.core2, self.core3]

    def _set_tensor_(self, tensor: Tensor) -> None:
        cores, _ = tt_svd(tensor, self.ranks)
        for p, c in zip(self.factor_parameters(), cores):
            p.copy_(c.reshape(p.shape))

    def _random_cores_(self, variance: float) -> None:
        # entry of W = sum over r_1 r_2 products of 3 core entries: var = r_1 r_2 std^6
        std = (variance / math.prod(self.ranks)) ** (1 / 6)
        for p in self.factor_parameters():
            nn.init.normal_(p, 0.0, std)

    def frobenius_norm_sq(self) -> Tensor:
        """``||W||_F²`` by the left-environment sweep, O(n r³); W is never formed (differentiable)."""
        left = None
        for c in self._promoted_cores():
            c = c.reshape(c.shape[0], -1, c.shape[-1])
            left = torch.einsum("anc,and->cd", c, c) if left is None else _left_env(left, c)
        return left.reshape(())

    def _frobenius_grads(self, cores: list[Tensor]) -> list[Tensor]:
        # (1/2) d||W||²/dG_k = L_{k-1} G_k R_{k+1}, with L, R the contracted left/right environments
        # pairwise contractions in a fixed order: O(n r³) each (a 3-operand einsum may build an n r⁴ intermediate)
        cs = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]
        lefts = [torch.ones(1, 1, dtype=cs[0].dtype, device=cs[0].device)]
        for c in cs[:-1]:
            lefts.append(_left_env(lefts[-1], c))
        rights = [torch.ones(1, 1, dtype=cs[0].dtype, device=cs[0].device)]
        for c in reversed(cs[1:]):
            rt = torch.einsum("anc,cd->and", c, rights[0])
            rights.insert(0, torch.einsum("and,bnd->ab", rt, c))
        return [torch.einsum("and,cd->anc", torch.einsum("ab,bnd->and", lf, c), rt).reshape(p.shape)
                for lf, c, rt, p in zip(lefts, cs, rights, cores)]


class TuckerConv2d(TensorConv2d):
    """Depthwise k x k conv, then a 1x1 conv whose matrix is a Tucker tensor.

    ``T = G x_1 A_1 x_2 A_2 x_3 A_3`` with core ``core`` (R_1, R_2, R_3) and factors ``factor{k}``
    (n_k x R_k), ``n_k = o_k i_k``. Ranks: ``R_k = max(1, round(rank_scale * n_k))`` (docs/method.md#tensor-formats), or
    ``rank`` (an int or 3 ints, each <= n_k). Arguments as in ``TensorConv2d``.
    """

    tensor_format = "tucker"

    def _ranks(self, rank: RankArg, rank_scale: Optional[float]) -> tuple[int, ...]:
        n = self.modes
        ranks = _resolve_ranks(rank, rank_scale, NUM_MODES, lambda s: _tucker_ranks_from_scale(n, s))
        for k, (r, nk) in enumerate(zip(ranks, n)):
            if r > nk:
                raise ValueError(f"rank: Tucker rank R_{k + 1}={r} exceeds the mode size n_{k + 1}={nk} (modes {n})")
        return ranks

    def _tt_bond_ranks(self) -> tuple[int, ...]:
        return self.ranks[0], self.ranks[2]

    def _tt_rebuild_extra_macs(self) -> int:
        return self.ranks[0] * self.ranks[1] * self.ranks[2] * self.modes[1]  # G x_2 A_2

    def _create_cores(self, factory_kwargs: dict) -> None:
        self.core = nn.Parameter(torch.empty(self.ranks, **factory_kwargs))
        for k in range(NUM_MODES):
            setattr(self, f"factor{k + 1}", nn.Parameter(torch.empty((self.modes[k], self.ranks[k]), **factory_kwargs)))

    def factor_parameters(self) -> list[nn.Parameter]:
        return [self.core, self.factor1, self.factor2, self.factor3]

    def tt_cores(self) -> list[Tensor]:
        o, i, r = self.out_modes, self.in_modes, self.ranks
        middle = torch.einsum("abc,nb->anc", self.core, self.factor2)  # (R_1, n_2, R_3)
        return [self.factor1.view(1, o[0], i[0], r[0]), middle.reshape(r[0], o[1], i[1], r[2]),
                self.factor3.T.reshape(r[2], o[2], i[2], 1)]

    def _set_tensor_(self, tensor: Tensor) -> None:
        core, factors, _ = hosvd(tensor, self.ranks)
        for p, c in zip(self.factor_parameters(), [core, *factors]):
            p.copy_(c)

    def _random_cores_(self, variance: float) -> None:
        # entry of W = sum over R_1 R_2 R_3 products of 4 entries: var = R_1 R_2 R_3 std^8
        std = (variance / math.prod(self.ranks)) ** (1 / 8)
        for p in self.factor_parameters():
            nn.init.normal_(p, 0.0, std)

    def frobenius_norm_sq(self) -> Tensor:
        """``||W||_F² = <G, G x_k A_kᵀA_k>``, O(n R² + R⁴) (differentiable)."""
        g, *a = self._promoted_cores()
        q = [f.T @ f for f in a]
        return (g * torch.einsum("aef,ad->def", torch.einsum("abc,be,cf->aef", g, q[1], q[2]), q[0])).sum()

    def _frobenius_grads(self, cores: list[Tensor]) -> list[Tensor]:
        g, a1, a2, a3 = cores
        q1, q2, q3 = (f.T @ f for f in (a1, a2, a3))
        # M_k = G_(k) (kron of the other Grams) G_(k)ᵀ, by pairwise contractions (O(R⁴) each)
        g23 = torch.einsum("abc,be,cf->aef", g, q2, q3)  # G x_2 Q_2 x_3 Q_3
        g13 = torch.einsum("abc,ad,cf->dbf", g, q1, q3)
        g12 = torch.einsum("abc,ad,be->dec", g, q1, q2)
        dg = torch.einsum("aef,ad->def", g23, q1)
        m1 = torch.einsum("aBC,ABC->aA", g23, g)
        m2 = torch.einsum("AbC,ABC->bB", g13, g)
        m3 = torch.einsum("ABc,ABC->cC", g12, g)
        return [dg, a1 @ m1, a2 @ m2, a3 @ m3]


def _left_env(left: Tensor, core: Tensor) -> Tensor:
    """``sum_n G[:, n, :]ᵀ L G[:, n, :]`` for a core (r, n, r'): O(n r² r')."""
    return torch.einsum("bnc,bnd->cd", torch.einsum("ab,anc->bnc", left, core), core)


def _prod(values: List[int]) -> int:
    """``math.prod`` for TorchScript."""
    out = 1
    for v in values:
        out *= v
    return out


def _tt_contract(x: Tensor, cores: List[Tensor], direction: str) -> Tensor:
    """``W x`` for x (B, in, P) and TT cores (r_{k-1}, o_k, i_k, r_k): one batched matmul per core.

    Right-to-left the state is (B, I_{<=k}, r_k, O_{>k}, P); left-to-right (B, O_{<k}, r_{k-1},
    I_{>=k}, P). Each step contracts two adjacent dims, so the activations are never permuted.
    """
    b, p = x.shape[0], x.shape[2]
    o = [c.shape[1] for c in cores]
    i = [c.shape[2] for c in cores]
    t = x
    if direction == "rtl":
        for k in range(len(cores) - 1, -1, -1):
            c = cores[k]
            mat = c.reshape(c.shape[0] * o[k], i[k] * c.shape[3])  # (r_{k-1} o_k, i_k r_k)
            t = mat @ t.reshape(b * _prod(i[:k]), i[k] * c.shape[3], -1)
    else:
        for k, c in enumerate(cores):
            mat = c.permute(1, 3, 0, 2).reshape(o[k] * c.shape[3], c.shape[0] * i[k])  # (o_k r_k, r_{k-1} i_k)
            t = mat @ t.reshape(b * _prod(o[:k]), c.shape[0] * i[k], -1)
    return t.reshape(b, _prod(o), p)


def _torch_conv_init_(weight: Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default


# whole models (fnl.tensorize), re-exported here: imported last, it builds on the layers above
from .tensorize import solve_tensor_scale, tensorize  # noqa: E402
