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
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
import torch.distributed as dist

import timm
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler, distribute_bn, get_outdir, init_distributed_device, update_summary

import fnl

from . import data as fnl_data
from ._serialization import allow_argparse_namespace
from .compress import _state_dict_of, is_compressed_checkpoint, load_compressed
from .optim import FD_OPTIMIZERS, mark_factors
from .train_args import _experiment_name, _initial_checkpoint, build_parser, validate_args
from .train_checkpoint import _Saver
from .train_loop import _collapse, _create_loader, _is_main, _max_diff_across_ranks, _train_one_epoch, validate

__all__ = ['build_parser', 'validate_args', 'validate', 'train', 'run', 'main']

_logger = logging.getLogger('fnl_train')


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