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
    fnl-compress --model my_model.pt --trust-pickle --input-size 3 224 224 --target-macs 0.5 \\
        --batch-size 32 --export torchscript export --output compressed/

Outputs in ``--output``: ``compressed.pth`` (timm models: arch, kwargs, ranks and state dict, only
tensors, strings and numbers, so it loads weights-only; :func:`load_compressed` rebuilds it, and
``fnl-train --initial-checkpoint compressed.pth --wd2fd`` fine-tunes it further with Frobenius
decay), ``model.pt`` (the whole compressed module, pickled: loading it runs code from the file, so
it needs ``--trust-pickle`` / ``trust_pickle=True`` and is for your own use, not for handing on),
``report.json``, ``report.txt``, ``report.png``, ``model.ts`` / ``model.pt2`` / ``model.onnx``
for ``--export``, and ``hf/``: timm's own folder of the model with its arguments (``config.json``
and ``model.safetensors``, as ``timm.models.save_for_hf`` writes), which timm's scripts load with
``--model local-dir:OUTPUT/hf``, written when timm's loader rebuilds the compressed model from it
(``--finalize factorized`` or ``collapse`` of an ``fnl_*`` model, whose layers adopt the ranks
of the weights; the pairs of plain layers of ``fastest`` / ``inference`` have no model argument;
the report says why a folder is missing). To hand a compressed model on, use ``compressed.pth``,
``hf/`` or the ``torch.export`` / ONNX files. The input files are only read; nothing is written next to them.

Every input file is read weights-only (``fnl_timm._serialization.load_file``): a file that holds
Python objects (a pickled module, a pickle payload) or a TorchScript program is refused with an
error naming ``--trust-pickle``, which allows it; unpickling a file runs whatever code it names.

This module is the command line; the work is done in :mod:`fnl_timm.compress_load` (reading the
inputs), :mod:`fnl_timm.compress_pipeline` (factorize, fine-tune, choose paths, time) and
:mod:`fnl_timm.compress_outputs` (the model files, the report and the exports).
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from timm.utils import ParseKwargs

import fnl
from fnl._validate import check_target_ratio
from fnl.export import EXPORT_FORMATS

from . import data as fnl_data
from .compress_load import _state_dict_of, is_compressed_checkpoint, load_compressed, load_model
from .compress_outputs import ALL_OUTPUTS, _check_no_overwrite, _jsonable, _text_report, plot_report, write_outputs
from .compress_pipeline import (FINALIZE, compress_model, evaluate, finetune, latency_report, measure_models)
from .optim import FD_OPTIMIZERS

__all__ = ['build_parser', 'compress_file', 'compress_model', 'evaluate', 'finetune', 'is_compressed_checkpoint',
           'latency_report', 'load_compressed', 'load_model', 'main', 'measure_models', 'plot_report', 'run',
           'write_outputs']

