"""The ``fnl-compress`` pipeline: factorize with :func:`fnl.compress`, evaluate, fine-tune with
Frobenius decay, choose each layer's form (factorized, two plain layers or collapsed) and time the
result against the original.
"""
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

import timm

import fnl

from .optim import FD_OPTIMIZERS, mark_factors

__all__ = ['compress_model', 'evaluate', 'finetune', 'latency_report', 'measure_models']

_logger = logging.getLogger('fnl_compress')

FINALIZE = ('fastest', 'inference', 'factorized', 'collapse')


# --- evaluation, fine-tuning, latency ------------------------------------------------------------
def _use_bar(progress: Optional[bool]) -> bool:
    """A tqdm bar when asked (``True``), or, with ``None``, when the log goes to a terminal (as fnl-train)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, max_batches: Optional[int] = None,
             progress: Optional[bool] = False, desc: str = 'evaluate') -> float:
    """Top-1 accuracy (%) over the loader (or its first ``max_batches``).

    With ``progress`` (``None``: when stderr is a terminal) a tqdm bar named ``desc`` counts the batches.
    The correct predictions are summed on the device: one host sync at the end.
    """
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = None
    if _use_bar(progress):
        from tqdm import tqdm
        bar = tqdm(total=n, desc=desc, leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(-1) == y).sum()
        total += y.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was)
    return 100.0 * int(correct) / max(total, 1)


def finetune(model: nn.Module, loader: DataLoader, device: torch.device, epochs: int, opt: str = 'fdmomentum',
             lr: float = 0.01, weight_decay: float = 1e-4, momentum: float = 0.9,
             max_steps: Optional[int] = None, progress: Optional[bool] = None,
             log_interval: int = 50) -> Dict[str, Any]:
    """Short fine-tune with Frobenius decay on the factors (coefficient = ``weight_decay``), cosine lr.

    Progress: a tqdm bar over the steps (``progress=True``, or ``None`` when stderr is a terminal), its
    loss shown every ``log_interval`` steps; otherwise a log line every ``log_interval`` steps and at the
    end, as fnl-train's (``Fine-tune: [ 20/100 ( 20%)]  loss <this step's> (<mean so far>)  lr ...``).
    The losses are summed on the device: the host reads them once per ``log_interval`` steps and at
    the end, never on the other steps.

    Returns:
        ``steps``, ``epochs``, ``opt``, ``lr``, ``fd_coef``, ``first_loss`` / ``last_loss`` (the first
        and last step's), ``mean_loss`` (over all steps) and ``seconds``.
    """
    if opt not in FD_OPTIMIZERS:
        raise ValueError(f'--opt must be one of {FD_OPTIMIZERS} (Frobenius decay on the factors), got {opt!r}')
    if log_interval < 1:
        raise ValueError(f'--log-interval must be >= 1, got {log_interval}')
    mark_factors(model)
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if opt in ('fdsgd', 'fdmomentum'):
        kwargs['momentum'] = momentum
    optimizer = timm.optim.create_optimizer_v2(model, opt, **kwargs)
    steps = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    bar = None
    if _use_bar(progress) and steps:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc='fine-tune', leave=False, dynamic_ncols=True)
    model.train()
    width = len(str(steps))
    step, start = 0, time.perf_counter()
    loss_sum = torch.zeros((), device=device)  # on the device: no host sync per step
    first_loss = last_loss = None
    while step < steps:
        for x, y in loader:
            if step >= steps:
                break
            x, y = x.to(device), y.to(device)
            lr_now = optimizer.param_groups[0]['lr']  # the lr this step trains with
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            last_loss = loss.detach()
            if first_loss is None:
                first_loss = last_loss.clone()
            loss_sum += last_loss
            step += 1
            if bar is not None:
                bar.update(1)
            if step % log_interval == 0 or step == steps:
                now, mean = torch.stack([last_loss, loss_sum]).tolist()  # the one host read per interval
                mean /= step
                if bar is not None:
                    bar.set_postfix(loss=f'{mean:.4f}', lr=f'{lr_now:.4g}')
                else:
                    _logger.info(f'Fine-tune: [{step:>{width}d}/{steps} ({100 * step / steps:>3.0f}%)]  '
                                 f'loss {now:.4f} ({mean:.4f})  lr {lr_now:.4g}')
    if bar is not None:
        bar.close()
    model.eval()
    return {'steps': step, 'epochs': epochs, 'opt': opt, 'lr': lr, 'fd_coef': weight_decay,
            'first_loss': None if first_loss is None else float(first_loss),
            'last_loss': None if last_loss is None else float(last_loss),
            'mean_loss': float(loss_sum) / step if step else None,
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
        progress: Optional[bool] = None,
        log_interval: int = 50,
) -> Tuple[nn.Module, fnl.CompressionReport]:
    """Compress ``model`` (its weights are not modified; it is moved to ``device``); evaluate, fine-tune,
    choose paths and time it.

    Each stage is logged (logger ``fnl_compress``) as it starts and when it ends; ``progress`` and
    ``log_interval`` set how the evaluation and the fine-tuning show their progress (:func:`finetune`).

    The report's ``extra`` gets: ``accuracy`` (original / compressed / finetuned), ``finetune``,
    ``paths`` (per-layer measured factored vs collapsed, with ``finalize='fastest'``) and ``latency``
    (original and compressed ms at ``batch_size`` on ``device``, speedup, MAC ratio).
    """
    if finalize not in FINALIZE:
        raise ValueError(f'--finalize must be one of {FINALIZE}, got {finalize!r}')
    if finetune_epochs and train_loader is None:
        raise ValueError('--finetune-epochs needs a dataset (--dataset) to train on')
    dev = torch.device(device)
    model = model.to(dev).eval()
    target = next(f'{flag} {v:g}' for flag, v in (('target ratio', target_ratio), ('target MACs', target_macs),
                                                 ('energy', energy), ('target', 0.0)) if v is not None)
    _logger.info(f'factorize: SVD of the trained weights to {target} ({allocation} allocation, ranks in '
                 f'multiples of {rank_multiple}' + (', measuring each layer' if measure else '') + ') ...')
    t = time.perf_counter()
    try:
        compressed, report = fnl.compress(
            model, target_ratio=target_ratio, target_macs=target_macs, energy=energy, input_size=tuple(input_size),
            allocation=allocation, rank_multiple=rank_multiple, exclude=list(exclude) if exclude else None,
            keep_stem=keep_stem, keep_classifier=keep_classifier, measure=measure, batch_size=batch_size)
    except ValueError as e:
        flag = next((f for f, v in (('target-ratio', target_ratio), ('target-macs', target_macs),
                                    ('energy', energy)) if v is not None), 'target')
        raise ValueError(f'--{flag}: {e}') from None
    n_fact = sum(d.decision == 'factorized' for d in report.layers)
    _logger.info(f'factorize: {n_fact} of {len(report.layers)} layers factorized, params x{report.param_ratio:.3f}, '
                 f'MACs x{report.macs_ratio:.3f} ({time.perf_counter() - t:.1f} s)')
    mark_factors(compressed)
    acc: Dict[str, Optional[float]] = {}

    def _evaluate(name: str, net: nn.Module) -> None:
        _logger.info(f'evaluate: {name} model ...')
        t = time.perf_counter()
        acc[name] = evaluate(net, val_loader, dev, eval_batches, progress=progress, desc=f'evaluate {name}')
        _logger.info(f'evaluate: {name} model top-1 {acc[name]:.2f}% ({time.perf_counter() - t:.1f} s)')

    if val_loader is not None:
        _evaluate('original', model)
        _evaluate('compressed', compressed)
    if finetune_epochs:
        n = finetune_epochs * len(train_loader)
        n = n if finetune_steps is None else min(n, finetune_steps)
        _logger.info(f'fine-tune: {n} steps of {opt} (lr {lr:g}, cosine; Frobenius-decay coefficient '
                     f'{weight_decay:g}) ...')
        ft = finetune(compressed, train_loader, dev, finetune_epochs, opt, lr, weight_decay, max_steps=finetune_steps,
                      progress=progress, log_interval=log_interval)
        report.extra['finetune'] = ft
        if ft['steps']:
            _logger.info(f'fine-tune: loss {ft["first_loss"]:.4f} -> {ft["last_loss"]:.4f} (mean '
                         f'{ft["mean_loss"]:.4f}) in {ft["seconds"]:.1f} s')
        if val_loader is not None:
            _evaluate('finetuned', compressed)
    report.extra['accuracy'] = acc
    collapsed: List[str] = []
    if finalize == 'fastest':
        _logger.info(f'paths: timing each factorized layer against its collapsed dense form at batch {batch_size} '
                     '...')
        t = time.perf_counter()
        example = torch.zeros((1, *input_size), device=dev)
        paths = fnl.select_fastest_paths(compressed, example, batch_size=batch_size, repeats=7, inference=True)
        report.extra['paths'] = paths
        collapsed = [n for n, p in paths.items() if not p['kept']]
        _logger.info(f'paths: {len(paths) - len(collapsed)} layers kept low rank, {len(collapsed)} collapsed to dense '
                     f'({time.perf_counter() - t:.1f} s)')
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
    _logger.info(f'latency: timing the original and the compressed model at batch {batch_size} on {device} '
                 f'({repeats} calls each{", BatchNorm folded" if batchnorm_folded else ""}) ...')
    orig_ms, comp_ms = measure_models([original, compressed], input_size, batch_size, device, repeats,
                                      channels_last)
    _logger.info(f'latency: original {orig_ms:.3f} ms, compressed {comp_ms:.3f} ms (x{orig_ms / comp_ms:.2f})')
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
