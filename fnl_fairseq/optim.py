"""Frobenius-decay optimizers for fairseq: ``fd_nag`` (the paper's), ``fd_adam``, ``fd_sgd``.

(Paper section 3.) One wrapper, ``FDOptimizer``, over fairseq's own optimizers: it finds
the model that owns its parameters (``fnl_fairseq.fd``), keeps plain weight decay off the
parameters that Frobenius decay (FD) regularises and on every other one, and wraps the fairseq
optimizer's torch optimizer in ``fnl.FrobeniusDecay``, which applies the FD of every factorized
layer (``--wd2fd``) and of every per-head QK/OV form (``--wd2fd-quekey``, ``--wd2fd-outval``) before
each update through the core's one FD engine (``fnl.fd_engine``). The FD coefficient is
``--weight-decay``. ``fd_nag`` and ``fd_sgd`` add the FD gradient to the gradient (coupled, the
paper's); ``fd_adam`` decouples it as fairseq's ``adam`` decouples weight decay
(``p -= lr * coef * dFD/dp`` at the pre-step value), or couples it with ``--fd-coupled``.

The FD gradient is added inside ``step()``, where fairseq's optimizers apply weight decay: after
gradient clipping, after the all-reduce (every process adds the same FD gradient to the same
parameters), and to unscaled gradients: under ``--fp16`` / ``--memory-efficient-fp16``
``supports_step_with_scale`` is False, so fairseq unscales before calling ``step``. Under ``--amp``
fairseq's ``AMPOptimizer`` unscales the gradients through ``optimizer.optimizer`` (the torch
optimizer) in ``clip_grad_norm`` and then hands this wrapper, a different object, to
``GradScaler.step``, which would unscale them a second time (the task gradient divided by the loss
scale twice, FD and weight decay not). So this wrapper tells the scaler it handles the scale itself
(``_step_supports_amp_scaling``): the scaler then only checks for inf/NaN and passes the scale, and
``step`` divides the gradients by it only when ``clip_grad_norm`` (which ``AMPOptimizer`` calls right
after unscaling) has not run since the last step, and skips the update on inf/NaN as the scaler would.

Every FD term skips a parameter whose ``.grad`` is None (no gradient this step), like torch's
weight decay. A requested regulariser that would do nothing is an error at start-up: an ``fd_*``
optimizer for a model without ``--wd2fd*`` flags, or ``--weight-decay 0`` (the FD coefficient).

Precision modes: fp32, ``--amp`` and ``--memory-efficient-fp16``/``--memory-efficient-bf16``
update the model's own parameters. ``--fp16``/``--bf16`` (fairseq's ``FP16Optimizer``) update fp32
master copies: the optimizer is handed the copies, one per parameter in the model's order, so it
matches them to the model's parameters (same order, shapes and values) and applies FD to the
copies. With ``--fp16`` fairseq flattens the copies into one buffer unless
``--fp16-no-flatten-grads`` is given; one buffer cannot keep weight decay off the factors, so that
is refused at start-up naming the flag (``--bf16`` never flattens).
"""
import ast
import copy
import dataclasses
import logging
from typing import Any, Optional

import fnl
import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import OPTIMIZER_REGISTRY, FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdamConfig
from fairseq.optim.nag import FairseqNAGConfig
from omegaconf import II, DictConfig, ListConfig, OmegaConf
from torch import nn

from fnl_fairseq.fd import FDTerms, find_owner

__all__ = ["FDOptimizer", "FairseqFDAdam", "FairseqFDNAG", "FairseqFDSGD", "literal_betas"]

logger = logging.getLogger(__name__)

_STATE_KEY = "fnl_frobenius_decay"

FLAT_REFUSAL = (
    "--fp16 hands the optimizer one flat fp32 copy of all {n} parameters, which cannot keep plain weight decay "
    "off the parameters that Frobenius decay regularises: add --fp16-no-flatten-grads (or use "
    "--memory-efficient-fp16 or --amp) with the fd_* optimizers")
UNMATCHED = (
    "the FD optimizers were given {n} tensor(s) that are neither the parameters of the model asking for "
    "Frobenius decay nor fp32 copies of them in the model's order; build the optimizer over "
    "[p for p in model.parameters() if p.requires_grad] (fairseq's trainer does)")


def match_fp32_copies(params: list, models: list) -> tuple:
    """The model whose trainable parameters ``params`` copies (fairseq's ``FP16Optimizer`` copies them
    to fp32, in order, before the criterion's), and ``{id(model parameter): copy}``.

    Raises:
        RuntimeError: a flat copy (``FLAT_REFUSAL``), or no model matches (``UNMATCHED``).
    """
    for model in models:
        own = [p for p in model.parameters() if p.requires_grad]
        if len(params) == 1 and params[0].dim() == 1 and len(own) > 1 \
                and params[0].numel() >= sum(p.numel() for p in own):
            raise RuntimeError(FLAT_REFUSAL.format(n=len(own)))
        if len(params) < len(own):
            continue
        with torch.no_grad():
            if all(c.shape == p.shape and c.dtype == torch.float32 and c.device == p.device
                   and torch.equal(c, p.float()) for c, p in zip(params, own)):
                return model, {id(p): c for p, c in zip(own, params)}
    raise RuntimeError(UNMATCHED.format(n=len(params)))


