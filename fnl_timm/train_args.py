"""``fnl-train``'s command line: the parser and the checks of its arguments."""
import argparse
import os
from typing import Any, Optional

import timm
from timm.optim import list_optimizers
from timm.utils import ParseKwargs

from fnl._validate import check_rank_choice

from . import data as fnl_data
from ._serialization import check_input_file, load_checkpoint
from .compress import is_compressed_checkpoint
from .optim import FD_OPTIMIZERS
from .train_checkpoint import RESUME_MUST_MATCH


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once, as '(default: X)', and only where it says something: not for flags (False),
    nor for None (the help text then says what is used instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == {} \
                or action.default is argparse.SUPPRESS:
            return action.help or ''
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='fnl-train', description='Train factorized vision models (Khodak et al., ICLR 2022) with timm.',
        formatter_class=_HelpFormatter,
        epilog='Resume: --resume RUN/last.pth.tar continues in the folder RUN (never another one), with the kept '
               'and best checkpoints of the run. The flags that define the model, the data and the regulariser '
               f'({", ".join(_flag(n) for n in RESUME_MUST_MATCH)}) must equal the checkpoint\'s; the others '
               '(e.g. --epochs to train further, --lr, --stop-epoch, --clip-grad, --workers) may change. SIGTERM or '
               'SIGINT (Ctrl-C) finishes the current step, writes last.pth.tar and exits 143 / 130; its --resume '
               'continues at that step with the result of an uninterrupted run (the same number of processes). '
               'A non-finite loss or gradient norm stops the run (exit 1) and keeps the last finite checkpoint.')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='digits', choices=fnl_data.DATASETS,
                   help='digits is embedded (scikit-learn), the others need --data-dir')
    g.add_argument('--data-dir', default=None, help='dataset root (a folder dataset: ROOT/train and ROOT/val)')
    g.add_argument('--download', action='store_true', help='download CIFAR with torchvision')
    g.add_argument('--img-size', type=int, default=None,
                   help="input side; unset: the dataset's (32, 64 for tiny-imagenet, 224 for folder)")
    g.add_argument('--no-hflip', action='store_true', help='no random horizontal flip')
    g.add_argument('--cutout', type=int, default=0, help='Cutout square side, 0 = off (WRN recipe: 16)')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='training batch size per process')
    g.add_argument('--eval-batch-size', type=int, default=None, help='evaluation batch size; unset: 2x --batch-size')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes (0: load in this one)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='a timm model name (fnl_* for factorized ones); unset: fnl_resnet20, or the architecture '
                        'of an fnl-compress --initial-checkpoint')
    g.add_argument('--initial-checkpoint', default=None, metavar='FILE',
                   help="start from these weights: an fnl-compress compressed.pth (its architecture and ranks "
                        "define the model: fine-tune a compressed model with Frobenius decay), or a state dict / "
                        "timm checkpoint for --model")
    g.add_argument('--rank-scale', type=float, default=None,
                   help='rank of each factorized layer as a fraction of its dense size (docs/method.md); '
                        'unset or 0: dense')
    g.add_argument('--target-ratio', type=float, default=None,
                   help='solve one rank_scale for params(factorized)/params(dense) closest to this')
    g.add_argument('--spectral', action='store_true',
                   help='spectral init of the factors (paper section 3.1, docs/method.md#spectral-initialisation)')
    g.add_argument('--square', action='store_true', help='W = U S V^T with S = I (overcomplete distillation, '
                                                         'paper section 5)')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra model kwargs k=v (e.g. conv=tt)')

    g = p.add_argument_group('optimizer and regularisation')
    g.add_argument('--opt', default='fdmomentum',
                   help=f'timm optimizer name; the Frobenius-decay ones are {", ".join(FD_OPTIMIZERS)}')
    g.add_argument('--lr', type=float, default=0.1, help='peak learning rate')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=1e-4,
                   help='weight decay coefficient (and the Frobenius-decay one with --wd2fd)')
    g.add_argument('--wd2fd', action='store_true',
                   help='factors get Frobenius decay with coefficient --weight-decay instead of weight decay '
                        '(paper section 3.2)')
    g.add_argument('--wd2fd-quekey', action='store_true',
                   help="Frobenius decay on each attention head's query-key form W_Q^T W_K (coefficient "
                        "--weight-decay) instead of weight decay on qkv; timm attention of a model built with "
                        "attention='heads' (paper section 3.2)")
    g.add_argument('--wd2fd-outval', action='store_true',
                   help="Frobenius decay on each attention head's output-value form W_O W_V instead of weight "
                        "decay on qkv and proj; as --wd2fd-quekey")
    g.add_argument('--no-frob', action='store_true', help='Frobenius-decay coefficient 0')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value; unset: no clipping')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                   help='what --clip-grad bounds: the global gradient norm, each value, or adaptive (timm)')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra optimizer kwargs k=v')

    g = p.add_argument_group('schedule')
    g.add_argument('--epochs', type=int, default=200, help='epochs of the schedule')
    g.add_argument('--sched', default='multistep', help='timm scheduler name')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=None,
                   help="multistep: epochs where the decayed lr starts; unset: the paper's 50%% and 75%% "
                        "of --epochs")
    g.add_argument('--decay-rate', type=float, default=0.1, help='lr factor at each milestone')
    g.add_argument('--warmup-epochs', type=int, default=0, help='epochs of linear lr warm-up')
    g.add_argument('--min-lr', type=float, default=0.0, help='lower bound of the lr (cosine and other schedules)')

    g = p.add_argument_group('normalisation experiment (paper section 3.3) and export')
    g.add_argument('--dump-frobnorms', action='store_true',
                   help='record ||U V^T||_F of every factorized layer after each step into frobnorms.pt')
    g.add_argument('--normalize', default=None, metavar='FILE',
                   help='rescale factors after each step to the norms recorded in FILE (needs --no-frob)')
    g.add_argument('--collapse', action='store_true',
                   help='at the end, collapse every factorized layer to a dense one and save it')

    g = p.add_argument_group('run')
    g.add_argument('--output', default='output', help='parent folder of the run folder')
    g.add_argument('--experiment', default=None,
                   help='run folder name; unset: from the settings. A taken name gets -1, -2, ...')
    g.add_argument('--resume', default=None, metavar='FILE',
                   help='checkpoint to continue (model, optimizer, FD state, checkpoint history), in its own '
                        'folder; see the end of this help')
    g.add_argument('--stop-epoch', type=int, default=None,
                   help='stop after this epoch index (exclusive) in this process, e.g. for a time slot; '
                        'continue later with --resume')
    g.add_argument('--seed', type=int, default=0, help='seed of the initial model, data order and augmentation')
    g.add_argument('--device', default=None, help='cpu, cuda, cuda:1, ...; unset: cuda if available')
    g.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 + scaler on CUDA)')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory format for model and inputs; unset: on for a model with 2-d convs '
                        'on the CPU (dense or factorized: 1.04-1.9x faster steps there, docs/speed.md), off '
                        'otherwise; --no-channels-last keeps the contiguous (NCHW) format')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help="torch.compile the training forward and backward (as timm's train.py; the optimizer step, "
                        "Frobenius decay included, and validation stay eager; checkpoints hold the plain model's "
                        "weights); BACKEND defaults to inductor. On a GPU with --torchcompile-mode reduce-overhead "
                        "(CUDA graphs) fnl_resnet20's step was 3.3x faster than eager (docs/speed.md)")
    g.add_argument('--torchcompile-mode', default=None,
                   choices=['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'],
                   help='torch.compile mode with --torchcompile (unset: torch\'s default)')
    g.add_argument('--sync-bn', action='store_true',
                   help='under torchrun on CUDA: BatchNorm statistics over all processes in every step (torch '
                        'SyncBatchNorm, as timm train.py); without it each process normalises with its own batch')
    g.add_argument('--checkpoint-hist', type=int, default=1, help='best checkpoints to keep')
    g.add_argument('--limit-train-batches', type=int, default=None, help='steps per epoch (smoke runs)')
    g.add_argument('--limit-val-batches', type=int, default=None, help='validation batches (smoke runs)')
    g.add_argument('--no-progress', action='store_true',
                   help='no progress bar: a log line every --log-interval steps instead (also when the output '
                        'is not a terminal)')
    g.add_argument('--no-tensorboard', action='store_true', help='no TensorBoard event file in the run folder')
    g.add_argument('--log-interval', type=int, default=50,
                   help='steps between progress updates, divergence checks and (under torchrun) stop decisions')
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the offending option."""
    def positive(name: str, value: Optional[int]) -> None:
        if value is not None and value < 1:
            raise ValueError(f'--{name} must be >= 1, got {value}')

    for name in ('batch_size', 'eval_batch_size', 'epochs', 'limit_train_batches', 'limit_val_batches',
                 'checkpoint_hist', 'log_interval', 'stop_epoch'):
        positive(name.replace('_', '-'), getattr(args, name))
    if args.workers < 0:
        raise ValueError(f'--workers must be >= 0, got {args.workers}')
    if args.torchcompile_mode is not None and args.torchcompile is None:
        raise ValueError(f'--torchcompile-mode {args.torchcompile_mode!r} needs --torchcompile')
    if args.torchcompile is not None:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.torchcompile not in backends:
            raise ValueError(f'--torchcompile {args.torchcompile!r} is not a torch.compile backend; '
                             f'choose from {", ".join(sorted(backends))}')
    initial = _initial_checkpoint(args.initial_checkpoint) if args.initial_checkpoint is not None else None
    compressed = initial is not None and is_compressed_checkpoint(initial)
    if compressed:
        given = [flag for flag, value in (('--rank-scale', args.rank_scale), ('--target-ratio', args.target_ratio),
                                          ('--spectral', args.spectral), ('--square', args.square),
                                          ('--model-kwargs', args.model_kwargs), ('--drop', args.drop)) if value]
        if given:
            raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} is an fnl-compress checkpoint: its '
                             f'architecture, ranks and weights define the model; drop {", ".join(given)}')
        if args.model is not None and args.model != initial['arch']:
            raise ValueError(f'--model {args.model!r} differs from the architecture of --initial-checkpoint '
                             f'{args.initial_checkpoint!r} ({initial["arch"]!r}); leave --model out')
        args.model = initial['arch']
        args.initial_is_compressed = True
    elif args.model is None:
        args.model = 'fnl_resnet20'
    if not timm.is_model(args.model):
        raise ValueError(f'--model {args.model!r} is not a registered timm model '
                         f'(fnl models: {", ".join(timm.list_models("fnl_*"))})')
    # the core's one rule (docs/method.md#rank-settings)
    check_rank_choice(None, args.rank_scale, args.target_ratio, names=('--rank', '--rank-scale', '--target-ratio'))
    factorized = (bool(args.rank_scale) or args.target_ratio is not None
                  or bool(args.model_kwargs.get('rank_scale')) or args.model_kwargs.get('target_ratio') is not None
                  or (compressed and initial.get('form', 'factorized') == 'factorized' and bool(initial['ranks'])))
    if compressed and not factorized and (args.wd2fd or args.no_frob):
        raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} holds the compressed model in inference '
                         f'form (plain layers, no factors for Frobenius decay to act on): write it with '
                         f'fnl-compress --finalize factorized, or fine-tune without --wd2fd / --no-frob')
    if (args.spectral or args.square) and not factorized:
        raise ValueError('--spectral and --square need a factorized model: set --rank-scale > 0 or --target-ratio')
    for name in ('lr', 'momentum', 'weight_decay', 'min_lr', 'smoothing', 'drop'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    if args.clip_grad is not None and args.clip_grad <= 0:
        raise ValueError(f'--clip-grad must be > 0, got {args.clip_grad}')
    opt = args.opt.lower().split('_')[-1]
    if opt not in list_optimizers():
        raise ValueError(f'--opt {args.opt!r} is not a timm optimizer (FD ones: {", ".join(FD_OPTIMIZERS)})')
    if (args.wd2fd or args.no_frob) and opt not in FD_OPTIMIZERS:
        raise ValueError(f'--wd2fd / --no-frob need a Frobenius-decay optimizer (--opt one of {FD_OPTIMIZERS}), '
                         f'got --opt {args.opt!r}')
    if (args.wd2fd_quekey or args.wd2fd_outval) and opt not in FD_OPTIMIZERS:
        raise ValueError(f'--wd2fd-quekey / --wd2fd-outval need a Frobenius-decay optimizer (--opt one of '
                         f'{FD_OPTIMIZERS}), got --opt {args.opt!r}')
    if args.normalize is not None:
        if not args.no_frob:
            raise ValueError('--normalize replaces Frobenius decay: add --no-frob')
        check_input_file(args.normalize, '--normalize')  # missing, a folder or empty
    if (args.wd2fd or args.no_frob) and not factorized:
        raise ValueError('--wd2fd / --no-frob act on the factors of a factorized model: set --rank-scale > 0 or '
                         '--target-ratio')
    if (args.dump_frobnorms or args.normalize or args.collapse) and not factorized:
        raise ValueError('--dump-frobnorms, --normalize and --collapse need a factorized model '
                         '(--rank-scale > 0 or --target-ratio)')
    if args.resume is not None:
        check_input_file(args.resume, '--resume')  # missing, a folder or empty
    if args.decay_milestones is not None and sorted(args.decay_milestones) != list(args.decay_milestones):
        raise ValueError(f'--decay-milestones must increase, got {args.decay_milestones}')


def _initial_checkpoint(path: str) -> Any:
    """``--initial-checkpoint`` read weights-only (``fnl_timm._serialization``): no code from the file runs."""
    return load_checkpoint(path, '--initial-checkpoint')


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _experiment_name(args: argparse.Namespace) -> str:
    parts = [args.model, args.dataset]
    if getattr(args, 'initial_is_compressed', False):
        parts.append('compressed')
    elif args.target_ratio is not None:
        parts.append(f'tr{args.target_ratio:g}')
    elif args.rank_scale:
        parts.append(f'rs{args.rank_scale:g}')
    else:
        parts.append('dense')
    for flag in ('spectral', 'square', 'wd2fd', 'no_frob'):
        if getattr(args, flag):
            parts.append(flag.replace('_', ''))
    if args.normalize:
        parts.append('norm')
    return '-'.join(parts)
