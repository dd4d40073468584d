"""A conv followed by BatchNorm, with the BatchNorm folded into the conv in eager inference.

In eval mode BatchNorm is a fixed per-channel affine map, ``y * scale + shift``, so ``bn(conv(x))``
is one conv whose output channels are scaled by ``scale`` and whose bias is
``shift + scale * conv.bias``. Folding it saves a pass over the conv's output and its allocation:
on the CPU that made eager inference of ``fnl_resnet20`` at rank_scale 0.111 about 1.2x faster
(docs/speed.md). :func:`fnl.fold_batchnorm` does the same once on a converted copy of a model;
:func:`conv_bn` does it on the live layers, so training, ``load_state_dict`` and optimizer steps
need nothing special: the folded weight and bias are made from the current parameters and running
statistics, kept, and made again when any of them changes (a host-side check of their
versions, no device synchronisation); making them is about eight small operations, which at batch 1
cost more than the BatchNorm they save.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .base import cuda_graph_capturing
from ._kept import Ref, version_key
from .conv import FactorizedConv2d, is_channels_last, keeps_inference_weights

__all__ = ["conv_bn", "folds_batchnorm", "keep_inference_weights", "sequential_conv_bn"]

# conv -> (key, (weights, shift)): the folded weights last made for it. Held beside the conv, not in
# it, so that pickling or copying a model does not carry them.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def folds_batchnorm(conv: nn.Module, bn: nn.Module, x: Tensor) -> bool:
    """Whether :func:`conv_bn` folds ``bn`` into ``conv`` for the input ``x``.

    Only where the result is the same function and nothing observes the two layers apart: autograd
    off (``torch.no_grad`` / ``torch.inference_mode``), ``bn`` an ``nn.BatchNorm2d`` in eval mode
    with running statistics and ``conv.out_channels`` features, ``conv`` an ``nn.Conv2d`` or an
    :class:`fnl.FactorizedConv2d` (exact types: a subclass may compute something else), a 4-d
    input, no autocast, no forward hooks on either layer or global ones, and no
    ``torch.jit`` / ``torch.fx`` trace, ``torch.compile`` or ``torch.export`` (those see the two
    layers, and inductor fuses them itself).
    """
    if torch.is_grad_enabled() or bn.training or type(bn) is not nn.BatchNorm2d:
        return False
    if type(conv) is not nn.Conv2d and type(conv) is not FactorizedConv2d:
        return False
    if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
        return False
    if _observed(x) or x.dim() != 4 or torch.is_autocast_enabled(x.device.type):
        return False
    return not (_hooked(conv) or _hooked(bn))


def _observed(x: Tensor) -> bool:
    """Whether something records or watches the modules run on ``x``: a ``torch.fx`` / ``torch.jit``
    trace, ``torch.compile`` / ``torch.export``, or global forward hooks."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))``, as one conv with ``bn`` folded into it where :func:`folds_batchnorm` allows.

    The folded result equals ``bn(conv(x))`` up to float rounding; everywhere else (training,
    autograd on, other layer types, traces, hooks) this is exactly ``bn(conv(x))``. A
    :class:`fnl.FactorizedConv2d` keeps the path it takes (two convs, the second one scaled, or
    the rebuilt kernel). docs/speed.md has the measured speed-up.
    """
    if not folds_batchnorm(conv, bn, x):
        return bn(conv(x))
    weights, shift = _folded(conv, bn, x)
    if isinstance(conv, FactorizedConv2d):
        if len(weights) == 1:  # the rebuilt-kernel path
            return nn.functional.conv2d(x, weights[0], shift, conv.stride, conv.padding, conv.dilation)
        return conv.factored_convs(x, weights[0], weights[1], shift)
    return conv._conv_forward(x, weights[0], shift)


def _folded(conv: nn.Module, bn: nn.BatchNorm2d, x: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """The conv weights (one, or the factored path's two) and the bias of ``conv`` with ``bn`` folded
    in, for the input ``x``; kept (beside ``conv``) and made again when a parameter, a running statistic, ``eps``,
    the BatchNorm, the path or the input's layout changes.

    A train-mode forward updates the running statistics inside the BatchNorm kernel, which does not bump
    their version counters; it also counts the batch in ``num_batches_tracked`` (an in-place add, which
    does), so that counter is part of the key; without it nothing is kept, nor for inference tensors
    (no version counters), nor inside a CUDA graph capture."""
    tensors = [bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.weight, bn.bias, conv.bias]
    if isinstance(conv, FactorizedConv2d):
        tensors += conv.factor_parameters()
        mode = (conv.uses_dense_path, is_channels_last(x), conv.rank_padding_for(x))
    else:
        tensors.append(conv.weight)
        mode = ()
    versions = version_key(tensors)
    # nothing kept or reused inside a CUDA graph capture: the graph then records the folding, and its
    # replays see the parameters' in-place updates (a kept result would be frozen into the graph, and
    # one made in the capture holds values only after a replay)
    keep = (bn.num_batches_tracked is not None and versions is not None and not cuda_graph_capturing()
            and keeps_inference_weights(conv))
    key = (Ref(bn), bn.eps, mode, versions)
    cache = _FOLDED.get(conv) if keep else None
    if cache is not None and cache[0] == key:
        return cache[1]
    scale = bn.running_var.add(bn.eps).rsqrt_()
    if bn.weight is not None:
        scale = scale.mul_(bn.weight)
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift.add_(bn.bias)
    if conv.bias is not None:
        shift = shift.add_(conv.bias * scale)
    scale4 = scale.view(-1, 1, 1, 1)
    if isinstance(conv, FactorizedConv2d):
        if mode[0]:
            weights = (conv.dense_weight() * scale4,)
        else:
            w_a, w_b = conv.conv_weights_for(x)
            weights = (w_a, w_b * scale4)
    else:
        weights = (conv.weight * scale4,)
    if keep:
        _FOLDED[conv] = (key, (weights, shift))
    return weights, shift


def sequential_conv_bn(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)`` for an ``nn.Sequential``, each conv followed by a BatchNorm run through :func:`conv_bn`.

    Wherever calling its layers one by one could be seen or could differ, this is ``seq(x)``: autograd
    on, a ``Sequential`` subclass, forward hooks on ``seq`` or global ones, a trace or
    ``torch.compile`` (which record the ``Sequential`` as a module).
    """
    if torch.is_grad_enabled() or type(seq) is not nn.Sequential or _hooked(seq) or _observed(x):
        return seq(x)
    layers = list(seq)
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and folds_batchnorm(layers[i], layers[i + 1], x):
            x = conv_bn(layers[i], layers[i + 1], x)
            i += 2
        else:
            x = layers[i](x)
            i += 1
    return x


def keep_inference_weights(model: nn.Module, enable: bool = True) -> nn.Module:
    """Let the convs of ``model`` keep the weights they make in eager inference (the default), or
    make them afresh on every call (``enable=False``, which also drops those kept now); returns ``model``.

    Kept are a :class:`fnl.FactorizedConv2d`'s two conv weights and the weights of a conv with its
    BatchNorm folded in (:func:`conv_bn`); they are made again when a parameter or running statistic
    changes in a way torch tracks (optimizer steps, ``load_state_dict``, ``.to()``, in-place
    operations). Turn keeping off for a model whose parameters your code edits in place through
    ``.data`` (``p.data.mul_(...)``, an old idiom of hand-written EMA updates): ``.data`` has its own
    version counter, so such edits are not seen (docs/speed.md). The setting is stored on each conv
    (pickles and copies carry it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be True or False, got {enable!r}")
    for m in model.modules():
        if isinstance(m, (FactorizedConv2d, nn.Conv2d)):
            m.keep_inference_weights = enable
            if not enable:
                _FOLDED.pop(m, None)
                m.__dict__.pop("_conv_weight_cache", None)
    return model
