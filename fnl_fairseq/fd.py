"""What Frobenius decay acts on in a model (paper section 3).

A model built by this plugin knows, from its ``--wd2fd*`` flags, which structures get Frobenius
decay (FD) instead of weight decay: factorized layers (``--wd2fd``), per-head query-key forms
(``--wd2fd-quekey``) and per-head output-value forms (``--wd2fd-outval``). fairseq hands an
optimizer only a list of parameters, so models register themselves here when built and the FD
optimizers (``fnl_fairseq.optim``) find the model that owns their parameters.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Iterable, Optional

import fnl
from fnl.frobenius import accumulate_fd_grads_
from torch import Tensor, nn

__all__ = ["FDTerms", "find_owner", "register_model"]

_LIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclasses.dataclass
class FDTerms:
    """The FD terms of one model.

    Attributes:
        layers: factorized layers whose ``||U Vᵀ||_F²`` is penalised.
        quekey: (q_proj, k_proj, heads) of each attention whose ``sum_h ||W_Q^hᵀ W_K^h||_F²`` is penalised.
        outval: (out_proj, v_proj, heads) of each attention whose ``sum_h ||W_O^h W_V^h||_F²`` is penalised.
    """

    layers: list = dataclasses.field(default_factory=list)
    quekey: list = dataclasses.field(default_factory=list)
    outval: list = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.layers or self.quekey or self.outval)

    def parameters(self) -> list[Tensor]:
        """Every parameter that FD regularises (and plain weight decay must not)."""
        params: list[Tensor] = []
        for layer in self.layers:
            params.extend(layer.factor_parameters())
        for a, b, _ in self.quekey + self.outval:
            params.extend((a.weight, b.weight))
        seen: set[int] = set()
        return [p for p in params if not (id(p) in seen or seen.add(id(p)))]

    def layer_module(self) -> nn.ModuleList:
        """The factorized layers as one module, for ``fnl.FrobeniusDecay(optimizer, model, coef)``."""
        return nn.ModuleList(self.layers)

    def attention_hooks(self, copies: Optional[dict] = None) -> list[Callable[[float], None]]:
        """``extra=`` hooks for ``fnl.FrobeniusDecay``: FD gradients of the attention forms.

        ``copies`` (``{id(model parameter): tensor}``) makes the hooks act on the tensors the optimizer
        steps instead of the model's parameters (the fp32 master copies of ``--fp16`` / ``--bf16``).
        A tensor whose ``.grad`` is None is skipped (``fnl.frobenius.accumulate_fd_grads_``).
        """
        def c(p: Tensor) -> Tensor:
            return p if copies is None else copies[id(p)]

        hooks: list[Callable[[float], None]] = []
        for add, forms in ((fnl.add_quekey_fd_grad_, self.quekey), (fnl.add_outval_fd_grad_, self.outval)):
            for a, b, heads in forms:
                hooks.append(_hook(add, c(a.weight), c(b.weight), heads))
        return hooks

    def copy_hooks(self, copies: dict) -> list[Callable[[float], None]]:
        """Every FD term (factorized layers and attention forms) as hooks on the optimizer's copies of
        the parameters (``{id(model parameter): copy}``), for ``fnl.FrobeniusDecay(..., extra=...)``."""
        hooks: list[Callable[[float], None]] = []
        for layer in self.layers:
            u, s, v = (None if f is None else copies[id(f)] for f in layer.factors())
            tensors = [t for t in (u, s, v) if t is not None]
            hooks.append(lambda coef, u=u, v=v, s=s, ts=tensors: accumulate_fd_grads_(
                ts, lambda: fnl.add_factor_fd_grad_(u, v, coef, s)))
        return hooks + self.attention_hooks(copies)


def _hook(add: Callable, a: Tensor, b: Tensor, heads: int) -> Callable[[float], None]:
    """``f(coef)`` adding the FD gradient of one attention form (``add(a, b, heads, coef)``) to ``a``, ``b``."""
    return lambda coef: accumulate_fd_grads_((a, b), lambda: add(a, b, heads, coef))


def register_model(model: nn.Module) -> None:
    """Make ``model`` findable by the FD optimizers (held weakly)."""
    if not callable(getattr(model, "frobenius_decay_terms", None)):
        raise TypeError(f"{type(model).__name__} has no frobenius_decay_terms() method")
    _LIVE.add(model)


def find_owner(params: Iterable[Tensor]) -> tuple[Optional[nn.Module], list[nn.Module]]:
    """The registered model owning ``params`` (or None), and every registered model asking for FD."""
    ids = {id(p) for p in params}
    owner = None
    wanting = []
    for model in list(_LIVE):
        if model.frobenius_decay_terms():
            wanting.append(model)
        if owner is None and any(id(p) in ids for p in model.parameters()):
            owner = model
    return owner, wanting
