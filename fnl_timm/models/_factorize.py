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


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A 4-d CPU batch in the channels-last memory format when ``enabled`` (``model.channels_last_inputs``).

    On the CPU, oneDNN runs a model's convs channels-last once their input is, and the factorized
    models' small (1 x k) / (k x 1) convs are much faster so (``fnl_resnet20`` @0.111: inference about
    1.7x, a training step about 1.5x; the WRN / VGG / ResNet-32-x2 models 1.2-1.7x); the dense models
    1.04-1.35x (bench/README.md).
    The values are unchanged: only the layout of the activations. Other devices, other ranks and a
    ``torch.fx`` trace (where the input is a proxy) get ``x`` as it is.
    """
    if torch.jit.is_scripting():
        if enabled and x.dim() == 4 and x.is_cpu:
            return x.contiguous(memory_format=torch.channels_last)
        return x
    return _channels_last_input_eager(x, enabled)


@torch.jit.unused
def _channels_last_input_eager(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and not isinstance(x, torch.fx.Proxy) and x.dim() == 4 and x.device.type == 'cpu':
        return x.contiguous(memory_format=torch.channels_last)
    return x


class FoldsBatchNorm:
    """For the zoo models: in eager inference, each BatchNorm folded into the conv before it
    (``fnl.conv_bn``; docs/speed.md), unless ``fold_bn`` is False (``set_bn_folding``)."""

    fold_bn: bool = True  # a class default, so that modules pickled before it existed have it

    @torch.jit.ignore
    def set_bn_folding(self, enable: bool = True) -> None:
        """Fold BatchNorm into the conv before it in eager inference (the default), or keep them apart,
        in this module and every submodule."""
        for m in self.modules():
            if isinstance(m, FoldsBatchNorm):
                m.fold_bn = bool(enable)

    @torch.jit.unused
    def _conv_bn(self, conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``bn(conv(x))``."""
        return fnl.conv_bn(conv, bn, x) if self.fold_bn else bn(conv(x))

    @torch.jit.unused
    def _sequential(self, seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``seq(x)``."""
        return fnl.sequential_conv_bn(seq, x) if self.fold_bn else seq(x)


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether channels-last is the CPU default for ``model`` (``fnl-train``, ``channels_last_inputs``).

    True for a model with 2-d convs (``nn.Conv2d``, :class:`fnl.FactorizedConv2d`): on the CPU every
    conv model measured ran faster so, dense or factorized (docs/speed.md). False without convs and
    for a model with tensor-format convs (TT / Tucker; not measured channels-last).
    """
    modules = list(model.modules())
    if any(isinstance(m, fnl.TensorConv2d) for m in modules):
        return False
    return any(isinstance(m, (nn.Conv2d, fnl.FactorizedConv2d)) for m in modules)


def _after_adoption(model: nn.Module) -> None:
    """After a checkpoint's ranks were adopted on load: register the new factors. The input format
    stays (the default is the same for dense and factorized convs, and a user's choice is kept), but
    adopted tensor-format convs, which ``prefers_channels_last`` leaves contiguous, turn it off."""
    mark_factors(model)
    if not prefers_channels_last(model):
        model.channels_last_inputs = False


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
    fnl.adopt_on_load(model, after=_after_adoption)
    model.channels_last_inputs = prefers_channels_last(model)
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
