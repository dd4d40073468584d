"""Frobenius decay (paper section 3.2; docs/method.md#frobenius-decay).

Frobenius decay (FD) penalises ``(lambda/2) ||U Vᵀ||_F²`` of each factorized layer instead of
weight decay ``(lambda/2)(||U||² + ||V||²)`` on its factors. ``FrobeniusDecay`` adds the FD gradient
to the factors' gradients before the wrapped optimizer's update (coupled, so it goes through
momentum like SGD's coupled weight decay); ``param_groups`` keeps plain weight decay off the
factors (the paper's ``--wd2fd``) and on everything else.

Every FD path of the project (this wrapper, the timm ``fd*`` optimizers, the fairseq ``fd_*``
optimizers) adds its gradients through one engine, :class:`fnl.fd_engine.FDEngine`, which holds
the rules they share: grouped closed-form gradients in float32, added after gradient clipping to
unscaled gradients (or scaled to match for fused optimizers), a parameter whose ``.grad`` is None
(it got no gradient this step) skipped as torch's weight decay skips it, coupled or decoupled.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import FactorizedLayer
from .fd_engine import FDEngine, FDTerm, layer_term

__all__ = [
    "FrobeniusDecay", "accumulate_fd_grads_", "factor_parameter_names", "factorized_layers", "frobenius_norm",
    "frobenius_penalty", "param_groups",
]


def factorized_layers(module: nn.Module) -> list[FactorizedLayer]:
    """Every ``FactorizedLayer`` in ``module`` (itself included), in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, FactorizedLayer)]


def frobenius_norm(layer: FactorizedLayer) -> Tensor:
    """``||U S Vᵀ||_F`` of one layer, through r x r Gram matrices (``W`` is never formed)."""
    if not isinstance(layer, FactorizedLayer):
        raise TypeError(f"layer must be a FactorizedLayer, got {type(layer).__name__}")
    return layer.frobenius_norm_sq().sqrt()


def frobenius_penalty(module: nn.Module, coef: float) -> Tensor:
    """``(coef/2) * sum ||U S Vᵀ||_F²`` over the factorized layers of ``module`` (differentiable).

    Adding this to the loss gives the same gradient as ``FrobeniusDecay``, at the cost of an extra
    autograd graph; it is there for tests and for users who prefer a loss term.
    """
    layers = factorized_layers(module)
    if not layers:
        raise ValueError("module has no factorized layers; nothing to penalise")
    return 0.5 * coef * torch.stack([layer.frobenius_norm_sq() for layer in layers]).sum()


