"""``fnl-compress``: compress a trained model by factorizing its layers (beyond the paper).

Loads a model (a timm model name with a checkpoint file, or a ``torch.save``'d module), factorizes
it with :func:`fnl.compress` (SVD of the trained weights at a target parameter ratio, target
multiply-add ratio or per-layer energy threshold; ranks rounded to multiples of 8; stem,
classifier and layers that would not get cheaper kept dense, with the reason), optionally
fine-tunes it with Frobenius decay (the ``fd*`` optimizers of :mod:`fnl_timm.optim`), keeps each
factorized layer or collapses it to dense, whichever is measured faster at the given batch size,
and writes the compressed model (with ``--fold-bn``, BatchNorm folded into the convs), a report
(JSON, text table, PNG) and exports checked against the PyTorch model.

Examples::

    fnl-compress --model fnl_resnet20 --checkpoint output/run/model_best.pth.tar --dataset digits \\
        --target-ratio 0.3 --finetune-epochs 2 --output compressed/
    fnl-compress --model my_model.pt --input-size 3 224 224 --target-macs 0.5 --batch-size 32 \\
        --export torchscript export --output compressed/

Outputs in ``--output``: ``model.pt`` (the whole compressed module, ``torch.load(..., weights_only=False)``),
``compressed.pth`` (timm models: arch, kwargs, ranks and state dict; :func:`load_compressed`
rebuilds it, and ``fnl-train --initial-checkpoint compressed.pth --wd2fd`` fine-tunes it further
with Frobenius decay), ``report.json``, ``report.txt``, ``report.png`` and ``model.ts`` /
``model.pt2`` / ``model.onnx`` for ``--export``. The input files are only read.
"""
import argparse
import json
import logging
import math
import os
import pickle
import sys
import time
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

import timm
from timm.utils import ParseKwargs

import fnl
from fnl.export import EXPORT_FORMATS, atomic_path, export_model

from . import data as fnl_data
from ._serialization import allow_argparse_namespace
from .optim import FD_OPTIMIZERS, mark_factors

__all__ = ['build_parser', 'compress_file', 'compress_model', 'load_compressed', 'load_model', 'main', 'run']

_logger = logging.getLogger('fnl_compress')

_FINALIZE = ('fastest', 'inference', 'factorized', 'collapse')
_SUFFIX = {'torchscript': 'model.ts', 'export': 'model.pt2', 'onnx': 'model.onnx'}


