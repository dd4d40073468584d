"""Shared model-building step: factorize the paper's layers (docs/method.md#which-layers-are-factorized)
after the dense init."""
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from timm.layers import create_classifier

import fnl
from fnl._validate import check_rank_choice

from ..optim import mark_factors

Selector = Union[Sequence[str], Callable[[str, nn.Module], bool]]


# The layers keep their init function (``reset_parameters`` calls it again), so it must be a
# module-level function: a lambda or a local function would make the whole model unpicklable
# (``torch.save(model)``, ``copy.deepcopy`` across processes).
def kaiming_fan_out_(weight: torch.Tensor) -> torch.Tensor:
    """He-normal init with fan-out and ReLU gain, the usual init of the CIFAR WRN / VGG convs."""
    return nn.init.kaiming_normal_(weight, mode='fan_out', nonlinearity='relu')


def kaiming_linear_fan_in_(weight: torch.Tensor) -> torch.Tensor:
    """He-normal init with fan-in and unit gain (torch counts a depthwise filter's fan-out as
    ``in_channels * k * k``, so depthwise filters use the fan-in)."""
    return nn.init.kaiming_normal_(weight, mode='fan_in', nonlinearity='linear')


def check_rank_args(rank_scale: Optional[float], target_ratio: Optional[float]) -> None:
    """Validate the ``rank_scale`` / ``target_ratio`` model kwargs: the core's one rule
    (docs/method.md#rank-settings: rank_scale a finite float > 0, target_ratio in (0, 1], at most
    one; both unset = dense)."""
    check_rank_choice(None, rank_scale, target_ratio)


def factorize_model(
        model: nn.Module,
        include: Selector,
        rank_scale: Optional[float] = None,
        target_ratio: Optional[float] = None,
        spectral: bool = False,
        square: bool = False,
        init: Optional[Callable] = None,
) -> float:
    """Factorize the layers of ``model`` selected by ``include`` in place.

    The dense weights must already hold the model's usual init: spectral init takes their SVD;
    the default init instead draws each factor with ``init`` (docs/method.md#spectral-initialisation).

    Returns:
        The rank_scale used (solved when ``target_ratio`` is given), 0.0 for a dense model.
    """
    check_rank_args(rank_scale, target_ratio)
    # load_state_dict / timm's load_checkpoint adopt a checkpoint's ranks (dense, factorized, square)
    fnl.adopt_on_load(model, after=mark_factors)
    if target_ratio is not None:
        rank_scale = fnl.solve_rank_scale(model, target_ratio, include=include, square=square)
    if not rank_scale:
        if square or spectral:
            raise ValueError('spectral/square need a factorized model: set rank_scale > 0 or target_ratio')
        record_kept_dense(model, 'dense model: no rank_scale or target_ratio given')
        return 0.0
    fnl.factorize(
        model,
        rank_scale=float(rank_scale),
        spectral=bool(spectral),
        square=bool(square),
        include=include,
        init=None if spectral else init,
    )
    mark_factors(model)
    record_kept_dense(model, PAPER_KEEPS_DENSE)
    return float(rank_scale)


PAPER_KEEPS_DENSE = "the paper keeps it dense (stem or classifier; docs/method.md#which-layers-are-factorized)"


def record_kept_dense(model: nn.Module, reason: str) -> None:
    """``model.fnl_kept_dense``: every Linear / Conv2d left dense, with ``reason`` (shown by ``fnl.summary``)."""
    model.fnl_kept_dense = {name: reason for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


class ClassifierMixin:
    """timm's model conventions shared by the fnl_* models (``self.fc``, ``self.global_pool``, ``self.num_features``)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Empty: the factors keep ordinary weight decay with a stock timm optimizer (the paper's
        baseline); the ``fd*`` optimizers find them through ``fnl_timm.mark_factors``, not this list."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
