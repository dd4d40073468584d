"""Export a (compressed) model and check the exported program against it (beyond the paper).

Formats: ``'torchscript'`` (``torch.jit.trace``, saved with ``torch.jit.save``), ``'export'``
(``torch.export`` with a dynamic batch dimension, saved as a ``.pt2`` archive) and ``'onnx'``
(``torch.onnx.export``; needs the ``onnx`` package, and ``onnxruntime`` to check the outputs).
Every file is written under a temporary name in its folder and renamed into place, so a failed
export never leaves a half-written file; the written file is loaded back and run on the example
input and on a second batch of another size, and its outputs must match the PyTorch model's.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["EXPORT_FORMATS", "ExportMismatchError", "atomic_path", "export_model"]

EXPORT_FORMATS = ("torchscript", "export", "onnx")

# the loggers of the ONNX exporter's graph passes: at INFO they report every pass ("Replaced initializer
# ...", "Removed 83 unused nodes", "Skipping constant folding ..."), which says nothing to the user
_ONNX_PASS_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


class ExportMismatchError(RuntimeError):
    """The exported program's outputs differ from the PyTorch model's beyond the tolerance."""


class atomic_path:
    """``with atomic_path(path) as tmp: write(tmp)``: ``tmp`` is renamed to ``path`` on success, removed on error."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        folder, base = os.path.split(os.path.abspath(self.path))
        self.tmp = os.path.join(folder, f".tmp-{os.getpid()}-{base}")  # keeps the suffix (.pt2, .onnx)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def _first_tensor(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise TypeError("the model's output must be a tensor (or a tuple/list/dict starting with one), "
                    f"got {type(out).__name__}")


def _check(name: str, ref: Tensor, got: Tensor, atol: float, rtol: float) -> float:
    got = got.to(ref.device, ref.dtype)
    if got.shape != ref.shape:
        raise ExportMismatchError(f"{name}: exported output shape {tuple(got.shape)} != model's {tuple(ref.shape)}")
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    if not torch.allclose(got, ref, atol=atol, rtol=rtol):
        raise ExportMismatchError(f"{name}: exported outputs differ from the model's by up to {diff:.3g} "
                                  f"(atol={atol:g}, rtol={rtol:g})")
    return diff


@contextlib.contextmanager
def _quiet_onnx_passes() -> Iterator[None]:
    """Raise the ONNX exporter's pass loggers to WARNING for the block (their warnings and errors still
    show), then restore their levels; the caller's logging setup is not touched otherwise."""
    loggers = [logging.getLogger(name) for name in _ONNX_PASS_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@torch.no_grad()
def export_model(
        model: nn.Module,
        example_input: Tensor,
        path: Union[str, os.PathLike],
        format: str = "torchscript",
        *,
        atol: float = 1e-4,
        rtol: float = 1e-4,
        check_batch: Optional[int] = None,
) -> dict:
    """Export ``model`` (in eval mode) to ``path`` and check the exported outputs against it.

    Args:
        model: the model; it is run in eval mode and its mode restored afterwards.
        example_input: a batch of inputs (a batch size >= 2 lets ``'export'`` keep the batch dimension dynamic).
        path: the output file.
        format: one of ``EXPORT_FORMATS``.
        atol, rtol: the output tolerance (``torch.allclose``).
        check_batch: batch size of the second check input; default ``example batch + 1``
            (a check that the exported program is not specialised to one batch size).

    Returns:
        ``{'format', 'path', 'max_abs_diff', 'checked_batches', 'note'}``.

    Raises:
        ValueError: a bad ``format``; ImportError: ONNX without ``onnx``; ExportMismatchError:
        the outputs differ (the file is still written, so it can be inspected).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise TypeError("example_input must be a batched tensor")
    path = os.fspath(path)
    batch = example_input.shape[0]
    second = torch.randn((check_batch or batch + 1, *example_input.shape[1:]),
                         generator=torch.Generator().manual_seed(0), dtype=example_input.dtype).to(example_input.device)
    if not example_input.is_floating_point():
        second = example_input[:1].expand(check_batch or batch + 1, *example_input.shape[1:]).clone()
    was_training = model.training
    model.eval()
    # a batch-1 example cannot mark the batch dimension dynamic (torch.export specialises sizes 0 and 1)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=max(4096, 2 * batch))},) if batch >= 2 else None
    try:
        refs = [_first_tensor(model(x)) for x in (example_input, second)]
        note = ""
        if format == "torchscript":
            with warnings.catch_warnings():  # TorchScript was asked for: its deprecation notices are noise here
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, (example_input,), check_trace=False)
                with atomic_path(path) as tmp:
                    torch.jit.save(traced, tmp)
                loaded = torch.jit.load(path, map_location=example_input.device)
            outs = [_first_tensor(loaded(x)) for x in (example_input, second)]
        elif format == "export":
            program = torch.export.export(model, (example_input,), dynamic_shapes=dynamic)
            with atomic_path(path) as tmp:
                torch.export.save(program, tmp)
            loaded = torch.export.load(path).module()
            xs = (example_input, second) if dynamic else (example_input,)
            if not dynamic:
                note = "batch size 1 example: the exported program is specialised to batch 1"
            outs = [_first_tensor(loaded(x)) for x in xs]
        else:
            if importlib.util.find_spec("onnx") is None:
                raise ImportError("format='onnx' needs the onnx package (pip install onnx onnxscript)")
            with atomic_path(path) as tmp, _quiet_onnx_passes():
                torch.onnx.export(model, (example_input,), tmp, input_names=["input"], output_names=["output"],
                                  dynamic_shapes=dynamic, external_data=False, verbose=False)
            import onnx
            onnx.checker.check_model(onnx.load(path))
            if importlib.util.find_spec("onnxruntime") is None:
                return {"format": format, "path": path, "max_abs_diff": None, "checked_batches": [],
                        "note": "onnx.checker passed; outputs not compared (onnxruntime not installed)"}
            import onnxruntime
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            xs = (example_input, second) if dynamic else (example_input,)
            if not dynamic:
                note = "batch size 1 example: the ONNX graph is specialised to batch 1"
            outs = [torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0]) for x in xs]
    finally:
        model.train(was_training)
    diffs = [_check(f"{format} batch {r.shape[0]}", r, o, atol, rtol) for r, o in zip(refs, outs)]
    return {"format": format, "path": path, "max_abs_diff": max(diffs),
            "checked_batches": [int(r.shape[0]) for r in refs[:len(outs)]], "note": note}