# --- loading -------------------------------------------------------------------------------------
def _is_torchscript(path: str) -> bool:
    """TorchScript archives hold ``<name>/code/`` and ``<name>/constants.pkl``; ``torch.save`` ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def _torch_load(path: str, arg: str) -> Any:
    """``torch.load`` on the CPU, safe loading first; fnl-train / timm checkpoints also hold an argparse Namespace."""
    try:
        with allow_argparse_namespace():
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass  # a pickled module: needs the full unpickler (only for files you trust)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a torch file
        raise ValueError(f'{arg} {path!r} could not be read as a torch file ({type(e).__name__}: {e})') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'{arg} {path!r} could not be read as a torch file ({type(e).__name__}: {e})') from None


def _state_dict_of(obj: Any, path: str, arg: str = '--checkpoint') -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ('state_dict', 'model_state_dict', 'model'):  # the plain weights, not an EMA
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}
    raise ValueError(f'{arg} {path!r} holds no state dict (expected a dict of tensors, or one under '
                     f"'state_dict' / 'model'; got {type(obj).__name__})")


def load_model(
        model: str,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        random_init: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the model to compress.

    Args:
        model: a timm model name, or the path of a ``torch.save``'d ``nn.Module``.
        checkpoint: with a timm name, the weights: a state dict, a timm / fnl-train checkpoint, or
            a TorchScript file (its weights are read into the eager timm model).
        model_kwargs: keyword arguments of ``timm.create_model`` (``num_classes``, ``in_chans``, ...).
        random_init: allow a timm name without a checkpoint (timing runs only).

    Returns:
        (model in eval mode, provenance dict: 'arch', 'model_kwargs', 'source').
    """
    model_kwargs = dict(model_kwargs or {})
    looks_like_file = os.sep in model or model.endswith(('.pt', '.pth', '.ts', '.tar', '.pt2'))
    if not os.path.exists(model) and not timm.is_model(model) and looks_like_file:
        raise ValueError(f'--model {model!r}: no such file (and not a timm model name)')
    if os.path.exists(model):
        if not os.path.isfile(model):
            raise ValueError(f'--model {model!r} is a folder, not a file holding a module')
        if checkpoint is not None:
            raise ValueError('--checkpoint goes with a timm model name; --model is already a file holding a module')
        if _is_torchscript(model):
            raise ValueError(f'--model {model!r} is a TorchScript module: its graph is frozen and its layers cannot '
                             'be factorized. Give the timm name as --model and the TorchScript file as --checkpoint '
                             '(its weights are loaded into the eager model), or torch.save the eager module')
        obj = _torch_load(model, '--model')
        if not isinstance(obj, nn.Module):
            raise ValueError(f'--model {model!r} is not a saved nn.Module (it holds a {type(obj).__name__}); for a '
                             'state dict give the timm model name as --model and the file as --checkpoint')
        return obj.eval(), {'arch': None, 'model_kwargs': {}, 'source': os.path.abspath(model)}
    if not timm.is_model(model):
        raise ValueError(f'--model {model!r} is neither a timm model name nor an existing file '
                         f'(timm.list_models("*{model[:6]}*") lists similar names)')
    if checkpoint is None and not random_init:
        raise ValueError('--checkpoint is required with a timm model name (a compressed random model is '
                         'meaningless; pass --random-init for timing only)')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f'--checkpoint {checkpoint!r}: no such file')
    net = timm.create_model(model, **model_kwargs)
    if checkpoint is not None:
        if _is_torchscript(checkpoint):
            try:
                state = torch.jit.load(checkpoint, map_location='cpu').state_dict()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f'--checkpoint {checkpoint!r} could not be read as TorchScript '
                                 f'({type(e).__name__}: {e})') from None
        else:
            state = _state_dict_of(_torch_load(checkpoint, '--checkpoint'), checkpoint)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f'--checkpoint {checkpoint!r} does not fit --model {model!r} with model kwargs '
                             f'{model_kwargs}: {str(e).splitlines()[0]} ... (check --num-classes / '
                             f'--model-kwargs)\n{e}') from None
    return net.eval(), {'arch': model, 'model_kwargs': model_kwargs,
                        'source': None if checkpoint is None else os.path.abspath(checkpoint)}


