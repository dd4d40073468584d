"""Deployment of a factorized model (beyond the paper; docs/method.md#post-training-compression):
latency measurement, per-layer choice of the faster path, the plain-torch inference form and
BatchNorm folding.

Nothing here changes what a model computes: each function replaces factorized layers by modules
computing the same function (their two plain layers, or the dense layer) or measures them.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .base import FactorizedLayer
from .embedding import FactorizedEmbedding
from .model import _trace_input_shapes

__all__ = ["compile_for_inference", "fold_batchnorm", "measure_latency", "select_fastest_paths", "to_inference_form"]


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
    """Wait for the work queued on ``device`` (a no-op on the CPU, whose calls return when done).

    Accelerators run kernels asynchronously: the clock is read only after this returns. The current
    accelerator (``torch.accelerator``) is synchronised through it; another device type through its
    torch module (``torch.cuda``, ``torch.xpu``, ``torch.mps``, ...).
    """
    if device.type in ("cpu", "meta"):
        return
    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if current is not None and current.type == device.type:
        torch.accelerator.synchronize(device)
        return
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if sync is None:
        raise ValueError(f"measure_latency cannot synchronise device {device}: torch.{device.type} has no "
                         "synchronize(), so its asynchronous work could not be timed")
    if device.type == "mps":
        sync()  # torch.mps.synchronize takes no device
    else:
        sync(device)


def measure_latency(fns: Sequence[Callable[[], object]], device: Union[str, torch.device] = "cpu",
                    repeats: int = 7, warmup: int = 2, inner: int = 1, grad: bool = False) -> list[float]:
    """Median wall time in milliseconds of each callable, timed interleaved (a, b, a, b, ...).

    Interleaving spreads background load (other processes on a shared machine) evenly over the
    candidates; the median discards the outliers it still causes.

    Args:
        fns: zero-argument callables to time.
        device: the device the calls run on: synchronised before the clock is read at the start and
            at the end of each timed round (any accelerator; nothing to wait for on the CPU).
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
                end = time.perf_counter()  # after the device finished the round's work
                if i >= warmup:
                    times[j].append((end - start) * 1e3 / inner)
    return [statistics.median(t) for t in times]


def _timing_input(shape: tuple, batch_size: int, like: Tensor) -> Tensor:
    return torch.randn((batch_size, *shape), device=like.device, dtype=like.dtype)


def to_inference_form(model: nn.Module) -> nn.Module:
    """Replace every factorized layer by its plain-torch ``inference_form()``, in place.

    Same function, same parameter count: ``FactorizedLinear`` / ``FactorizedConv2d`` become
    ``nn.Sequential`` of their two plain layers (a conv on its rebuilt-kernel path its dense conv),
    ``FactorizedEmbedding`` an ``nn.Embedding`` of rank r then an ``nn.Linear``. The weights are
    stored contiguous instead of being re-laid out from ``U``/``V`` on every call, and the model
    needs only torch to load and run (no ``fnl`` classes), which every exporter and runtime
    understands. Fine-tune (Frobenius decay needs the factors) before converting.

    Raises:
        ValueError: the model holds a layer without a plain-torch form (the tensor-format convs),
            naming every such layer; the model is then left unchanged.
    """
    if isinstance(model, FactorizedLayer):
        return model.inference_form()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    refused = [f"{name} ({type(m).__name__})" for name, m in layers if not m.has_inference_form]
    if refused:
        raise ValueError(f"to_inference_form: {', '.join(refused)} have no plain-torch form that keeps their "
                         "factorization (tensor-format cores); convert them first with fnl.collapse (dense convs) "
                         "or leave the model as it is; the model is unchanged")
    for _, module in layers:
        _replace(model, module, module.inference_form())
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


def compile_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                          **compile_kwargs) -> nn.Module:
    """A compiled inference copy of ``model``: the deployment path measured fastest on the CPU.

    On a copy in eval mode: every factorized layer becomes its two plain layers
    (:func:`to_inference_form`), BatchNorm is folded into the conv before it (:func:`fold_batchnorm`,
    with ``fold_bn``), the 4-d weights take the channels-last memory format (``channels_last``; the
    convs then run channels-last whatever the input's format) and the result goes through
    ``torch.compile`` (inductor by default), which fuses the element-wise ops between the convs.
    ``fnl_resnet20`` @0.111 on the CPU: see docs/speed.md#fastest-inference-fnlcompile_for_inference for the numbers.
    The first call compiles (seconds); later calls with the same input shape reuse the code.

    Args:
        model: the model (a factorized one or any other); it is not changed.
        fold_bn: fold BatchNorm into the preceding convs (needs a model ``torch.fx`` can trace).
        channels_last: put the copy's 4-d weights in the channels-last memory format.
        **compile_kwargs: passed on to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...).

    Returns:
        The compiled module (call it under ``torch.no_grad()`` or ``torch.inference_mode()``).

    Raises:
        ValueError: a layer without a plain-torch form (tensor-format convs), or with ``fold_bn`` a
            model ``torch.fx`` cannot trace (pass ``fold_bn=False``).
    """
    copy_ = to_inference_form(copy.deepcopy(model).eval())
    if fold_bn:
        copy_ = fold_batchnorm(copy_)
    if channels_last:
        copy_ = copy_.to(memory_format=torch.channels_last)
    return torch.compile(copy_, **compile_kwargs)


@torch.no_grad()
def select_fastest_paths(model: nn.Module, example_input: Tensor, batch_size: int = 1, repeats: int = 7,
                         inference: bool = True) -> dict[str, dict]:
    """Per factorized layer, keep the low-rank form or collapse it to dense, whichever is measured faster.

    For use after fine-tuning: at the user's batch size and the model's device, each factorized
    layer (as its plain-torch inference form with ``inference``, see :func:`to_inference_form`;
    the tensor-format convs, which have none, as themselves) is timed against the dense layer
    with its product as weight, interleaved; the faster replaces it (same function either way).
    Returns ``{name: {'factored_ms', 'dense_ms', 'kept'}}``.
    """
    shapes, _ = _trace(model, example_input)
    like = example_input if example_input.is_floating_point() else torch.zeros(())
    out: dict[str, dict] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, FactorizedLayer) or name not in shapes:
            continue
        was = module.training
        low = (module.inference_form() if inference and module.has_inference_form else module).eval()
        dense = module.to_dense().eval()
        x = _layer_input(module, shapes[name], batch_size, like)
        f_ms, d_ms = measure_latency([lambda: low(x), lambda: dense(x)], x.device, repeats=repeats)
        keep = _keeps_factorized(f_ms, d_ms)
        out[name] = {"factored_ms": f_ms, "dense_ms": d_ms, "kept": keep}
        chosen = low if keep else dense
        if chosen is not module:
            _replace(model, module, chosen.train(was))
        else:
            module.train(was)
    return out


def _keeps_factorized(factored_ms: float, dense_ms: float) -> bool:
    """The decision of ``select_fastest_paths``: the factorized form only when strictly faster."""
    return factored_ms < dense_ms


def _layer_input(module: FactorizedLayer, shape: tuple, batch_size: int, like: Tensor) -> Tensor:
    """A random batch of the layer's traced input shape on its device: indices for an embedding."""
    device = module.factor_parameters()[0].device
    if isinstance(module, FactorizedEmbedding):
        return torch.randint(0, module.num_embeddings, (batch_size, *shape), device=device)
    return _timing_input(shape, batch_size, like.to(device))
