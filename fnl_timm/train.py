"""``fnl-train``: train a factorized vision model the way the paper does (SPEC 1-5, 8).

Built from timm's pieces: ``timm.create_model`` (the ``fnl_*`` zoo), ``timm.data.create_dataset``,
``timm.optim.create_optimizer_v2`` (the Frobenius-decay optimizers of ``fnl_timm.optim``),
``timm.scheduler.create_scheduler_v2``, and ``timm.utils`` (CheckpointSaver, update_summary,
AverageMeter, accuracy, NativeScaler, dispatch_clip_grad, distributed helpers).

Examples::

    fnl-train                                            # fnl_resnet20 on the embedded digits
    fnl-train --dataset cifar10 --data-dir data --download --rank-scale 0.111 --spectral --wd2fd
    torchrun --nproc-per-node 2 -m fnl_timm.train --device cpu --epochs 2

Outputs in ``--output/<experiment>``: ``summary.csv``, TensorBoard events, ``results.json``,
checkpoints (``last.pth.tar``, best ones), ``frobnorms.pt`` (``--dump-frobnorms``) and
``model_collapsed.pth`` (``--collapse``: a state dict for the dense model).
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import timm
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    AverageMeter, CheckpointSaver, NativeScaler, ParseKwargs, accuracy, dispatch_clip_grad, distribute_bn,
    get_outdir, init_distributed_device, reduce_tensor, unwrap_model, update_summary,
)

import fnl

from . import data as fnl_data
from ._serialization import allow_argparse_namespace
from .compress import _state_dict_of, is_compressed_checkpoint, load_compressed
from .optim import FD_OPTIMIZERS, mark_factors

_logger = logging.getLogger('fnl_train')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='fnl-train', description='Train factorized vision models (Khodak et al., ICLR 2022) with timm.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='digits', choices=fnl_data.DATASETS,
                   help='digits is embedded (scikit-learn), the others need --data-dir')
    g.add_argument('--data-dir', default=None, help='dataset root')
    g.add_argument('--download', action='store_true', help='download CIFAR with torchvision')
    g.add_argument('--img-size', type=int, default=None, help='input side (default: the dataset\'s)')
    g.add_argument('--no-hflip', action='store_true', help='no random horizontal flip')
    g.add_argument('--cutout', type=int, default=0, help='Cutout square side (WRN recipe: 16)')
    g.add_argument('-b', '--batch-size', type=int, default=128)
    g.add_argument('--eval-batch-size', type=int, default=None, help='default: 2x --batch-size')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='a timm model name (fnl_* for factorized ones); default fnl_resnet20, or the architecture '
                        'of an fnl-compress --initial-checkpoint')
    g.add_argument('--initial-checkpoint', default=None, metavar='FILE',
                   help="start from these weights: an fnl-compress compressed.pth (its architecture and ranks "
                        "define the model: fine-tune a compressed model with Frobenius decay), or a state dict / "
                        "timm checkpoint for --model")
    g.add_argument('--rank-scale', type=float, default=None, help='rank = round(rank_scale * ...); 0 = dense')
    g.add_argument('--target-ratio', type=float, default=None,
                   help='solve one rank_scale for params(factorized)/params(dense) closest to this')
    g.add_argument('--spectral', action='store_true', help='spectral init of the factors (SPEC 2)')
    g.add_argument('--square', action='store_true', help='W = U S V^T with S = I (deep distillation)')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model kwargs k=v')

    g = p.add_argument_group('optimizer and regularisation')
    g.add_argument('--opt', default='fdmomentum',
                   help=f'timm optimizer name; the FD ones are {", ".join(FD_OPTIMIZERS)}')
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--wd2fd', action='store_true',
                   help='factors get Frobenius decay with coefficient --weight-decay instead of weight decay')
    g.add_argument('--no-frob', action='store_true', help='Frobenius-decay coefficient 0')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (off by default)')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra optimizer kwargs k=v')

    g = p.add_argument_group('schedule')
    g.add_argument('--epochs', type=int, default=200)
    g.add_argument('--sched', default='multistep', help='timm scheduler name')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=None,
                   help='multistep: epochs where the decayed lr starts (default: the paper\'s 50%% and 75%% '
                        'of --epochs)')
    g.add_argument('--decay-rate', type=float, default=0.1)
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--min-lr', type=float, default=0.0)

    g = p.add_argument_group('normalisation experiment (SPEC 4) and export')
    g.add_argument('--dump-frobnorms', action='store_true',
                   help='record ||U V^T||_F of every factorized layer after each step into frobnorms.pt')
    g.add_argument('--normalize', default=None, metavar='FILE',
                   help='rescale factors after each step to the norms recorded in FILE (needs --no-frob)')
    g.add_argument('--collapse', action='store_true',
                   help='at the end, collapse every factorized layer to a dense one and save it')

    g = p.add_argument_group('run')
    g.add_argument('--output', default='output', help='parent folder of the run folder')
    g.add_argument('--experiment', default=None, help='run folder name (default: from the settings)')
    g.add_argument('--resume', default=None, help='checkpoint to resume from (model, optimizer, FD state)')
    g.add_argument('--stop-epoch', type=int, default=None,
                   help='stop after this epoch index (exclusive) in this process, e.g. for a time slot; '
                        'continue later with --resume')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default=None, help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    g.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 + scaler on CUDA)')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--checkpoint-hist', type=int, default=1, help='best checkpoints to keep')
    g.add_argument('--limit-train-batches', type=int, default=None, help='steps per epoch (smoke runs)')
    g.add_argument('--limit-val-batches', type=int, default=None, help='validation batches (smoke runs)')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    g.add_argument('--no-tensorboard', action='store_true')
    g.add_argument('--log-interval', type=int, default=50)
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
    if args.rank_scale is not None and (not math.isfinite(args.rank_scale) or args.rank_scale < 0):
        raise ValueError(f'--rank-scale must be a finite float >= 0, got {args.rank_scale}')
    if args.target_ratio is not None:
        if not 0.0 < args.target_ratio < 1.0:
            raise ValueError(f'--target-ratio must be in (0, 1), got {args.target_ratio}')
        if args.rank_scale:
            raise ValueError('give --rank-scale or --target-ratio, not both')
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
    if args.normalize is not None:
        if not args.no_frob:
            raise ValueError('--normalize replaces Frobenius decay: add --no-frob')
        if not os.path.isfile(args.normalize):
            raise ValueError(f'--normalize: no such file {args.normalize!r}')
    if (args.wd2fd or args.no_frob) and not factorized:
        raise ValueError('--wd2fd / --no-frob act on the factors of a factorized model: set --rank-scale > 0 or '
                         '--target-ratio')
    if (args.dump_frobnorms or args.normalize or args.collapse) and not factorized:
        raise ValueError('--dump-frobnorms, --normalize and --collapse need a factorized model '
                         '(--rank-scale > 0 or --target-ratio)')
    if args.resume is not None and not os.path.isfile(args.resume):
        raise ValueError(f'--resume: no such file {args.resume!r}')
    if args.decay_milestones is not None and sorted(args.decay_milestones) != list(args.decay_milestones):
        raise ValueError(f'--decay-milestones must increase, got {args.decay_milestones}')


def _initial_checkpoint(path: str) -> Any:
    """``--initial-checkpoint`` read with safe (weights-only) loading."""
    if not os.path.isfile(path):
        raise ValueError(f'--initial-checkpoint: no such file {path!r}')
    try:
        with allow_argparse_namespace():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a (safe) torch file
        raise ValueError(f'--initial-checkpoint {path!r} could not be read as a weights-only torch file '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None


def _create_model(args: argparse.Namespace, model_kwargs: Dict[str, Any], info: Any) -> nn.Module:
    """``timm.create_model``, or the model of an fnl-compress ``--initial-checkpoint``, with its weights."""
    initial = _initial_checkpoint(args.initial_checkpoint) if args.initial_checkpoint else None
    if initial is not None and is_compressed_checkpoint(initial):
        model = load_compressed(initial).train()
        classes, chans = getattr(model, 'num_classes', None), initial['model_kwargs'].get('in_chans', 3)
        if classes != info.num_classes or chans != info.input_size[0]:
            raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} is a model for {classes} classes and '
                             f'{chans} input channels; --dataset {args.dataset} has {info.num_classes} classes and '
                             f'{info.input_size[0]} channels')
        return model
    model = timm.create_model(args.model, **model_kwargs)
    if initial is not None:
        state = _state_dict_of(initial, args.initial_checkpoint, '--initial-checkpoint')
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} does not fit --model {args.model!r} '
                             f'with {model_kwargs}: {str(e).splitlines()[0]}') from None
    return model


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


def _is_main(args: argparse.Namespace) -> bool:
    return args.rank == 0


def _create_loader(ds, batch_size: int, train: bool, args: argparse.Namespace) -> DataLoader:
    # one sampler for both cases: deterministic per-epoch shuffling (set_epoch), DDP sharding
    sampler = DistributedSampler(ds, num_replicas=args.world_size, rank=args.rank, shuffle=train,
                                 seed=args.seed, drop_last=train)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
                      drop_last=train, pin_memory=args.device.startswith('cuda'),
                      persistent_workers=False)


class _Saver(CheckpointSaver):
    """timm's CheckpointSaver, plus the FNL state (recorded Frobenius norms) in each checkpoint."""

    def __init__(self, *args: Any, extra_state=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state

    def _save(self, save_path, epoch, metric=None):
        super()._save(save_path, epoch, metric)
        extra = self.extra_state() if self.extra_state is not None else None
        if extra:
            with allow_argparse_namespace():
                state = torch.load(save_path, map_location='cpu', weights_only=True)
            state['fnl'] = extra
            torch.save(state, save_path)


def _train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, amp_ctx, loss_scaler,
                     lr_scheduler, num_updates, normalizer, recorder, steps_per_epoch):
    model.train()
    losses = AverageMeter()
    top1 = AverageMeter()
    iterator = iter(loader)
    progress = None
    if _is_main(args) and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=steps_per_epoch, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True)
    for step in range(steps_per_epoch):
        x, y = next(iterator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx:
            out = model(x)
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            # the FD optimizers add the FD gradient inside step(), after unscaling and clipping
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model.parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if normalizer is not None:
            normalizer.step()
        if recorder is not None:
            recorder.record()
        num_updates += 1
        lr_scheduler.step_update(num_updates=num_updates)
        losses.update(loss.detach(), x.size(0))
        top1.update(accuracy(out.detach(), y)[0], x.size(0))
        if progress is not None:
            progress.update(1)
            if step % args.log_interval == 0 or step == steps_per_epoch - 1:
                progress.set_postfix(loss=f'{float(losses.avg):.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.4g}')
    if progress is not None:
        progress.close()
    loss_avg, top1_avg = losses.avg, top1.avg
    if args.distributed:
        loss_avg = reduce_tensor(torch.as_tensor(loss_avg, device=device, dtype=torch.float32), args.world_size)
        top1_avg = reduce_tensor(torch.as_tensor(top1_avg, device=device, dtype=torch.float32), args.world_size)
    return OrderedDict(loss=float(loss_avg), top1=float(top1_avg)), num_updates


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, loss_fn, args, device, amp_ctx,
             limit: Optional[int] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) on ``loader`` (summed over DDP ranks)."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, correct1, correct5, n
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx:
            out = model(x)
        out = out.float()
        acc1, acc5 = accuracy(out, y, topk=(1, min(5, out.shape[1])))
        n = x.size(0)
        sums += torch.stack([nn.functional.cross_entropy(out, y) * n, acc1 * n / 100, acc5 * n / 100,
                             torch.tensor(float(n), device=device)]).to(sums)
    if args.distributed:
        dist.all_reduce(sums)
    n = max(float(sums[3]), 1.0)
    return OrderedDict(loss=float(sums[0]) / n, top1=100 * float(sums[1]) / n, top5=100 * float(sums[2]) / n)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training job; returns the results dict written to ``results.json`` (on every rank)."""
    validate_args(args)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.dist_backend = getattr(args, 'dist_backend', None)
    args.dist_url = getattr(args, 'dist_url', None)
    device = init_distributed_device(args)
    try:
        return _train(args, device)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(args.seed)  # same initial model on every rank
    train_ds, val_ds, info = fnl_data.create_datasets(
        args.dataset, args.data_dir, args.img_size, args.download,
        hflip=False if args.no_hflip else None, cutout=args.cutout)

    model_kwargs = dict(num_classes=info.num_classes, in_chans=info.input_size[0], drop_rate=args.drop)
    if args.rank_scale:
        model_kwargs['rank_scale'] = args.rank_scale
    if args.target_ratio is not None:
        model_kwargs['target_ratio'] = args.target_ratio
    if args.spectral:
        model_kwargs['spectral'] = True
    if args.square:
        model_kwargs['square'] = True
    model_kwargs.update(args.model_kwargs)
    model = _create_model(args, model_kwargs, info)
    n_factorized = mark_factors(model)
    factorized = bool(model_kwargs.get('rank_scale')) or model_kwargs.get('target_ratio') is not None
    if factorized and n_factorized == 0:
        raise ValueError(f'--model {args.model!r} ignored the factorization settings: it has no factorized layer '
                         '(use an fnl_* model)')
    stats = fnl.summary(model, info.input_size)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    # optimizer: FD optimizers get the factors from timm's factory (the model's no_weight_decay()
    # names them); any other optimizer gets FNL's groups with plain weight decay on the factors
    opt_name = args.opt.lower().split('_')[-1]
    if opt_name in FD_OPTIMIZERS:
        extra = dict(wd2fd=args.wd2fd)
        if args.no_frob:
            extra['fd_coef'] = 0.0
        optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **extra, **args.opt_kwargs)
    else:
        groups = fnl.param_groups(model, args.weight_decay, wd2fd=False, no_weight_decay_1d=True)
        optimizer = create_optimizer_v2(groups, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **args.opt_kwargs)

    amp_ctx, loss_scaler = nullcontext(), None
    if args.amp:
        amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
        amp_ctx = torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)

    # loaders and schedule
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    train_loader = _create_loader(train_ds, args.batch_size, True, args)
    val_loader = _create_loader(val_ds, eval_bs, False, args)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f'--batch-size {args.batch_size} is larger than the {len(train_ds)} training images '
                         f'per process')
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    milestones = args.decay_milestones or [int(round(0.5 * args.epochs)), int(round(0.75 * args.epochs))]
    # timm's multistep decays once t + 1 reaches a milestone; +1 gives torch's MultiStepLR meaning
    # (the new lr starts at the milestone epoch: epochs 0-99 at 0.1 for 200 epochs)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=[m + 1 for m in milestones],
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        updates_per_epoch=steps_per_epoch)

    recorder = fnl.FrobeniusNormRecorder(model) if args.dump_frobnorms else None
    normalizer = None
    if args.normalize:
        norms = fnl.load_frobnorms(args.normalize)
        normalizer = fnl.FrobeniusNormalizer(model, norms)
        if norms.shape[1] != steps_per_epoch:
            raise ValueError(f'--normalize: {args.normalize} was recorded with {norms.shape[1]} steps per epoch, '
                             f'this run has {steps_per_epoch}')

    start_epoch = 0
    if args.resume:
        with allow_argparse_namespace():
            start_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer, loss_scaler=loss_scaler,
                                            log_info=_is_main(args)) or 0
        if normalizer is not None:
            normalizer.load_state_dict({'index': start_epoch * steps_per_epoch})
        if recorder is not None:
            with allow_argparse_namespace():
                saved = torch.load(args.resume, map_location='cpu', weights_only=True).get('fnl', {}) or {}
            if 'frobnorms' in saved:
                recorder.load_state_dict({'norms': saved['frobnorms'].reshape(-1, saved['frobnorms'].shape[-1])})
        lr_scheduler.step(start_epoch)  # epoch-based schedulers
        lr_scheduler.step_update(start_epoch * steps_per_epoch)  # update-based ones

    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    # a new run never writes into an earlier run's folder (name-1, name-2, ... as in timm's train.py);
    # --resume continues in the run's own folder
    name = args.experiment or _experiment_name(args)
    out_dir = os.path.join(args.output, name)
    if _is_main(args):
        if args.resume:
            os.makedirs(out_dir, exist_ok=True)
        else:
            out_dir = get_outdir(args.output, name, inc=True)
    if args.distributed:
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)
        out_dir = shared[0]
    saver = writer = None
    if _is_main(args):
        _logger.info(f'writing to {out_dir}')
        saver = _Saver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                       checkpoint_dir=out_dir, recovery_dir=out_dir, decreasing=False,
                       max_history=args.checkpoint_hist,
                       extra_state=(lambda: {'frobnorms': recorder.norms(steps_per_epoch)}
                                    if recorder is not None and len(recorder) else None))
        if not args.no_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(out_dir)
            except ImportError:
                _logger.warning('tensorboard is not installed: no TensorBoard log (pip install tensorboard)')
        _logger.info(f'{args.model}: {stats.total_params:,} params ({stats.param_ratio:.4f} of dense '
                     f'{stats.dense_params:,}), rank_scale {getattr(model, "rank_scale", 0.0):.6g}')

    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    num_updates = start_epoch * steps_per_epoch
    eval_metrics: Dict[str, float] = {}
    best_top1 = None
    t0 = time.time()
    stop = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    for epoch in range(start_epoch, stop):
        train_loader.sampler.set_epoch(epoch)
        # augmentation randomness as a function of (seed, epoch, rank), so --resume continues exactly
        torch.manual_seed(args.seed * 100003 + epoch * 1009 + args.rank)
        lr = optimizer.param_groups[0]['lr']  # the lr this epoch trains with
        train_metrics, num_updates = _train_one_epoch(
            epoch, train_model, train_loader, optimizer, loss_fn, args, device, amp_ctx, loss_scaler,
            lr_scheduler, num_updates, normalizer, recorder, steps_per_epoch)
        if args.distributed:
            distribute_bn(model, args.world_size, reduce=True)
        eval_metrics = validate(model, val_loader, loss_fn, args, device, amp_ctx, args.limit_val_batches)
        lr_scheduler.step(epoch + 1, eval_metrics['top1'])
        if _is_main(args):
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(out_dir, 'summary.csv'), lr=lr,
                           write_header=epoch == 0)
            if writer is not None:
                for k, v in train_metrics.items():
                    writer.add_scalar(f'train/{k}', v, epoch)
                for k, v in eval_metrics.items():
                    writer.add_scalar(f'eval/{k}', v, epoch)
                writer.add_scalar('lr', lr, epoch)
            best_top1, _ = saver.save_checkpoint(epoch, metric=eval_metrics['top1'])
            _logger.info(f'epoch {epoch}: train loss {train_metrics["loss"]:.4f}, eval top1 '
                         f'{eval_metrics["top1"]:.2f}, lr {lr:.4g}')
    train_time = time.time() - t0

    results: Dict[str, Any] = OrderedDict(
        model=args.model, dataset=args.dataset, experiment=os.path.basename(out_dir),
        initial_checkpoint=args.initial_checkpoint, factorized_layers=n_factorized,
        rank_scale=float(getattr(model, 'rank_scale', 0.0) or 0.0), target_ratio=args.target_ratio,
        spectral=args.spectral, square=args.square, wd2fd=args.wd2fd, no_frob=args.no_frob,
        normalize=args.normalize, epochs=args.epochs, epochs_run=max(0, stop - start_epoch),
        top1=eval_metrics.get('top1'), top5=eval_metrics.get('top5'), eval_loss=eval_metrics.get('loss'),
        best_top1=best_top1, params=stats.total_params, dense_params=stats.dense_params,
        compression_ratio=stats.param_ratio, macs=stats.total_macs, dense_macs=stats.dense_macs,
        macs_ratio=stats.macs_ratio, train_seconds=train_time, world_size=args.world_size)

    if args.distributed:
        results['ddp_max_weight_diff'] = _max_diff_across_ranks(model)
    if recorder is not None and _is_main(args) and len(recorder):
        path = os.path.join(out_dir, 'frobnorms.pt')
        recorder.save(path, steps_per_epoch)
        results['frobnorms'] = path
    if args.collapse and stop == num_epochs:
        results.update(_collapse(model, val_loader, device, out_dir if _is_main(args) else None))
    if _is_main(args):
        with open(os.path.join(out_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=2)
        if writer is not None:
            writer.close()
        _logger.info(json.dumps(results))
    return results


@torch.no_grad()
def _max_diff_across_ranks(model: nn.Module) -> float:
    """The largest difference between any rank's parameters and buffers and rank 0's (DDP check)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values() if t.is_floating_point()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


@torch.no_grad()
def _collapse(model: nn.Module, loader: DataLoader, device: torch.device, out_dir: Optional[str]) -> Dict[str, Any]:
    """Collapse the factorized layers into dense ones; check the logits agree; save the dense state dict."""
    model.eval()
    x, _ = next(iter(loader))
    x = x.to(device)
    before = model(x).float()
    fnl.collapse(model)
    after = model(x).float()
    out = OrderedDict(collapsed_params=fnl.count_parameters(model),
                      collapse_max_abs_diff=float((before - after).abs().max()))
    if out_dir is not None:
        path = os.path.join(out_dir, 'model_collapsed.pth')
        torch.save(model.state_dict(), path)
        out['collapsed_model'] = path
    return out


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` like the command line and train; returns the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return train(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``fnl-train`` console script: bad input found while setting up (data, model) exits 2 with its message."""
    try:
        run(argv)
    except ValueError as e:
        print(f'fnl-train: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