def is_compressed_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is an fnl-compress ``compressed.pth`` (arch, model kwargs, ranks, state dict)."""
    return isinstance(obj, dict) and all(k in obj for k in ('arch', 'model_kwargs', 'ranks', 'state_dict'))


def load_compressed(path: Union[str, Dict[str, Any]], device: str = 'cpu') -> nn.Module:
    """Rebuild a compressed timm model from ``compressed.pth`` (arch + kwargs + ranks + state dict).

    ``path`` may also be the already loaded checkpoint dict.
    """
    if isinstance(path, dict):
        ckpt, path = path, '<dict>'
    else:
        if not os.path.isfile(path):
            raise ValueError(f'path {path!r}: no such file')
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if not is_compressed_checkpoint(ckpt):
        raise ValueError(f'path {path!r} is not an fnl-compress checkpoint (no arch / ranks)')
    net = timm.create_model(ckpt['arch'], **ckpt['model_kwargs'])
    fnl.apply_ranks(net, ckpt['ranks'])
    if ckpt.get('form') == 'inference':  # two plain layers per factorized one
        fnl.to_inference_form(net)
    # layers collapsed after fine-tuning are not in 'ranks': they stay dense
    net.load_state_dict(ckpt['state_dict'])
    mark_factors(net)
    return net.to(device).eval()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --- evaluation, fine-tuning, latency ------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, max_batches: Optional[int] = None) -> float:
    """Top-1 accuracy (%) over the loader (or its first ``max_batches``)."""
    was = model.training
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(-1) == y).sum())
        total += y.numel()
    model.train(was)
    return 100.0 * correct / max(total, 1)


def finetune(model: nn.Module, loader: DataLoader, device: torch.device, epochs: int, opt: str = 'fdmomentum',
             lr: float = 0.01, weight_decay: float = 1e-4, momentum: float = 0.9,
             max_steps: Optional[int] = None) -> Dict[str, Any]:
    """Short fine-tune with Frobenius decay on the factors (coefficient = ``weight_decay``), cosine lr."""
    if opt not in FD_OPTIMIZERS:
        raise ValueError(f'--opt must be one of {FD_OPTIMIZERS} (Frobenius decay on the factors), got {opt!r}')
    mark_factors(model)
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if opt in ('fdsgd', 'fdmomentum'):
        kwargs['momentum'] = momentum
    optimizer = timm.optim.create_optimizer_v2(model, opt, **kwargs)
    steps = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    while step < steps:
        for x, y in loader:
            if step >= steps:
                break
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
    model.eval()
    return {'steps': step, 'epochs': epochs, 'opt': opt, 'lr': lr, 'fd_coef': weight_decay,
            'first_loss': losses[0] if losses else None, 'last_loss': losses[-1] if losses else None,
            'seconds': time.perf_counter() - start}


def measure_models(models: Sequence[nn.Module], input_size: Sequence[int], batch_size: int, device: torch.device,
                   repeats: int = 15, channels_last: bool = False) -> List[float]:
    """Median latency (ms) of each model on one random batch, timed interleaved (with ``channels_last``,
    models and input in the channels-last memory format; the models are restored afterwards)."""
    x = torch.randn((batch_size, *input_size), device=device)
    if channels_last and x.dim() != 4:
        raise ValueError(f'--channels-last needs image inputs (C, H, W), got input size {tuple(input_size)}')
    fmt = torch.channels_last if channels_last else None
    for m in models:
        m.eval()
        if fmt is not None:
            m.to(memory_format=fmt)
    try:
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        return fnl.measure_latency([lambda m=m: m(x) for m in models], device, repeats=repeats, warmup=3)
    finally:
        if fmt is not None:
            for m in models:
                m.to(memory_format=torch.contiguous_format)


# --- the pipeline --------------------------------------------------------------------------------
def compress_model(
        model: nn.Module,
        *,
        input_size: Sequence[int],
        target_ratio: Optional[float] = None,
        target_macs: Optional[float] = None,
        energy: Optional[float] = None,
        allocation: str = 'energy',
        rank_multiple: int = 8,
        exclude: Optional[Sequence[str]] = None,
        keep_stem: bool = True,
        keep_classifier: bool = True,
        measure: bool = False,
        batch_size: int = 1,
        device: str = 'cpu',
        train_loader: Optional[DataLoader] = None,
        val_loader: Optional[DataLoader] = None,
        eval_batches: Optional[int] = None,
        finetune_epochs: int = 0,
        finetune_steps: Optional[int] = None,
        opt: str = 'fdmomentum',
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        finalize: str = 'fastest',
        latency: bool = True,
        latency_repeats: int = 15,
        channels_last: bool = False,
) -> Tuple[nn.Module, fnl.CompressionReport]:
    """Compress ``model`` (its weights are not modified; it is moved to ``device``); evaluate, fine-tune,
    choose paths and time it.

    The report's ``extra`` gets: ``accuracy`` (original / compressed / finetuned), ``finetune``,
    ``paths`` (per-layer measured factored vs collapsed, with ``finalize='fastest'``) and ``latency``
    (original and compressed ms at ``batch_size`` on ``device``, speedup, MAC ratio).
    """
    if finalize not in _FINALIZE:
        raise ValueError(f'--finalize must be one of {_FINALIZE}, got {finalize!r}')
    if finetune_epochs and train_loader is None:
        raise ValueError('--finetune-epochs needs a dataset (--dataset) to train on')
    dev = torch.device(device)
    model = model.to(dev).eval()
    try:
        compressed, report = fnl.compress(
            model, target_ratio=target_ratio, target_macs=target_macs, energy=energy, input_size=tuple(input_size),
            allocation=allocation, rank_multiple=rank_multiple, exclude=list(exclude) if exclude else None,
            keep_stem=keep_stem, keep_classifier=keep_classifier, measure=measure, batch_size=batch_size)
    except ValueError as e:
        flag = next((f for f, v in (('target-ratio', target_ratio), ('target-macs', target_macs),
                                    ('energy', energy)) if v is not None), 'target')
        raise ValueError(f'--{flag}: {e}') from None
    mark_factors(compressed)
    acc: Dict[str, Optional[float]] = {}
    if val_loader is not None:
        acc['original'] = evaluate(model, val_loader, dev, eval_batches)
        acc['compressed'] = evaluate(compressed, val_loader, dev, eval_batches)
    if finetune_epochs:
        report.extra['finetune'] = finetune(compressed, train_loader, dev, finetune_epochs, opt, lr, weight_decay,
                                            max_steps=finetune_steps)
        if val_loader is not None:
            acc['finetuned'] = evaluate(compressed, val_loader, dev, eval_batches)
    report.extra['accuracy'] = acc
    collapsed: List[str] = []
    if finalize == 'fastest':
        example = torch.zeros((1, *input_size), device=dev)
        paths = fnl.select_fastest_paths(compressed, example, batch_size=batch_size, repeats=7, inference=True)
        report.extra['paths'] = paths
        collapsed = [n for n, p in paths.items() if not p['kept']]
    elif finalize == 'inference':
        fnl.to_inference_form(compressed)
    elif finalize == 'collapse':
        collapsed = [n for n, m in compressed.named_modules() if isinstance(m, fnl.FactorizedLayer)]
        fnl.collapse(compressed)
    report.extra['collapsed'] = collapsed
    report.extra['form'] = 'factorized' if finalize == 'factorized' else 'inference'
    _update_counts(report, compressed, collapsed, batch_size)
    if latency:
        report.extra['latency'] = latency_report(model, compressed, report, input_size, batch_size, dev,
                                                 latency_repeats, channels_last)
    return compressed.eval(), report


def latency_report(original: nn.Module, compressed: nn.Module, report: fnl.CompressionReport,
                   input_size: Sequence[int], batch_size: int, device: torch.device, repeats: int,
                   channels_last: bool = False, batchnorm_folded: bool = False) -> Dict[str, Any]:
    """Time both models side by side (:func:`measure_models`) and describe the setting; warns when the
    compressed model measured slower."""
    orig_ms, comp_ms = measure_models([original, compressed], input_size, batch_size, device, repeats,
                                      channels_last)
    if comp_ms > orig_ms:
        _logger.warning('the compressed model measured slower than the original (%.3f ms vs %.3f ms at batch '
                        '%d on %s): use --finalize fastest (and --measure) at this batch size, or a busy machine '
                        'disturbed the timing', comp_ms, orig_ms, batch_size, device)
    return {'batch_size': batch_size, 'device': str(device), 'original_ms': orig_ms,
            'memory_format': 'channels_last' if channels_last else 'contiguous',
            'cpu_allocations': 'cached' if fnl.cpu_allocations_cached() else 'default',
            'batchnorm_folded': batchnorm_folded,
            'compressed_ms': comp_ms, 'speedup': orig_ms / comp_ms,
            'mac_speedup': 1 / report.macs_ratio, 'repeats': repeats,
            'cpu_threads': torch.get_num_threads(), 'load_avg': _load_avg()}


def _update_counts(report: fnl.CompressionReport, model: nn.Module, collapsed: Sequence[str],
                   batch_size: int) -> None:
    """Collapsed layers cost their dense size again: fix their rows and the totals."""
    paths = report.extra.get('paths', {})
    for d in report.layers:
        if d.name in collapsed:
            d.params, d.macs = d.dense_params, d.dense_macs
            if d.name in paths:
                t = paths[d.name]
                d.reason = (f'rank {d.rank} collapsed to one dense layer: measured {t["dense_ms"]:.3f} ms dense vs '
                            f'{t["factored_ms"]:.3f} ms factorized at batch {batch_size}')
            else:
                d.reason = f'rank {d.rank} collapsed to one dense layer (--finalize collapse)'
            d.decision = 'collapsed'
    report.params = sum(p.numel() for p in model.parameters())
    report.macs = sum(d.macs or 0 for d in report.layers)


def _load_avg() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# --- outputs -------------------------------------------------------------------------------------
def plot_report(report: fnl.CompressionReport, path: str) -> None:
    """PNG: per-layer multiply-adds and parameters (original vs compressed) and ranks, with totals."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = report.layers
    idx = list(range(len(rows)))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.22 * len(rows) + 4), 10), sharex=True)
    w = 0.4
    for ax, key, label in ((axes[0], 'macs', 'multiply-adds / sample'), (axes[1], 'params', 'parameters')):
        dense = [getattr(d, f'dense_{key}') or 0 for d in rows]
        comp = [getattr(d, key) or 0 for d in rows]
        ax.bar([i - w / 2 for i in idx], dense, w, label='original', color='0.65')
        ax.bar([i + w / 2 for i in idx], comp, w, label='compressed', color='tab:blue')
        ax.set_ylabel(label)
        ax.set_yscale('log')
        ax.legend(loc='upper left', fontsize=8)
    ranks = [(d.rank or 0) / d.full_rank if d.full_rank and d.decision != 'dense' else 0 for d in rows]
    colors = ['tab:blue' if d.decision == 'factorized' else 'tab:orange' if d.decision == 'collapsed' else '0.8'
              for d in rows]
    axes[2].bar(idx, [r if r else 1.0 for r in ranks], color=colors)
    axes[2].set_ylabel('rank / full rank\n(blue: factorized, orange: collapsed,\ngrey: kept dense)')
    axes[2].set_xticks(idx)
    axes[2].set_xticklabels([d.name for d in rows], rotation=90, fontsize=6)
    lat = report.extra.get('latency')
    acc = report.extra.get('accuracy') or {}
    title = f'params x{report.param_ratio:.3f}, MACs x{report.macs_ratio:.3f}'
    if lat:
        title += (f'\nlatency {lat["original_ms"]:.2f} -> {lat["compressed_ms"]:.2f} ms '
                  f'(batch {lat["batch_size"]}, {lat["device"]}, {_latency_setting(lat)}: x{lat["speedup"]:.2f})')
    if acc:
        title += '\ntop-1 ' + ', '.join(f'{k} {v:.1f}%' for k, v in acc.items() if v is not None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)


