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
from typing import Iterable, Optional

from fnl.fd_engine import FDTerm, form_term, layer_term
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

    def fd_terms(self, copies: Optional[dict] = None) -> list[FDTerm]:
        """Every FD term as core :class:`fnl.fd_engine.FDTerm` objects, for ``fnl.FrobeniusDecay(terms=...)``.

        ``copies`` (``{id(model parameter): tensor}``) builds them on the tensors the optimizer steps
        instead of the model's parameters (the fp32 master copies of ``--fp16`` / ``--bf16``): the FD
        gradient is computed from the copies and written to their ``.grad``.
        """
        def c(p: Tensor) -> Tensor:
            return p if copies is None else copies[id(p)]

        terms = [layer_term(layer, copies) for layer in self.layers]
        for kind, forms in (("quekey", self.quekey), ("outval", self.outval)):
            for a, b, heads in forms:
                terms.append(form_term(kind, c(a.weight), c(b.weight), heads))
        return terms


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