def factor_parameter_names(model: nn.Module) -> set[str]:
    """Fully qualified names (as in ``model.named_parameters()``) of every factor parameter."""
    ids = {id(p) for layer in factorized_layers(model) for p in layer.factor_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@torch.no_grad()
def accumulate_fd_grads_(params: Sequence[Tensor], add: Callable[[], None],
                         grad_scale: Optional[Tensor] = None) -> None:
    """Run ``add()``, which adds an FD gradient to the ``.grad`` of ``params``, under the shared rules.

    * A parameter whose ``.grad`` is None got no gradient this step (a layer unused by this batch, a
      frozen branch): it gets no FD gradient either and its ``.grad`` stays None, as with torch's
      own weight decay. When none of ``params`` has a gradient, ``add`` is not run.
    * ``grad_scale``: the gradients are still multiplied by this loss scale, which a fused optimizer
      divides out inside its kernel (``torch.amp.GradScaler.step`` hands it the scale instead of
      unscaling first). The FD gradient is then multiplied by the same scale, so that after the
      kernel's division it is the FD gradient of the unscaled problem. No host synchronisation.

    Args:
        params: the tensors ``add`` writes gradients to (factors, attention projections, or the
            fp32 copies an optimizer steps instead of them).
        add: adds the FD gradient to ``p.grad`` for every ``p`` in ``params`` (creating it when None).
        grad_scale: the loss scale still in the gradients, or None for unscaled gradients.
    """
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return
    if grad_scale is None:
        add()
        for p, g in zip(params, grads):
            if g is None:
                p.grad = None  # add() created it: no gradient this step, so no FD either
        return
    for p in params:
        p.grad = None
    add()  # the FD gradient alone, in fresh .grad tensors
    for p, g in zip(params, grads):
        fd, p.grad = p.grad, g
        if g is not None and fd is not None and fd is not g:
            g.add_(fd.mul_(grad_scale.to(fd.dtype)))


def param_groups(
        model: nn.Module,
        weight_decay: float,
        wd2fd: bool = True,
        no_weight_decay_1d: bool = False,
        skip: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups that apply the paper's ``--wd2fd`` split.

    Args:
        model: the model.
        weight_decay: the plain weight decay of the non-factor parameters.
        wd2fd: factors get no plain weight decay (Frobenius decay replaces it); without it the
            factors get ``weight_decay`` like every other parameter.
        no_weight_decay_1d: also exempt 1-d parameters (biases, norm layers) from weight decay.
        skip: names of further parameters exempt from weight decay.

    Returns:
        Non-empty groups among: decayed parameters, exempt non-factors, factors (the last has the
        key ``"factors": True``, so optimizers can find it).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    factor_ids = {id(p) for layer in factorized_layers(model) for p in layer.factor_parameters()}
    skip = set(skip)
    decay, no_decay, factors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in factor_ids:
            (factors if wd2fd else decay).append(p)
        elif name in skip or (no_weight_decay_1d and p.ndim <= 1):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": factors, "weight_decay": 0.0, "factors": True},
    ]
    return [g for g in groups if g["params"]]


class FrobeniusDecay(torch.optim.Optimizer):
    """Wraps an optimizer so that each ``step()`` applies Frobenius decay first.

    Coupled (the paper's, the default for every optimizer but Adam / AdamW): the FD gradient of every
    factorized layer of ``model`` (``coef * U (VᵀV)`` and ``coef * V (UᵀU)``, with the square factor
    where present) is added to the factors' ``.grad``, then the wrapped optimizer steps, so FD goes
    through momentum as SGD's weight decay does. Decoupled (the default for ``torch.optim.Adam`` /
    ``AdamW``, as AdamW decouples weight decay): each factor moves by ``-lr * coef * dFD/dp`` at its
    pre-step value, where AdamW applies its decay, and Adam's normalisation never sees FD.
    ``param_groups`` and ``state`` are the wrapped optimizer's, so LR schedulers, gradient clipping
    and ``torch.amp.GradScaler`` see one optimizer. Call ``scaler.unscale_`` / ``scaler.step`` on
    this wrapper, not on the wrapped optimizer: the scaler then unscales the gradients before
    ``step`` (also for a ``fused=True`` optimizer, whose in-kernel unscaling the wrapper does not
    use), so coupled FD is added to unscaled, clipped gradients. Factors whose ``.grad`` is None
    this step get no FD. Under DDP every process holds the same parameters, so they add the same FD
    gradient. ``copy.deepcopy`` copies the wrapped optimizer and the layers together (``extra``
    callables are shared, not copied).

    Args:
        optimizer: any ``torch.optim.Optimizer``; build it with ``fnl.param_groups`` so that the
            factors carry no plain weight decay. Refused (ValueError, at construction and at any step,
            before anything moves): plain weight decay on a regularised tensor, an optimizer that
            applies FD itself (groups with ``fd_coef``), ``maximize=True`` with coupled FD, and with
            decoupled FD one term's tensors at different learning rates (docs/method.md#frobenius-decay).
        model: the module whose factorized layers get FD.
        coef: the FD coefficient ``lambda`` (>= 0; 0 disables FD).
        extra: further callables ``f(coef)`` run before each step to add (coupled) FD gradients of
            other structures; wrap them in :func:`accumulate_fd_grads_` so that they follow the same
            rules. Prefer ``terms``.
        terms: further :class:`fnl.fd_engine.FDTerm` objects (attention forms, terms on master
            copies), applied with the layers' terms by the same engine.
        decoupled: None = decoupled for ``torch.optim.Adam`` / ``AdamW``, coupled otherwise; True /
            False to choose. Decoupled FD needs every regularised tensor in the optimizer's groups
            (it reads their ``lr``) and no ``extra`` callables.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, coef: float,
                 extra: Sequence[Callable[[float], None]] = (), terms: Sequence[FDTerm] = (),
                 decoupled: Optional[bool] = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, FrobeniusDecay):
            raise TypeError("optimizer is already wrapped in FrobeniusDecay")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        coef = float(coef)
        if not coef >= 0:
            raise ValueError(f"coef must be a float >= 0, got {coef}")
        if decoupled is None:
            decoupled = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        elif not isinstance(decoupled, bool):
            raise TypeError(f"decoupled must be None, True or False, got {decoupled!r}")
        # Optimizer.__init__ is not called: the parameters, groups and state are the wrapped optimizer's.
        self.optimizer = optimizer
        self.coef = coef
        self.decoupled = decoupled
        self.layers = factorized_layers(model)
        self.extra = list(extra)
        self.engine = FDEngine([layer_term(layer) for layer in self.layers] + list(terms))
        if not len(self.engine) and not self.extra:
            raise ValueError("model has no factorized layers and no extra FD terms were given; "
                             "FrobeniusDecay would do nothing")
        self._check_decoupled_extra()
        self._term_lrs()  # refuses what this optimizer's groups cannot support (below), before the first step
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    def _check_decoupled_extra(self) -> None:
        if self.decoupled and self.extra:
            raise ValueError("decoupled=True applies FD through the optimizer's learning rates; extra callables "
                             "can only add gradients (coupled): pass FDTerm objects as terms= instead")

    def _groups_per_term(self) -> list[list[Optional[dict[str, Any]]]]:
        """For each term, the param group of each of its tensors (None: in no group), cached until the
        groups change (``add_param_group``, ``load_state_dict``)."""
        key = tuple(id(g) for g in self.optimizer.param_groups)
        cache = self.__dict__.get("_group_cache")
        if cache is None or cache[0] != key:
            where = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
            cache = (key, [[where.get(id(p)) for p in term.params()] for term in self.engine.terms])
            self._group_cache = cache
        return cache[1]

    def _term_lrs(self) -> Optional[list[float]]:
        """Check the groups of the regularised tensors and return each term's learning rate (decoupled),
        or None (coupled). Refused, as each would make the regulariser silently differ from the one asked
        for (docs/method.md#frobenius-decay): plain weight decay on a regularised tensor (it would get both),
        a group that applies FD itself (``fd_coef``: a timm ``fd*`` optimizer), ``maximize=True`` with
        coupled FD (the optimizer would negate the FD gradient: growth, not decay), and with decoupled FD
        a tensor in no group or the tensors of one term at different learning rates."""
        lrs: list[float] = []
        for term, groups in zip(self.engine.terms, self._groups_per_term()):
            for g in groups:
                if g is None:
                    continue
                if g.get("weight_decay", 0.0):
                    raise ValueError(f"a {term.name} tensor is in a param group with weight_decay="
                                     f"{g['weight_decay']}: it would get plain weight decay and Frobenius decay. "
                                     "Build the optimizer with fnl.param_groups(model, weight_decay), which puts "
                                     "the factors in a group without weight decay")
                if g.get("fd_coef", 0.0):
                    raise ValueError("the optimizer applies Frobenius decay itself (a param group has fd_coef="
                                     f"{g['fd_coef']}); wrapping it in FrobeniusDecay would apply it twice")
                if g.get("maximize", False) and not self.decoupled:
                    raise ValueError("maximize=True with coupled Frobenius decay: the optimizer would negate the FD "
                                     "gradient and grow the factors' product instead of decaying it; use "
                                     "decoupled=True, or minimize the negated objective")
            if self.decoupled:
                if any(g is None for g in groups):
                    raise ValueError(f"decoupled Frobenius decay: a {term.name} tensor is not in the optimizer's "
                                     "param_groups, so it has no learning rate; optimize it or use decoupled=False")
                lr = groups[0]["lr"]
                if any(float(g["lr"]) != float(lr) for g in groups[1:]):
                    raise ValueError(f"decoupled Frobenius decay moves the tensors of one {term.name} by one "
                                     "learning rate, but they are in param groups with lr "
                                     f"{sorted({float(g['lr']) for g in groups})}: put them in groups with one lr, "
                                     "or use decoupled=False")
                lrs.append(lr)
        return lrs if self.decoupled else None

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @torch.no_grad()
    def apply_frobenius_decay(self) -> None:
        """Apply FD (``step`` calls this): add the gradients (coupled) or move the factors (decoupled)."""
        if self.coef == 0:
            return
        self.engine.apply_(self.coef, lr=self._term_lrs())
        for fn in self.extra:
            fn(self.coef)

    # Optimizer's own __getstate__ keeps only defaults/state/param_groups, which live in the wrapped
    # optimizer here: pickle and deepcopy the wrapper's own attributes instead.
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.__dict__.update(state)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        if closure is None:
            self.apply_frobenius_decay()
            return self.optimizer.step()

        def closure_with_fd() -> float:
            loss = closure()
            self.apply_frobenius_decay()
            return loss

        return self.optimizer.step(closure_with_fd)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(),
                "frobenius_decay": {"coef": self.coef, "decoupled": self.decoupled}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "frobenius_decay"}:
            raise ValueError("state_dict must be a FrobeniusDecay.state_dict() (keys 'optimizer' and "
                             "'frobenius_decay'); for the wrapped optimizer's own state use .optimizer.load_state_dict")
        saved = state_dict["frobenius_decay"]
        decoupled = saved.get("decoupled", self.decoupled)
        if not isinstance(decoupled, bool):
            raise ValueError(f"state_dict['frobenius_decay']['decoupled'] must be True or False, got {decoupled!r}")
        if decoupled and self.extra:  # checked before anything is loaded
            raise ValueError("the state_dict is of decoupled Frobenius decay, which applies FD through the optimizer's "
                             "learning rates; this wrapper's extra callables can only add gradients (coupled)")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        # the saved settings win, as torch restores each group's hyper-parameters: a resumed run goes on as it ran
        self.coef = float(saved["coef"])
        self.decoupled = decoupled

    def __repr__(self) -> str:
        return (f"FrobeniusDecay(coef={self.coef}, decoupled={self.decoupled}, layers={len(self.layers)}, "
                f"terms={len(self.engine)}, optimizer={self.optimizer!r})")