def _write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)


def write_outputs(out_dir: str, compressed: nn.Module, report: fnl.CompressionReport, provenance: Dict[str, Any],
                  input_size: Sequence[int], exports: Sequence[str] = (), export_batch: int = 2,
                  inputs: Sequence[Optional[str]] = (), deploy: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Write the model, the report and the exports into ``out_dir`` (each file atomically).

    ``deploy`` (e.g. with BatchNorm folded) replaces ``compressed`` in ``model.pt`` and the exports;
    ``compressed.pth`` always holds ``compressed``'s layers, which ``load_compressed`` rebuilds."""
    targets = {'model': 'model.pt', 'report_json': 'report.json', 'report_txt': 'report.txt', 'plot': 'report.png',
               **({'checkpoint': 'compressed.pth'} if provenance.get('arch') else {}),
               **{f'export_{f}': _SUFFIX[f] for f in exports}}
    paths = {k: os.path.join(out_dir, v) for k, v in targets.items()}
    _check_no_overwrite(out_dir, inputs, paths.values())
    os.makedirs(out_dir, exist_ok=True)
    compressed = compressed.cpu().eval()
    deploy = compressed if deploy is None else deploy.cpu().eval()
    with atomic_path(paths['model']) as tmp:
        torch.save(deploy, tmp)
    if 'checkpoint' in paths:
        ckpt = {'arch': provenance['arch'], 'model_kwargs': provenance['model_kwargs'], 'ranks': report.ranks,
                'collapsed': list(report.extra.get('collapsed', [])), 'form': report.extra.get('form', 'factorized'),
                'state_dict': compressed.state_dict(),
                'source': provenance.get('source')}
        with atomic_path(paths['checkpoint']) as tmp:
            torch.save(ckpt, tmp)
    example = torch.randn((export_batch, *input_size), generator=torch.Generator().manual_seed(0))
    export_results = {}
    for f in exports:
        export_results[f] = export_model(deploy, example, paths[f'export_{f}'], f)
    report.extra['exports'] = export_results
    report.extra['provenance'] = provenance
    report.extra['outputs'] = paths
    _write_text(paths['report_json'], json.dumps(_jsonable(report.to_dict()), indent=2))
    _write_text(paths['report_txt'], _text_report(report))
    plot_report(report, paths['plot'])
    return paths


def _check_no_overwrite(out_dir: str, inputs: Sequence[Optional[str]], outputs: Sequence[str]) -> None:
    protected = {os.path.realpath(p) for p in inputs if p}
    for p in outputs:
        if os.path.realpath(p) in protected:
            raise ValueError(f'--output {out_dir!r} would overwrite the input file {p!r}; choose another folder')


_ALL_OUTPUTS = ('model.pt', 'compressed.pth', 'report.json', 'report.txt', 'report.png', *_SUFFIX.values())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _latency_setting(lat: Dict[str, Any]) -> str:
    """How the latency was measured: memory format, BatchNorm folding, CPU allocator."""
    setting = lat.get('memory_format', 'contiguous')
    if lat.get('batchnorm_folded'):
        setting += ', BatchNorm folded in both models'
    if lat['device'].startswith('cpu'):
        setting += f', {lat.get("cpu_allocations", "default")} CPU allocations'
    return setting


def _text_report(report: fnl.CompressionReport) -> str:
    lines = [str(report), '']
    acc = report.extra.get('accuracy') or {}
    if acc:
        lines.append('top-1 accuracy: ' + ', '.join(f'{k} {v:.2f}%' for k, v in acc.items() if v is not None))
    ft = report.extra.get('finetune')
    if ft:
        lines.append(f'fine-tune: {ft["steps"]} steps of {ft["opt"]} (lr {ft["lr"]:g}, FD coefficient '
                     f'{ft["fd_coef"]:g}), loss {ft["first_loss"]:.4f} -> {ft["last_loss"]:.4f}')
    if report.extra.get('collapsed'):
        lines.append(f'collapsed to dense (measured faster): {", ".join(report.extra["collapsed"])}')
    lat = report.extra.get('latency')
    if lat:
        lines.append(f'latency at batch {lat["batch_size"]} on {lat["device"]} ({_latency_setting(lat)}): original '
                     f'{lat["original_ms"]:.3f} ms, compressed {lat["compressed_ms"]:.3f} ms, speedup '
                     f'x{lat["speedup"]:.2f} (multiply-add speedup x{lat["mac_speedup"]:.2f}; load average '
                     f'{lat["load_avg"]})')
    for f, r in (report.extra.get('exports') or {}).items():
        diff = '-' if r['max_abs_diff'] is None else f'{r["max_abs_diff"]:.3g}'
        lines.append(f'export {f}: {r["path"]} (max |diff| {diff} on batches {r["checked_batches"]}) {r["note"]}')
    return '\n'.join(lines) + '\n'


# --- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='fnl-compress', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', required=True,
                   help="a timm model name, or a torch.save'd nn.Module file (unpickled: only files you trust)")
    g.add_argument('--checkpoint', default=None,
                   help='weights for a timm name: state dict, timm/fnl-train checkpoint, or TorchScript file')
    g.add_argument('--num-classes', type=int, default=None, help='default: the dataset\'s, else the model\'s')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='timm.create_model kwargs k=v')
    g.add_argument('--random-init', action='store_true', help='allow a timm name without --checkpoint (timing)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='one sample\'s shape; default: the dataset\'s, else the model\'s pretrained_cfg')

    g = p.add_argument_group('compression (exactly one of --target-ratio / --target-macs / --energy)')
    g.add_argument('--target-ratio', type=float, default=None, help='parameter ratio compressed / original')
    g.add_argument('--target-macs', type=float, default=None, help='multiply-add ratio compressed / original')
    g.add_argument('--energy', type=float, default=None, help='fraction of spectral energy kept in every layer')
    g.add_argument('--allocation', default='energy', choices=('energy', 'uniform'),
                   help='energy: equal kept-energy fraction per layer; uniform: the paper\'s global rank_scale')
    g.add_argument('--rank-multiple', type=int, default=8, help='round ranks up to a multiple of this (1 = off)')
    g.add_argument('--exclude', nargs='*', default=None, help='fnmatch patterns of layers to keep dense')
    g.add_argument('--factorize-stem', action='store_true', help='also factorize the first layer')
    g.add_argument('--factorize-classifier', action='store_true', help='also factorize the last layer')
    g.add_argument('--measure', action='store_true',
                   help='time each layer factorized vs dense at --batch-size and keep dense the slower ones')

    g = p.add_argument_group('data, fine-tuning and latency')
    g.add_argument('--dataset', default=None, choices=fnl_data.DATASETS, help='for accuracy and fine-tuning')
    g.add_argument('--data-dir', default=None)
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--eval-batches', type=int, default=None, help='limit the validation batches')
    g.add_argument('--finetune-epochs', type=int, default=0, help='FD fine-tuning epochs (0 = none)')
    g.add_argument('--finetune-steps', type=int, default=None, help='cap on fine-tuning steps')
    g.add_argument('--finetune-batch-size', type=int, default=64)
    g.add_argument('--opt', default='fdmomentum', choices=FD_OPTIMIZERS)
    g.add_argument('--lr', type=float, default=0.01)
    g.add_argument('--weight-decay', type=float, default=1e-4, help='= the Frobenius-decay coefficient')
    g.add_argument('--finalize', default='fastest', choices=_FINALIZE,
                   help='fastest: per layer, two plain layers (low rank) or one collapsed dense layer, whichever is '
                        'measured faster at --batch-size; inference: two plain layers everywhere; factorized: keep '
                        'fnl layers (to train further with FD); collapse: all dense')
    g.add_argument('-b', '--batch-size', type=int, default=1, help='batch size of the latency measurements')
    g.add_argument('--device', default='cpu')
    g.add_argument('--latency-repeats', type=int, default=15)
    g.add_argument('--no-latency', action='store_true')
    g.add_argument('--fold-bn', action='store_true',
                   help='fold each BatchNorm into the conv before it (torch.fx) in model.pt and the exports, and '
                        'time both models folded; compressed.pth keeps the unfolded layers for fine-tuning')
    g.add_argument('--channels-last', action='store_true',
                   help='time both models in the channels-last memory format (usually faster on CPU)')
    g.add_argument('--cache-allocations', action='store_true',
                   help='CPU: keep freed memory in the process for reuse while timing (fnl.cache_cpu_allocations; '
                        'as jemalloc / tcmalloc do); glibc\'s default maps large activations afresh on every call')
    g.add_argument('--seed', type=int, default=0)

    g = p.add_argument_group('outputs')
    g.add_argument('--output', required=True, help='output folder (created; input files are never written)')
    g.add_argument('--export', nargs='*', default=[], choices=EXPORT_FORMATS,
                   help='also export, checked against the PyTorch model (onnx needs the onnx package)')
    return p


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f'{name} must be >= 1, got {value}')


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one compression job; returns the report as a dict (also written to ``report.json``)."""
    given = [n for n in ('target_ratio', 'target_macs', 'energy') if getattr(args, n) is not None]
    if len(given) != 1:
        raise ValueError('give exactly one of --target-ratio, --target-macs or --energy'
                         + (f' (got {", ".join("--" + n.replace("_", "-") for n in given)})' if given else ''))
    for n in ('batch_size', 'rank_multiple', 'latency_repeats', 'finetune_batch_size', 'eval_batches',
              'finetune_steps', 'num_classes'):
        _positive('--' + n.replace('_', '-'), getattr(args, n))
    if args.finetune_epochs < 0:
        raise ValueError(f'--finetune-epochs must be >= 0, got {args.finetune_epochs}')
    if args.fold_bn and args.finalize == 'factorized':
        raise ValueError('--fold-bn needs plain layers: --finalize factorized keeps fnl layers (use fastest, '
                         'inference or collapse)')
    if args.no_latency and args.channels_last:
        raise ValueError('--channels-last sets how the latency is measured; it does nothing with --no-latency')
    if args.no_latency and args.cache_allocations and args.finalize != 'fastest' and not args.measure:
        raise ValueError('--cache-allocations affects timing only (the latency report, --finalize fastest, '
                         '--measure); it does nothing here with --no-latency')
    if args.cache_allocations:
        if torch.device(args.device).type != 'cpu':
            raise ValueError(f'--cache-allocations is a CPU setting; --device is {args.device!r}')
        fnl.cache_cpu_allocations()  # before anything is timed (also the per-layer path choice)
    if 'onnx' in args.export:
        import importlib.util
        if importlib.util.find_spec('onnx') is None:
            raise ValueError('--export onnx needs the onnx package (pip install onnx onnxscript onnxruntime)')
    torch.manual_seed(args.seed)
    inputs = [args.model if os.path.isfile(args.model) else None, args.checkpoint]
    _check_no_overwrite(args.output, inputs, [os.path.join(args.output, n) for n in _ALL_OUTPUTS])
    train_loader = val_loader = None
    kwargs = dict(args.model_kwargs)
    input_size = args.input_size
    if args.dataset is not None:
        train_ds, val_ds, info = fnl_data.create_datasets(args.dataset, args.data_dir, args.img_size)
        kwargs.setdefault('num_classes', info.num_classes)
        input_size = input_size or info.input_size
        val_loader = DataLoader(val_ds, batch_size=256, shuffle=False, num_workers=0)
        train_loader = DataLoader(train_ds, batch_size=args.finetune_batch_size, shuffle=True, num_workers=0,
                                  drop_last=True)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    before = _fingerprints(inputs)
    model, provenance = load_model(args.model, args.checkpoint, kwargs, args.random_init)
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
        if 'input_size' not in cfg:
            raise ValueError('--input-size is needed: the model has no pretrained_cfg input_size and no --dataset')
        input_size = cfg['input_size']
    if args.dataset is not None and args.input_size is not None and tuple(args.input_size) != tuple(info.input_size):
        raise ValueError(f'--input-size {" ".join(map(str, args.input_size))} differs from the --dataset '
                         f'{args.dataset} images ({" ".join(map(str, info.input_size))}); leave --input-size out '
                         f'(with --dataset it is the dataset\'s) or set --img-size')
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size)))
    except RuntimeError as e:
        raise ValueError(f'--input-size {" ".join(map(str, input_size))} does not fit --model {args.model!r}: '
                         f'{str(e).splitlines()[0]}') from None
    compressed, report = compress_model(
        model, input_size=input_size, target_ratio=args.target_ratio, target_macs=args.target_macs,
        energy=args.energy, allocation=args.allocation, rank_multiple=args.rank_multiple, exclude=args.exclude,
        keep_stem=not args.factorize_stem, keep_classifier=not args.factorize_classifier, measure=args.measure,
        batch_size=args.batch_size, device=args.device, train_loader=train_loader, val_loader=val_loader,
        eval_batches=args.eval_batches, finetune_epochs=args.finetune_epochs, finetune_steps=args.finetune_steps,
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, finalize=args.finalize,
        latency=not args.no_latency and not args.fold_bn, latency_repeats=args.latency_repeats,
        channels_last=args.channels_last)
    deploy = None
    if args.fold_bn:
        try:
            deploy = fnl.fold_batchnorm(compressed)
            original = fnl.fold_batchnorm(model) if not args.no_latency else None
        except ValueError as e:
            raise ValueError(f'--fold-bn: {e}') from None
        report.extra['batchnorm_folded'] = True
        if original is not None:
            report.extra['latency'] = latency_report(original, deploy, report, input_size, args.batch_size,
                                                     torch.device(args.device), args.latency_repeats,
                                                     args.channels_last, batchnorm_folded=True)
    write_outputs(args.output, compressed, report, provenance, input_size, args.export, inputs=inputs,
                  deploy=deploy)
    if _fingerprints(inputs) != before:  # a guard: nothing here writes the inputs
        raise RuntimeError(f'an input file changed during the run: {inputs}')
    _logger.info('%s', _text_report(report))
    return _jsonable(report.to_dict())


def compress_file(model: str, output: str, checkpoint: Optional[str] = None, **options: Any) -> Dict[str, Any]:
    """The Python form of ``fnl-compress``: keyword options named like the flags (``target_ratio=0.3``,
    ``dataset='digits'``, ``finetune_epochs=1``, ``export=['torchscript']``, ...); returns the report dict."""
    args = build_parser().parse_args(['--model', model, '--output', output])
    args.checkpoint = checkpoint
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f'compress_file() got an unknown option {key!r} (see fnl-compress --help)')
        setattr(args, key, value)
    return run(args)


def _fingerprints(paths: Sequence[Optional[str]]) -> List[Optional[Tuple[int, int]]]:
    out = []
    for p in paths:
        if p and os.path.isfile(p):
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        else:
            out.append(None)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: 0 on success; bad arguments or inputs exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        run(args)
    except ValueError as e:
        parser.exit(2, f'fnl-compress: error: {e}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
