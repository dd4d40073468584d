"""Deployment of a factorized model (beyond the paper; docs/method.md#post-training-compression):
latency measurement, per-layer choice of the faster path, the plain-torch inference form and
BatchNorm folding.

Nothing here changes what a model computes: each function replaces factorized layers by modules
computing the same function (their two plain layers, or the dense layer) or measures them.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .base import FactorizedLayer
from .conv import FactorizedConv2d
from .linear import FactorizedLinear
from .model import _trace_input_shapes

__all__ = ["fold_batchnorm", "measure_latency", "select_fastest_paths", "to_inference_form"]


# --- tracing and replacing -----------------------------------------------------------------------
def _trace(model: nn.Module, example: Tensor) -> tuple[dict[str, tuple], list[str]]:
    """Input shape (batch dropped) and call order of every Conv2d / Linear, from one eval forward pass."""
    shapes = {name: shape for name, shape in _trace_input_shapes(model, example).items()  # in call order
              if isinstance(model.get_submodule(name), (nn.Conv2d, nn.Linear, FactorizedLayer))}
    return shapes, list(shapes)


def _replace(model: nn.Module, module: nn.Module, new: nn.Module) -> None:
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if m is module and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


# --- timing --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fns: Sequence[Callable[[], object]], device: Union[str, torch.device] = "cpu",
                    repeats: int = 7, warmup: int = 2, inner: int = 1, grad: bool = False) -> list[float]:
    """Median wall time in milliseconds of each callable, timed interleaved (a, b, a, b, ...).

    Interleaving spreads background load (other processes on a shared machine) evenly over the
    candidates; the median discards the outliers it still causes.

    Args:
        fns: zero-argument callables to time.
        device: synchronised around each call on CUDA.
        repeats: timed rounds (the median is taken over them).
        warmup: untimed rounds first.
        inner: calls per timed round (for very short calls).
        grad: run the calls with autograd on (training steps); by default they run under no_grad.
    """
    device = torch.device(device)
    times: list[list[float]] = [[] for _ in fns]
    with torch.set_grad_enabled(grad):
        for i in range(warmup + repeats):
            for j, fn in enumerate(fns):
                _sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                _sync(device)
                if i >= warmup:
                    times[j].append((time.perf_counter() - start) * 1e3 / inner)
    return [statistics.median(t) for t in times]


def _timing_input(shape: tuple, batch_size: int, like: Tensor) -> Tensor:
    return torch.randn((batch_size, *shape), device=like.device, dtype=like.dtype)


def _pair(layer: FactorizedLayer) -> nn.Module:
    """The factorized layer as two plain torch layers with contiguous weights (same function)."""
    u = layer.U if layer.S is None else layer.U @ layer.S
    r = layer.rank
    dev, dtype = layer.U.device, layer.U.dtype
    if isinstance(layer, FactorizedConv2d):
        if layer.uses_dense_path:
            return layer.to_dense()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        first = nn.Conv2d(layer.in_channels, r, (1, kw), (1, sw), (0, pw), (1, dw), bias=False, device=dev, dtype=dtype)
        second = nn.Conv2d(r, layer.out_channels, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=layer.bias is not None,
                           device=dev, dtype=dtype)
        w_a = layer.V.view(layer.in_channels, kw, r).permute(2, 0, 1).unsqueeze(2)  # (r, in, 1, kw)
        w_b = u.view(layer.out_channels, kh, r).permute(0, 2, 1).unsqueeze(3)  # (out, r, kh, 1)
    elif isinstance(layer, FactorizedLinear):
        first = nn.Linear(layer.in_features, r, bias=False, device=dev, dtype=dtype)
        second = nn.Linear(r, layer.out_features, bias=layer.bias is not None, device=dev, dtype=dtype)
        w_a, w_b = layer.V.T, u
    else:
        return layer
    with torch.no_grad():
        first.weight.copy_(w_a)
        second.weight.copy_(w_b)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).train(layer.training)


def to_inference_form(model: nn.Module) -> nn.Module:
    """Replace every factorized Conv2d / Linear by ``nn.Sequential`` of its two plain layers (in place).

    Same function, same parameter count; the weights are stored contiguous instead of being
    re-laid out from ``U``/``V`` on every call, and the model needs only torch to load and run
    (no ``fnl`` classes), which every exporter and runtime understands. Fine-tune (Frobenius
    decay needs the factors) before converting.
    """
    if isinstance(model, FactorizedLayer):
        return _pair(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (FactorizedConv2d, FactorizedLinear)):
            _replace(model, module, _pair(module))
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a conv folded into that conv.

    The usual deployment step (ONNX runtimes do the same): the model is traced with ``torch.fx``
    and each Conv -> BatchNorm pair becomes one conv with rescaled weights and a bias
    (``torch.fx.experimental.optimization.fuse``). Run it on plain layers: after
    :func:`to_inference_form`, :func:`select_fastest_paths` or ``collapse``. The result is an
    eval-mode ``torch.fx.GraphModule`` computing the same function; ``model`` is not changed.

    Raises:
        ValueError: the model still holds factorized layers, or torch.fx cannot trace it.
    """
    from torch.fx.experimental.optimization import fuse

    if any(isinstance(m, FactorizedLayer) for m in model.modules()):
        raise ValueError("fold_batchnorm needs plain layers: convert the factorized ones first "
                         "(to_inference_form, select_fastest_paths or collapse)")
    was = model.training
    try:
        return fuse(model.eval(), inplace=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the model cannot be folded this way
        raise ValueError(f"fold_batchnorm needs a model that torch.fx can trace symbolically; "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was)


@torch.no_grad()
def select_fastest_paths(model: nn.Module, example_input: Tensor, batch_size: int = 1, repeats: int = 7,
                         inference: bool = True) -> dict[str, dict]:
    """Per factorized layer, keep the low-rank form or collapse it to dense, whichever is measured faster.

    For use after fine-tuning: at the user's batch size and the model's device, each factorized
    layer (as its two-layer inference form with ``inference``, see :func:`to_inference_form`) is
    timed against the dense layer with its product as weight, interleaved; the faster replaces it
    (same function either way). Returns ``{name: {'factored_ms', 'dense_ms', 'kept'}}``.
    """
    shapes, _ = _trace(model, example_input)
    like = example_input if example_input.is_floating_point() else torch.zeros(())
    out: dict[str, dict] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, FactorizedLayer) or name not in shapes:
            continue
        was = module.training
        low = (_pair(module) if inference else module).eval()
        dense = module.to_dense().eval()
        x = _timing_input(shapes[name], batch_size, like.to(module.U.device))
        f_ms, d_ms = measure_latency([lambda: low(x), lambda: dense(x)], x.device, repeats=repeats)
        keep = f_ms < d_ms
        out[name] = {"factored_ms": f_ms, "dense_ms": d_ms, "kept": keep}
        chosen = low if keep else dense
        if chosen is not module:
            _replace(model, module, chosen.train(was))
        else:
            module.train(was)
    return out
