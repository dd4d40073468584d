"""The one Frobenius-decay engine of the project (paper section 3.2; docs/method.md#frobenius-decay).

Every FD path (``fnl.FrobeniusDecay``, the timm ``fd*`` optimizers, the fairseq ``fd_*`` optimizers)
describes what it regularises as :class:`FDTerm` objects and hands them to one :class:`FDEngine`,
which adds the FD gradients under the rules they share:

* **Closed form, grouped.** Every term is a product ``U S Vᵀ`` (``S`` optional) of batched factors:
  a factorized layer (a batch of one), or the per-head query-key / output-value forms of an
  attention (a batch of heads, read as strided views of the projections' weights, fused ``qkv``
  slices included, never copied). Terms of the same shapes and dtype are concatenated and their
  gradients ``dU = U (S VᵀV Sᵀ)``, ``dS = UᵀU S VᵀV``, ``dV = V (Sᵀ UᵀU S)`` computed by a few
  batched matmuls through r x r Grams, in float32 (float64 kept) whatever the factors' dtype; one
  ``torch._foreach_*`` call then scales and adds them. A layer with its own FD gradient (the tensor
  convs' cores) is a term that calls its ``add_frobenius_grad_``.
* **No gradient, no FD.** A tensor whose ``.grad`` is None this step (unused layer, frozen branch)
  gets no FD and its ``.grad`` stays None, as torch's weight decay skips it.
* **Scaled gradients.** ``grad_scale``: the gradients still hold this loss scale, which a fused
  optimizer divides out in its kernel (``torch.amp.GradScaler`` hands it the scale instead of
  unscaling); the FD gradient is multiplied by it first. No host synchronisation.
* **Coupled or decoupled.** Coupled (the paper's, for SGD): the FD gradient is added to ``.grad``
  before the update, so it goes through momentum / Adam's normalisation like L2 weight decay.
  Decoupled (``lr`` given, as AdamW decouples weight decay): the parameters move by
  ``-lr * coef * dFD/dp`` evaluated at the pre-step values, where AdamW applies its decay (before
  its update, which does not read the parameters); skipped where ``found_inf`` is set.
* **Master copies.** A term may be built on the tensors an optimizer steps instead of the model's
  parameters (fp32 copies under fairseq's ``--fp16`` / ``--bf16``): the FD gradient is then computed
  from and written to the copies.

The registry (:func:`mark_factors`, :func:`factor_owner`) maps a factor parameter to the layer
owning it, for optimizers that are handed parameter groups without the model (timm's factory).
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .base import FactorizedLayer, cuda_graph_capturing

__all__ = ["FDEngine", "FDTerm", "factor_owner", "form_term", "layer_term", "mark_factors"]

View = Callable[[Tensor], Tensor]

# factor parameter -> weakref to the FactorizedLayer owning it
_FACTOR_OWNER = WeakIdKeyDictionary()


def mark_factors(model: nn.Module) -> int:
    """Register the factors of every factorized layer of ``model`` (itself included) with their layer.

    Optimizers that get parameter groups without the model (timm's ``create_optimizer_v2``) find the
    layers through :func:`factor_owner`. Held weakly: the registry never keeps a model alive.

    Returns:
        The number of factorized layers found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if isinstance(module, FactorizedLayer):
            ref = weakref.ref(module)
            for p in module.factor_parameters():
                _FACTOR_OWNER[p] = ref
            count += 1
    return count


def factor_owner(param: Tensor) -> Optional[nn.Module]:
    """The factorized layer owning ``param`` (registered by :func:`mark_factors`), else None."""
    ref = _FACTOR_OWNER.get(param)
    return None if ref is None else ref()


def _batch1(t: Tensor) -> Tensor:
    return t.unsqueeze(0)


@dataclasses.dataclass(eq=False)
class FDTerm:
    """One FD term ``(1/2) ||U S Vᵀ||_F²`` summed over a batch (of one, or of heads).

    Attributes:
        tensors: the leaf tensors the term reads and whose ``.grad`` it writes, as ``(U, S, V)``
            (``S`` None when absent); several entries may be the same tensor (a fused ``qkv``).
        views: for each entry, a function mapping the tensor, or its ``.grad``, to the batched
            factor ``(b, rows, r)`` (``S``: ``(b, r, r)``); a view, never a copy.
        layer: for a layer with its own FD gradient (``tensors``: its factor parameters, ``views``
            unused), the layer; its ``add_frobenius_grad_`` computes the gradient.
        name: what the term is, for messages.
    """

    tensors: tuple
    views: tuple = ()
    layer: Optional[nn.Module] = None
    name: str = "term"

    def params(self) -> list[Tensor]:
        """The distinct tensors of the term."""
        seen: set[int] = set()
        return [t for t in self.tensors if t is not None and not (id(t) in seen or seen.add(id(t)))]

    def key(self) -> Optional[tuple]:
        """What a batch of terms must share: shapes, dtype, device; None for a layer term."""
        if self.layer is not None:
            return None
        shapes = tuple(None if t is None else tuple(f(t).shape[1:]) for t, f in zip(self.tensors, self.views))
        ref = self.tensors[0]
        return shapes, ref.dtype, ref.device

    def batch(self) -> int:
        return 1 if self.layer is not None else self.views[0](self.tensors[0]).shape[0]


def layer_term(layer: FactorizedLayer, copies: Optional[dict] = None) -> FDTerm:
    """The FD term of one factorized layer.

    Args:
        layer: the layer.
        copies: ``{id(parameter): tensor}``: build the term on the tensors an optimizer steps instead
            of the layer's parameters (fp32 master copies); only for ``U S Vᵀ`` layers.
    """
    if not isinstance(layer, FactorizedLayer):
        raise TypeError(f"layer must be a FactorizedLayer, got {type(layer).__name__}")
    own = type(layer).add_frobenius_grad_ is not FactorizedLayer.add_frobenius_grad_
    if own:
        if copies is not None:
            raise ValueError(f"{type(layer).__name__} computes its own FD gradient from its parameters; it cannot "
                             "be applied to master copies")
        return FDTerm(tuple(layer.factor_parameters()), layer=layer, name=type(layer).__name__)
    u, s, v = layer.factors()
    if copies is not None:
        u, s, v = (None if f is None else copies[id(f)] for f in (u, s, v))
    return FDTerm((u, s, v), (_batch1, _batch1, _batch1), name=type(layer).__name__)


def _rows(rows: Optional[slice], heads: int, t: Tensor) -> Tensor:
    """(heads*d_h, d) weight (or its rows ``rows``) -> (heads, d, d_h): head h's rows, transposed."""
    w = t if rows is None else t[rows]
    return w.view(heads, w.shape[0] // heads, w.shape[1]).transpose(1, 2)


def _cols(heads: int, t: Tensor) -> Tensor:
    """(d, heads*d_h) weight -> (heads, d, d_h): head h's columns."""
    return t.view(t.shape[0], heads, t.shape[1] // heads).transpose(0, 1)


def _rows_view(heads: int, rows: Optional[slice]) -> View:
    return functools.partial(_rows, rows, heads)


def _cols_view(heads: int) -> View:
    return functools.partial(_cols, heads)


def form_term(kind: str, left: Tensor, right: Tensor, heads: int, left_rows: Optional[slice] = None,
              right_rows: Optional[slice] = None, name: Optional[str] = None) -> FDTerm:
    """The FD term of an attention's per-head forms (paper section 3.2; ``fnl.attention``).

    ``kind='quekey'``: ``sum_h (1/2)||W_Q^hᵀ W_K^h||²`` with ``left`` = W_Q, ``right`` = W_K, both
    (heads*d_h, d) in ``nn.Linear`` layout. ``kind='outval'``: ``sum_h (1/2)||W_O^h W_V^h||²`` with
    ``left`` = W_O (d, heads*d_h) and ``right`` = W_V (heads*d_h, d). ``left_rows`` / ``right_rows``
    select the projection's rows of a fused weight (timm's ``qkv``): the slices are views, the FD
    gradient lands in the fused ``.grad``.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if kind == "quekey":
        views = (_rows_view(heads, left_rows), None, _rows_view(heads, right_rows))
    elif kind == "outval":
        if left_rows is not None:
            raise ValueError("left_rows applies to a query weight; the output projection is used whole")
        views = (_cols_view(heads), None, _rows_view(heads, right_rows))
    else:
        raise ValueError(f"kind must be 'quekey' or 'outval', got {kind!r}")
    for t, f, what in ((left, views[0], "left"), (right, views[2], "right")):
        if t.dim() != 2:
            raise ValueError(f"{what} must be a 2-d weight, got shape {tuple(t.shape)}")
        rows = t.shape[1] if (kind == "outval" and what == "left") else (
            t[left_rows if what == "left" else right_rows].shape[0]
            if (left_rows if what == "left" else right_rows) is not None else t.shape[0])
        if rows % heads:
            raise ValueError(f"{kind} {what}: heads={heads} must divide the per-head dimension axis of size {rows}")
    term = FDTerm((left, None, right), views, name=name or kind)
    lu, ru = views[0](left), views[2](right)
    if lu.shape[0] != ru.shape[0] or lu.shape[2] != ru.shape[2]:
        raise ValueError(f"{kind}: the two projections must have the same heads and d_h, got {tuple(lu.shape)} and "
                         f"{tuple(ru.shape)} as (heads, d, d_h)")
    return term


def _fd_grads(u: Tensor, s: Optional[Tensor], v: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Batched FD gradients of ``(1/2)||U S Vᵀ||²`` (coefficient 1): O(b (m+n) r²)."""
    # torch.bmm, not ``@``: on 3-d operands ``@`` adds four view / expand dispatches around each bmm,
    # and this pass is host-bound (tiny matrices, one call per shape group)
    bmm = torch.bmm
    gu, gv = bmm(u.transpose(1, 2), u), bmm(v.transpose(1, 2), v)
    if s is None:
        return bmm(u, gv), None, bmm(v, gu)
    st = s.transpose(1, 2)
    return bmm(u, bmm(bmm(s, gv), st)), bmm(bmm(gu, s), gv), bmm(v, bmm(bmm(st, gu), s))


CAPTURE_ERROR = ("Frobenius decay cannot run inside a CUDA graph capture: its coefficients, learning rates and "
                 "which parameters have a gradient are read on the host at every step, and a replay would repeat "
                 "the captured ones (docs/method.md#frobenius-decay); capture the forward and backward only and "
                 "call the optimizer step outside the graph")


def _refuse_graph_capture() -> None:
    """Raise where the current CUDA stream is capturing a graph (host-side check, no sync; skipped while
    ``torch.compile`` traces, whose graphs keep the host values as guards)."""
    if not torch.compiler.is_compiling() and cuda_graph_capturing():
        raise RuntimeError(CAPTURE_ERROR)


class FDEngine:
    """Adds the FD gradients of a fixed list of terms, grouped (see the module docstring).

    Args:
        terms: the terms; their grouping by shape is computed once here.
    """

    def __init__(self, terms: Sequence[FDTerm]) -> None:
        self.terms = list(terms)
        for t in self.terms:
            if not isinstance(t, FDTerm):
                raise TypeError(f"terms must be FDTerm objects, got {type(t).__name__}")
        # per term, computed once: its distinct tensors, its batch, whether it is whole tensors (a layer's
        # factors: stacked and unbound directly, no per-step views)
        self._params = [t.params() for t in self.terms]
        self._batch = [t.batch() for t in self.terms]
        self._whole = [t.layer is None and all(f is _batch1 for f, x in zip(t.views, t.tensors) if x is not None)
                       for t in self.terms]
        groups: dict = {}
        self._layer_terms: list[int] = []
        for i, t in enumerate(self.terms):
            key = t.key()
            if key is None:
                self._layer_terms.append(i)
            else:
                # whole tensors and views never share a batch: a layer's (m, r) factors and an attention's
                # per-head (d, d_h) views can have the same shapes, but only the views map a weight to them
                groups.setdefault((key, self._whole[i]), []).append(i)
        self._groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.terms)

    def params(self) -> list[Tensor]:
        """Every distinct tensor the terms read and write."""
        seen: set[int] = set()
        return [p for t in self.terms for p in t.params() if not (id(p) in seen or seen.add(id(p)))]

    @torch.no_grad()
    def apply_(self, coef: Union[float, Sequence[float]], lr: Optional[Sequence[Optional[float]]] = None,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
        """Add the FD gradient of every term (coupled) or step the parameters by it (decoupled).

        Args:
            coef: the FD coefficient, one for all terms or one per term; terms with 0 are skipped.
            lr: None (every term coupled), or one entry per term: None = coupled, a learning rate =
                decoupled (``p -= lr * coef * dFD/dp``).
            grad_scale: the loss scale still held by the gradients (fused optimizers under
                ``GradScaler``); multiplies the coupled FD gradients.
            found_inf: ``GradScaler``'s inf/NaN flag (a 0/1 tensor): decoupled steps are skipped
                where it is 1, as the fused kernels skip their update.
        """
        _refuse_graph_capture()
        n = len(self.terms)
        coefs = [float(coef)] * n if isinstance(coef, (int, float)) else [float(c) for c in coef]
        lrs = [None] * n if lr is None else list(lr)
        if len(coefs) != n or len(lrs) != n:
            raise ValueError(f"coef and lr must have one entry per term ({n}), got {len(coefs)} and {len(lrs)}")
        targets: list[Tensor] = []
        fds: list[Tensor] = []
        mults: list[float] = []
        decoupled: list[bool] = []

        def emit(p: Tensor, view: Optional[View], fd: Tensor, i: int) -> None:
            if p.grad is None:
                return  # no gradient this step: no FD either
            if lrs[i] is None:
                target, mult = p.grad, coefs[i]
            else:
                target, mult = p, -float(lrs[i]) * coefs[i]
            targets.append(target if view is None else view(target))
            fds.append(fd)
            mults.append(mult)
            decoupled.append(lrs[i] is not None)

        for members in self._groups:
            active = [i for i in members if coefs[i] != 0 and any(p.grad is not None for p in self._params[i])]
            if not active:
                continue
            first = self.terms[active[0]]
            whole = self._whole[active[0]]
            dtype = torch.float64 if first.tensors[0].dtype == torch.float64 else torch.float32
            stacked: list = []
            for j in range(3):
                if first.tensors[j] is None:
                    stacked.append(None)
                elif whole:  # one layer: a view, no copy
                    parts = [self.terms[i].tensors[j] for i in active]
                    stacked.append((parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)).to(dtype))
                else:
                    parts = [self.terms[i].views[j](self.terms[i].tensors[j]) for i in active]
                    stacked.append((parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype))
            grads = _fd_grads(*stacked)
            for j in range(3):
                if first.tensors[j] is None:
                    continue
                chunks = grads[j].unbind(0) if whole else grads[j].split([self._batch[i] for i in active])
                for i, fd in zip(active, chunks):
                    term = self.terms[i]
                    emit(term.tensors[j], None if whole else term.views[j], fd, i)
        for i in self._layer_terms:
            if coefs[i] == 0:
                continue
            term = self.terms[i]
            params = self._params[i]
            saved = [p.grad for p in params]
            if all(g is None for g in saved):
                continue
            for p in params:
                p.grad = None
            term.layer.add_frobenius_grad_(1.0)  # the FD gradient alone, in fresh .grad tensors
            fresh = [p.grad for p in params]
            for p, g in zip(params, saved):
                p.grad = g
            for p, fd in zip(params, fresh):
                if fd is not None:
                    emit(p, None, fd, i)
        if not fds:
            return
        if grad_scale is None and found_inf is None and all(m == mults[0] for m in mults):
            # every term scaled alike (the usual case: one coefficient): the scale as the add's alpha, one call
            torch._foreach_add_(targets, fds, alpha=mults[0])
            return
        torch._foreach_mul_(fds, mults)
        coupled = [fd for fd, d in zip(fds, decoupled) if not d]
        if grad_scale is not None and coupled:
            torch._foreach_mul_(coupled, grad_scale.reshape(()).to(device=coupled[0].device, dtype=torch.float32))
        moved = [fd for fd, d in zip(fds, decoupled) if d]
        if found_inf is not None and moved:
            torch._foreach_mul_(moved, 1 - found_inf.reshape(()).to(device=moved[0].device, dtype=torch.float32))
        torch._foreach_add_(targets, fds)
