"""What ``fnl-compress`` writes: ``model.pt``, ``compressed.pth``, the report (JSON, text, PNG) and
the exports, each file atomically, never over an input file.
"""
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

import fnl
from fnl.export import atomic_path, export_model

from ._hf import save_timm_folder

__all__ = ['plot_report', 'write_outputs']

_logger = logging.getLogger('fnl_compress')

SUFFIX = {'torchscript': 'model.ts', 'export': 'model.pt2', 'onnx': 'model.onnx'}


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
                  inputs: Sequence[Optional[str]] = (), deploy: Optional[nn.Module] = None,
                  data_config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write the model, the report and the exports into ``out_dir`` (each file atomically).

    ``deploy`` (e.g. with BatchNorm folded) replaces ``compressed`` in ``model.pt`` and the exports;
    ``compressed.pth`` always holds ``compressed``'s layers, which ``load_compressed`` rebuilds.

    For a timm model, ``hf/`` is timm's own folder of the model with its arguments
    (``timm.create_model('local-dir:OUT/hf', pretrained=True)``, ``--model local-dir:OUT/hf`` in timm's
    scripts; :mod:`fnl_timm._hf`), with ``data_config``'s preprocessing, when timm's loader rebuilds
    the compressed model from it: the architecture must take the weights' layer shapes (the ``fnl_*``
    models adopt a checkpoint's ranks). Otherwise the report's ``hf_note`` says why there is none."""
    targets = {'model': 'model.pt', 'report_json': 'report.json', 'report_txt': 'report.txt', 'plot': 'report.png',
               **({'checkpoint': 'compressed.pth'} if provenance.get('arch') else {}),
               **{f'export_{f}': SUFFIX[f] for f in exports}}
    paths = {k: os.path.join(out_dir, v) for k, v in targets.items()}
    _check_no_overwrite(out_dir, inputs, paths.values())
    os.makedirs(out_dir, exist_ok=True)
    _logger.info(f'write: the compressed model to {out_dir} ...')
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
        note = save_timm_folder(compressed, os.path.join(out_dir, 'hf'), input_size, data_config=data_config)
        if note is not None and report.extra.get('form') == 'inference':
            note = ('its low-rank layers are pairs of plain layers (--finalize fastest / inference), which no timm '
                    'model argument describes; --finalize factorized keeps fnl layers, whose ranks the weights\' '
                    f'shapes carry ({note})')
    else:
        note = 'the input was a saved module, not a timm model name with arguments'
    report.extra['hf'] = None if note is not None else os.path.join(out_dir, 'hf')
    if note is None:
        _logger.info(f"write: {report.extra['hf']}: timm's folder of the model and its arguments "
                     f"(--model local-dir:{report.extra['hf']} in timm's scripts)")
    else:
        report.extra['hf_note'] = note
        _logger.info(f'write: no hf/ folder for timm: {note}')
    example = torch.randn((export_batch, *input_size), generator=torch.Generator().manual_seed(0))
    export_results = {}
    for f in exports:
        _logger.info(f'export: {f} to {paths[f"export_{f}"]} ...')
        t = time.perf_counter()
        r = export_results[f] = export_model(deploy, example, paths[f'export_{f}'], f)
        diff = 'not compared' if r['max_abs_diff'] is None else f'max |diff| {r["max_abs_diff"]:.3g}'
        _logger.info(f'export: {f} checked against the PyTorch model, {diff} ({time.perf_counter() - t:.1f} s)')
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


ALL_OUTPUTS = ('model.pt', 'compressed.pth', 'report.json', 'report.txt', 'report.png', *SUFFIX.values(),
               os.path.join('hf', 'config.json'), os.path.join('hf', 'model.safetensors'))


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
    if report.extra.get('hf'):
        lines.append(f"timm folder: {report.extra['hf']} (timm.create_model('local-dir:{report.extra['hf']}', "
                     "pretrained=True); --model local-dir:... in timm's scripts)")
    elif report.extra.get('hf_note'):
        lines.append(f"no timm folder (hf/): {report.extra['hf_note']}")
    for f, r in (report.extra.get('exports') or {}).items():
        diff = '-' if r['max_abs_diff'] is None else f'{r["max_abs_diff"]:.3g}'
        lines.append(f'export {f}: {r["path"]} (max |diff| {diff} on batches {r["checked_batches"]}) {r["note"]}')
    return '\n'.join(lines) + '\n'