class FDOptimizer(FairseqOptimizer):
    """A fairseq optimizer plus Frobenius decay, as the model's ``--wd2fd*`` flags ask.

    Subclasses set ``base``, the registry name of the fairseq optimizer they wrap; ``cfg`` is that
    optimizer's config, whose ``weight_decay`` is also the FD coefficient.
    """

    base: str = ""

    def __init__(self, cfg: Any, params) -> None:
        super().__init__(cfg)
        params = list(params)
        owner, wanting = find_owner(params)
        copies = None  # {id(model parameter): the fp32 copy this optimizer steps} under --fp16 / --bf16
        if owner is None and wanting:
            owner, copies = match_fp32_copies(params, wanting)
        self.terms = owner.frobenius_decay_terms() if owner is not None else FDTerms()
        coef = float(cfg.weight_decay)
        if coef < 0:
            raise ValueError(f"--weight-decay (the FD coefficient) must be >= 0, got {coef}")
        if not self.terms:
            raise ValueError(f"--optimizer fd_{self.base}: the model asks for no Frobenius decay (no --wd2fd, "
                             f"--wd2fd-quekey or --wd2fd-outval), so it would do nothing; add the flags, or use "
                             f"--optimizer {self.base}")
        if coef == 0:
            raise ValueError(f"--optimizer fd_{self.base} with --weight-decay 0: --weight-decay is the Frobenius-decay "
                             f"coefficient of --wd2fd / --wd2fd-quekey / --wd2fd-outval, so they would do nothing; "
                             f"set --weight-decay > 0 (the paper: 1e-4), or drop the --wd2fd* flags and use "
                             f"--optimizer {self.base}")
        fd_params = self.terms.parameters()
        if copies is not None:
            # a frozen parameter has no copy: it stays the model's own, so the check below names it
            fd_params = [copies.get(id(p), p) for p in fd_params]
        given = {id(p) for p in params}
        frozen = [p for p in fd_params if id(p) not in given]
        if frozen:
            raise ValueError(f"{len(frozen)} parameter(s) that Frobenius decay regularises are not being optimized "
                             f"(requires_grad=False?); unfreeze them or drop the --wd2fd* flag")
        fd_ids = {id(p) for p in fd_params}
        groups = [
            {"params": [p for p in params if id(p) not in fd_ids]},  # the optimizer's own weight decay
            {"params": [p for p in params if id(p) in fd_ids], "weight_decay": 0.0},  # Frobenius decay instead
        ]
        groups = [g for g in groups if g["params"]]
        self.wrapped = OPTIMIZER_REGISTRY[self.base](self.base_cfg(cfg), groups)
        self._fd_ids = {id(p) for p in fd_params}
        self._unscaled = False  # clip_grad_norm ran since the last step (under --amp: gradients unscaled)
        self._optimizer = fnl.FrobeniusDecay(self.wrapped.optimizer, nn.ModuleList(), coef,
                                             terms=self.terms.fd_terms(copies), decoupled=self.decoupled(cfg))
        mode = "decoupled" if self._optimizer.decoupled else "coupled"
        logger.info(f"{mode} Frobenius decay (coef {coef:g}) on {len(self.terms.layers)} factorized layers, "
                    f"{len(self.terms.quekey)} query-key and {len(self.terms.outval)} output-value forms "
                    f"({sum(p.numel() for p in fd_params)} parameters without plain weight decay"
                    f"{', on their fp32 copies' if copies is not None else ''})")

    def decoupled(self, cfg: Any) -> bool:
        """Whether FD is decoupled (``p -= lr * coef * dFD/dp``) rather than added to the gradient."""
        return False

    def base_cfg(self, cfg: Any) -> Any:
        """The config handed to the wrapped fairseq optimizer (subclasses make strings fairseq would
        ``eval()`` safe)."""
        return cfg

    @property
    def coef(self) -> float:
        """The FD coefficient."""
        return self._optimizer.coef

    # torch.amp.GradScaler.step(this wrapper) hands over the scale instead of unscaling a second time
    # (fairseq's --amp; see the module docstring)
    _step_supports_amp_scaling = True

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        self._unscaled = True  # AMPOptimizer.clip_grad_norm unscales the gradients right before this call
        return super().clip_grad_norm(max_norm, aggregate_norm_fn)

    def step(self, closure=None, scale=1.0, groups=None):
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step for this call only
        found_inf = getattr(self, "found_inf", None)
        unscaled, self._unscaled = self._unscaled, False
        if found_inf is not None and bool(found_inf):  # one host sync, as GradScaler's own step makes
            return  # inf/NaN gradients: skip the update, as GradScaler does (it lowers the scale in update())
        if grad_scale is not None and not unscaled:
            inv = grad_scale.double().reciprocal().float()
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(inv.to(device=p.grad.device, dtype=p.grad.dtype))
        super().step(closure, scale, groups)

    @property
    def optimizer_config(self) -> dict:
        return self.wrapped.optimizer_config

    # FrobeniusDecay.step() takes no scale: let fairseq unscale the gradients first.
    @property
    def supports_step_with_scale(self) -> bool:
        return False

    @property
    def supports_groups(self) -> bool:
        return False

    @property
    def supports_memory_efficient_fp16(self) -> bool:
        return self.wrapped.supports_memory_efficient_fp16

    @property
    def supports_flat_params(self) -> bool:
        return False  # one flat fp32 buffer has no factors to find

    def state_dict(self) -> dict:
        """The wrapped torch optimizer's state dict (flat, as fairseq's fp16 wrappers expect) plus the FD state."""
        state = dict(self._optimizer.state_dict()["optimizer"])
        state[_STATE_KEY] = {"coef": self.coef, "layers": len(self.terms.layers),
                             "quekey": len(self.terms.quekey), "outval": len(self.terms.outval)}
        return state

    def load_state_dict(self, state_dict: dict, optimizer_overrides: Optional[dict] = None) -> None:
        state_dict = dict(state_dict)
        fd_state = state_dict.pop(_STATE_KEY, None)
        if fd_state is not None:
            now = {"layers": len(self.terms.layers), "quekey": len(self.terms.quekey), "outval": len(self.terms.outval)}
            saved = {k: fd_state.get(k) for k in now}
            if saved != now:
                raise ValueError(f"the checkpoint's optimizer applied Frobenius decay to {saved} but this run asks for "
                                 f"{now} (different --wd2fd* flags or model); use --reset-optimizer to start afresh")
        self.wrapped.optimizer.load_state_dict(state_dict)
        # like the groups' weight_decay, the FD coefficient comes back from the checkpoint
        if fd_state is not None:
            self._optimizer.coef = float(fd_state["coef"])
        if optimizer_overrides and "weight_decay" in optimizer_overrides:
            self._optimizer.coef = float(optimizer_overrides["weight_decay"])
        if optimizer_overrides:
            for group in self.param_groups:
                group.update(optimizer_overrides)
                if group["params"] and id(group["params"][0]) in self._fd_ids:
                    group["weight_decay"] = 0.0  # the FD group never gets plain weight decay

    def average_params(self) -> None:
        self.wrapped.average_params()