_logger = logging.getLogger('fnl_compress')


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for on/off flags, unset (None) or empty defaults, nor where the help
    already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ''
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, dict)) and not d) \
                or 'default' in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='fnl-compress', description=__doc__.split('\n\n')[0],
                                formatter_class=_HelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', required=True,
                   help="a timm model name, or a torch.save'd nn.Module file (a whole pickled module: needs "
                        '--trust-pickle)')
    g.add_argument('--checkpoint', default=None,
                   help='weights for a timm model name: a state dict, a timm / fnl-train checkpoint (loaded '
                        'weights-only: no code from the file runs), or a TorchScript file (needs --trust-pickle)')
    g.add_argument('--trust-pickle', action='store_true',
                   help='DANGEROUS: allow input files whose loading runs code from the file (a whole pickled '
                        'module, TorchScript). Unpickling a file can run arbitrary code with your permissions: '
                        'only for files from a source you trust. State dicts and checkpoints never need it')
    g.add_argument('--num-classes', type=int, default=None,
                   help="classifier outputs; default: the dataset's, else the model's")
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                   help='extra timm.create_model keyword arguments (values read as Python literals)')
    g.add_argument('--random-init', action='store_true',
                   help='allow a timm model name without --checkpoint (random weights: timing only)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="one sample's shape; default: the dataset's, else the model's pretrained_cfg")

    g = p.add_argument_group('compression (exactly one of --target-ratio / --target-macs / --energy)')
    g.add_argument('--target-ratio', type=float, default=None, help='parameter ratio compressed / original')
    g.add_argument('--target-macs', type=float, default=None, help='multiply-add ratio compressed / original')
    g.add_argument('--energy', type=float, default=None, help='fraction of spectral energy kept in every layer')
    g.add_argument('--allocation', default='energy', choices=('energy', 'uniform'),
                   help="energy: equal kept-energy fraction per layer; uniform: the paper's global rank_scale")
    g.add_argument('--rank-multiple', type=int, default=8, help='round ranks up to a multiple of this (1 = off)')
    g.add_argument('--exclude', nargs='*', default=None, metavar='PATTERN',
                   help='fnmatch patterns of layer names to keep dense')
    g.add_argument('--factorize-stem', action='store_true', help='also factorize the first layer')
    g.add_argument('--factorize-classifier', action='store_true', help='also factorize the last layer')
    g.add_argument('--measure', action='store_true',
                   help='time each layer factorized vs dense at --batch-size and keep dense the slower ones')

    g = p.add_argument_group('data, fine-tuning and latency')
    g.add_argument('--dataset', default=None, choices=fnl_data.DATASETS,
                   help='data for the accuracy report and fine-tuning; without it, no accuracy and no fine-tuning')
    g.add_argument('--data-dir', default=None, help='root folder of --dataset (every dataset but digits)')
    g.add_argument('--img-size', type=int, default=None, help="input side; default: the dataset's")
    g.add_argument('--eval-batches', type=int, default=None, help='evaluate on only this many validation batches')
    g.add_argument('--finetune-epochs', type=int, default=0, help='FD fine-tuning epochs (0 = none)')
    g.add_argument('--finetune-steps', type=int, default=None, help='stop fine-tuning after this many steps')
    g.add_argument('--finetune-batch-size', type=int, default=64, help='batch size of the fine-tuning')
    g.add_argument('--opt', default='fdmomentum', choices=FD_OPTIMIZERS,
                   help='fine-tuning optimizer (Frobenius decay on the factors)')
    g.add_argument('--lr', type=float, default=0.01, help='fine-tuning learning rate (cosine schedule)')
    g.add_argument('--weight-decay', type=float, default=1e-4, help='= the Frobenius-decay coefficient')
    g.add_argument('--finalize', default='fastest', choices=FINALIZE,
                   help='fastest: per layer, two plain layers (low rank) or one collapsed dense layer, whichever is '
                        'measured faster at --batch-size; inference: two plain layers everywhere; factorized: keep '
                        'fnl layers (to train further with FD); collapse: all dense')
    g.add_argument('-b', '--batch-size', type=int, default=1, help='batch size of the latency measurements')
    g.add_argument('--device', default='cpu', help='device for fine-tuning and timing (cpu, cuda, cuda:1, ...)')
    g.add_argument('--latency-repeats', type=int, default=15, help='timed calls per model (the median is reported)')
    g.add_argument('--no-latency', action='store_true', help='skip the latency comparison of the two models')
    g.add_argument('--fold-bn', action='store_true',
                   help='fold each BatchNorm into the conv before it (torch.fx) in model.pt and the exports, and '
                        'time both models folded; compressed.pth keeps the unfolded layers for fine-tuning')
    g.add_argument('--channels-last', action='store_true',
                   help='time both models in the channels-last memory format (usually faster on CPU)')
    g.add_argument('--cache-allocations', action='store_true',
                   help='CPU: keep freed memory in the process for reuse while timing (fnl.cache_cpu_allocations; '
                        "as jemalloc / tcmalloc do); glibc's default maps large activations afresh on every call")
    g.add_argument('--seed', type=int, default=0, help='random seed (fine-tuning order, timing inputs)')
    g.add_argument('--no-progress', action='store_true',
                   help='no progress bars: the fine-tuning logs a line every --log-interval steps instead (also '
                        'when the output is not a terminal)')
    g.add_argument('--log-interval', type=int, default=50,
                   help='fine-tuning steps between progress updates (the loss is read from the device only then)')

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
    if args.target_ratio is not None:  # the core's one rule (docs/method.md#rank-settings)
        check_target_ratio(args.target_ratio, '--target-ratio')
    for n in ('batch_size', 'rank_multiple', 'latency_repeats', 'finetune_batch_size', 'eval_batches',
              'finetune_steps', 'num_classes', 'log_interval'):
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
    _check_no_overwrite(args.output, inputs, [os.path.join(args.output, n) for n in ALL_OUTPUTS])
    train_loader = val_loader = None
    kwargs = dict(args.model_kwargs)
    input_size = args.input_size
    if args.dataset is not None:
        _logger.info(f'data: {args.dataset}' + (f' from {args.data_dir}' if args.data_dir else '') + ' ...')
        train_ds, val_ds, info = fnl_data.create_datasets(args.dataset, args.data_dir, args.img_size)
        _logger.info(f'data: {len(train_ds):,} training and {len(val_ds):,} validation images of '
                     f'{"x".join(map(str, info.input_size))}, {info.num_classes} classes')
        kwargs.setdefault('num_classes', info.num_classes)
        input_size = input_size or info.input_size
        val_loader = DataLoader(val_ds, batch_size=256, shuffle=False, num_workers=0)
        train_loader = DataLoader(train_ds, batch_size=args.finetune_batch_size, shuffle=True, num_workers=0,
                                  drop_last=True)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    before = _fingerprints(inputs)
    _logger.info(f'load: {args.model}' + (f' with {args.checkpoint}' if args.checkpoint else
                                         ' (random weights)' if args.random_init else '') + ' ...')
    model, provenance = load_model(args.model, args.checkpoint, kwargs, args.random_init, args.trust_pickle)
    _logger.info(f'load: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters')
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
        channels_last=args.channels_last, progress=False if args.no_progress else None,
        log_interval=args.log_interval)
    deploy = None
    if args.fold_bn:
        _logger.info('fold-bn: folding each BatchNorm into the conv before it ...')
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
    data_config = None
    if args.dataset is not None:  # the preprocessing the accuracy was measured with, for timm's scripts
        data_config = dict(input_size=tuple(info.input_size), mean=tuple(info.mean), std=tuple(info.std),
                           crop_pct=1.0)
    write_outputs(args.output, compressed, report, provenance, input_size, args.export, inputs=inputs,
                  deploy=deploy, data_config=data_config)
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
    except OSError as e:  # e.g. a read-only --output: one line, not a traceback
        parser.exit(1, f'fnl-compress: error: {e.strerror or e}' + (f': {e.filename}' if e.filename else '') + '\n')
    except RuntimeError as e:  # torch.save to a path reports a full disk as a short write of its zip archive
        if 'unexpected pos' not in str(e):
            raise
        parser.exit(1, f'fnl-compress: error: No space left on device (writing to --output {args.output})\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