@dataclasses.dataclass
class FDNAGConfig(FairseqNAGConfig):
    """``nag``'s options; ``--weight-decay`` is also the FD coefficient."""


@dataclasses.dataclass
class FDAdamConfig(FairseqAdamConfig):
    """``adam``'s options; ``--weight-decay`` is also the FD coefficient."""

    fd_coupled: bool = dataclasses.field(default=False, metadata={
        "help": "add the Frobenius-decay gradient to the gradient before Adam's update (coupled, so Adam's "
                "normalisation rescales it) instead of the default decoupled step p -= lr * coef * dFD/dp, "
                "applied where adam applies its decoupled weight decay"})


@dataclasses.dataclass
class FDSGDConfig(FairseqDataclass):
    """``sgd``'s options; ``--weight-decay`` is also the FD coefficient."""

    momentum: float = dataclasses.field(default=0.0, metadata={"help": "momentum factor"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "weight decay"})
    lr: Any = II("optimization.lr")


@register_optimizer("fd_nag", dataclass=FDNAGConfig)
class FairseqFDNAG(FDOptimizer):
    """fairseq's ``nag`` with Frobenius decay (the paper's Transformer optimizer)."""

    base = "nag"


@register_optimizer("fd_adam", dataclass=FDAdamConfig)
class FairseqFDAdam(FDOptimizer):
    """fairseq's ``adam`` (decoupled weight decay) with Frobenius decay, decoupled like the weight decay
    (``p -= lr * coef * dFD/dp`` at the pre-step value) unless ``--fd-coupled`` adds it to the gradient.

    fairseq's ``adam`` reads a string ``--adam-betas`` with ``eval()``; here it is parsed as a Python
    literal (a pair of floats in [0, 1)) and handed on as a list, so no string is run as code.
    """

    base = "adam"

    def decoupled(self, cfg: Any) -> bool:
        return not bool(getattr(cfg, "fd_coupled", False))

    def base_cfg(self, cfg: Any) -> Any:
        cfg = copy.deepcopy(cfg)
        cfg.adam_betas = OmegaConf.create(literal_betas(cfg.adam_betas))  # fairseq takes a ListConfig as it is
        return cfg


def literal_betas(value: Any) -> list:
    """``--adam-betas`` as ``[beta1, beta2]``: a string is read with ``ast.literal_eval``, never ``eval``.

    Raises:
        ValueError: not a pair of numbers in [0, 1).
    """
    given = value
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"--adam-betas must be a pair of numbers such as '(0.9, 0.98)', got {given!r}") from None
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)):
        raise ValueError(f"--adam-betas must be a pair of numbers in [0, 1) such as '(0.9, 0.98)', got {given!r}")
    return [float(b) for b in value]


@register_optimizer("fd_sgd", dataclass=FDSGDConfig)
class FairseqFDSGD(FDOptimizer):
    """fairseq's ``sgd`` with Frobenius decay."""

    base = "sgd"
