"""``fnl-train``: train a factorized vision model the way the paper does (sections 2-5; docs/method.md,
docs/experiments.md).

Built from timm's pieces: ``timm.create_model`` (the ``fnl_*`` zoo), ``timm.data.create_dataset``,
``timm.optim.create_optimizer_v2`` (the Frobenius-decay optimizers of ``fnl_timm.optim``),
``timm.scheduler.create_scheduler_v2``, and ``timm.utils`` (CheckpointSaver, update_summary,
AverageMeter, accuracy, NativeScaler, dispatch_clip_grad, distributed helpers).

Examples::

    fnl-train                                            # fnl_resnet20 on the embedded digits
    fnl-train --dataset cifar10 --data-dir data --download --rank-scale 0.111 --spectral --wd2fd
    torchrun --nproc-per-node 2 -m fnl_timm.train --device cpu --epochs 2

Outputs in ``--output/<experiment>``: ``summary.csv``, TensorBoard events, ``results.json``,
checkpoints (``last.pth.tar``, best ones), ``hf/`` (the best model as timm's own folder of a model
with its arguments, ``config.json`` + ``model.safetensors``: ``--model local-dir:RUN/hf`` in timm's
scripts, ``timm.create_model('local-dir:RUN/hf', pretrained=True)``), ``frobnorms.pt``
(``--dump-frobnorms``) and ``model_collapsed.pth`` (``--collapse``: a state dict for the dense
model). Every file is written through a temporary file and a rename; ``--resume`` continues in the
checkpoint's own folder; a stop signal writes a checkpoint that continues at the step it stopped at
(see ``fnl-train --help``).
"""
import argparse
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.distributed as dist

import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.layers import convert_sync_batchnorm
from timm.utils import NativeScaler, distribute_bn, init_distributed_device

import fnl

from . import data as fnl_data
from .compress import _state_dict_of, is_compressed_checkpoint, load_compressed
from .models._factorize import prefers_channels_last
from .optim import FD_OPTIMIZERS, mark_factors
from .train_args import _experiment_name, _initial_checkpoint, build_parser, validate_args
from .train_checkpoint import (
    Saver, TrainingStopped, atomic_torch_save, check_resume_args, check_resume_folder, check_writable,
    load_resume_checkpoint, new_run_dir, read_results, remove_stale_tmp, restore_training_state, resume_position,
    save_best_for_timm, strict_json, update_summary, write_results,
)
from .train_loop import (
    Diverged, StopSignal, _collapse, _create_loader, _is_main, _max_diff_across_ranks, all_finite, train_one_epoch,
    validate,
)

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
        except (RuntimeError, ValueError) as e:  # torch's mismatch, or fnl.CheckpointMismatchError (adoption)
            raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} does not fit --model {args.model!r} '
                             f'with {model_kwargs}: {str(e).splitlines()[0]}') from None
    return model


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training job; returns the results dict written to ``results.json`` (on every rank).

    Raises:
        ValueError: bad arguments or input files (one line naming the flag).
        OSError: the run folder cannot be written (one line naming the file and the reason).
        TrainingStopped: a stop signal (a resumable checkpoint was written) or divergence.
    """
    validate_args(args)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.sync_bn and not args.device.startswith('cuda'):
        raise ValueError(f'--sync-bn needs CUDA devices (torch\'s SyncBatchNorm synchronises GPU tensors only), got '
                         f'--device {args.device}; on the CPU, BatchNorm statistics are averaged over the processes '
                         f'at the end of each epoch')
    args.dist_backend = getattr(args, 'dist_backend', None)
    args.dist_url = getattr(args, 'dist_url', None)
    device = init_distributed_device(args)
    try:
        with StopSignal() as stop:
            return _train(args, device, stop)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def use_channels_last(requested: Optional[bool], model: nn.Module, device: torch.device) -> bool:
    """Whether ``fnl-train`` runs the model and its inputs in the channels-last memory format.

    ``requested`` is ``--channels-last`` (True) / ``--no-channels-last`` (False); unset (None) it is on
    on the CPU for a model with 2-d convs (``fnl_timm.models.prefers_channels_last``), where oneDNN runs
    them faster channels-last: the factorized ones' small (1 x k) / (k x 1) convs far faster (training
    and inference steps 1.2-1.9x), dense convs 1.04-1.35x (docs/speed.md), so dense and factorized runs
    are timed alike. Off elsewhere (not measured on GPUs). The memory format changes neither what the
    model computes nor its checkpoints' values.
    """
    if requested is not None:
        return requested
    return device.type == 'cpu' and prefers_channels_last(model)


def _set_input_format(model: nn.Module, channels_last: bool) -> None:
    """The fnl_* zoo models convert CPU inputs to channels-last themselves (``channels_last_inputs``):
    make them follow ``--channels-last`` / ``--no-channels-last`` too."""
    if hasattr(model, 'channels_last_inputs'):
        model.channels_last_inputs = channels_last


def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[Any, Optional[NativeScaler]]:
    """(autocast context, loss scaler) of ``--amp``: bfloat16 on the CPU, float16 with timm's GradScaler on CUDA."""
    if not args.amp:
        return nullcontext(), None
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    return torch.autocast(device_type=device.type, dtype=amp_dtype), scaler


def _read_resume(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The ``--resume`` checkpoint, its flags checked against this run's, before any data is read."""
    if not args.resume:
        return None
    ckpt = load_resume_checkpoint(args.resume)
    check_resume_args(args, ckpt.get('args'), args.resume)
    check_resume_folder(args.resume, ckpt, args.model)
    mid = (ckpt.get('fnl') or {}).get('mid_epoch')
    if mid and mid['world_size'] != args.world_size:
        raise ValueError(f'--resume {args.resume!r} was written mid-epoch by {mid["world_size"]} process(es); '
                         f'continue it with the same number of processes (this run has {args.world_size})')
    return ckpt


def _train(args: argparse.Namespace, device: torch.device, stop: StopSignal) -> Dict[str, Any]:
    resumed = _read_resume(args)
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
    args.channels_last = use_channels_last(args.channels_last, model, device)  # resolved: recorded in checkpoints
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    _set_input_format(model, args.channels_last)
    if args.sync_bn and args.distributed:  # as timm's train.py: before the optimizer and the DDP wrapper
        model = convert_sync_batchnorm(model)

    # optimizer: FD optimizers find the factors through mark_factors (FD instead of weight decay with
    # --wd2fd); any other optimizer gets FNL's groups with plain weight decay on the factors
    opt_name = args.opt.lower().split('_')[-1]
    if opt_name in FD_OPTIMIZERS:
        extra = dict(wd2fd=args.wd2fd)
        if args.wd2fd_quekey or args.wd2fd_outval:  # FD on timm attention's per-head forms
            extra.update(wd2fd_quekey=args.wd2fd_quekey, wd2fd_outval=args.wd2fd_outval)
        if args.no_frob:
            extra['fd_coef'] = 0.0
        optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **extra, **args.opt_kwargs)
    else:
        groups = fnl.param_groups(model, args.weight_decay, wd2fd=False, no_weight_decay_1d=True)
        optimizer = create_optimizer_v2(groups, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **args.opt_kwargs)

    amp_ctx, loss_scaler = _amp(args, device)

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
        norms = fnl.load_frobnorms(args.normalize, '--normalize')
        try:
            normalizer = fnl.FrobeniusNormalizer(model, norms)
        except ValueError as e:  # recorded for another model
            raise ValueError(f'--normalize {args.normalize!r}: {e}') from None
        if norms.shape[1] != steps_per_epoch:
            raise ValueError(f'--normalize: {args.normalize} was recorded with {norms.shape[1]} steps per epoch, '
                             f'this run has {steps_per_epoch}')

    start_epoch, start_step, mid = 0, 0, None
    if resumed is not None:
        restore_training_state(resumed, model, optimizer, loss_scaler)
        _set_input_format(model, args.channels_last)  # loading may adopt ranks, which resets the zoo's default
        start_epoch, start_step = resume_position(resumed)
        mid = (resumed.get('fnl') or {}).get('mid_epoch')
        done = start_epoch * steps_per_epoch + start_step
        if normalizer is not None:
            normalizer.load_state_dict({'index': done})
        saved = resumed.get('fnl') or {}
        if recorder is not None and 'frobnorms' in saved:
            recorder.load_state_dict({'norms': saved['frobnorms'].reshape(-1, saved['frobnorms'].shape[-1])})
        lr_scheduler.step(start_epoch)  # epoch-based schedulers
        lr_scheduler.step_update(done)  # update-based ones

    # a new run never writes into an earlier run's folder (name-1, name-2, ... as in timm's train.py);
    # --resume continues in the folder of its checkpoint, whatever --output and --experiment say
    stop_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    if resumed is not None:
        out_dir = os.path.dirname(args.resume) or '.'
        # trained to the end: done, unless the end (timm folder, results) was cut short by a kill
        finishing = start_epoch >= stop_epoch
        finished = read_results(out_dir) if finishing else None
        if finished is not None and finished.get('epochs_run') == start_epoch:
            if _is_main(args):
                remove_stale_tmp(out_dir)  # a kill while the timm folder was replaced: the previous one is put back
            return _nothing_to_do(args, finished, out_dir, start_epoch, stop_epoch)
    else:
        finishing = False
        if _is_main(args):
            out_dir = new_run_dir(args.output, args.experiment or _experiment_name(args))
    if args.distributed:
        shared = [out_dir if _is_main(args) else None]
        dist.broadcast_object_list(shared, src=0)
        out_dir = shared[0]

    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.torchcompile:  # after DDP, as timm's train.py; saving, validation and the optimizer use `model`
        train_model = torch.compile(train_model, backend=args.torchcompile, mode=args.torchcompile_mode)

    saver = writer = None
    if _is_main(args):
        check_writable(out_dir)
        remove_stale_tmp(out_dir)
        _logger.info(f'writing to {out_dir}' + (' (the folder of --resume)' if resumed is not None else ''))
        saver = Saver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                      checkpoint_dir=out_dir, recovery_dir=out_dir, decreasing=False,
                      max_history=args.checkpoint_hist,
                      extra_state=(lambda: {'frobnorms': recorder.state_dict()['norms']}
                                   if recorder is not None and len(recorder) else None))
        if resumed is not None:
            saver.restore(resumed, args.resume)
        if not args.no_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(out_dir, purge_step=start_epoch if resumed is not None else None)
            except ImportError:
                _logger.warning('tensorboard is not installed: no TensorBoard log (pip install tensorboard)')
        _logger.info(f'{args.model}: {stats.total_params:,} params ({stats.param_ratio:.4f} of dense '
                     f'{stats.dense_params:,}), rank_scale {getattr(model, "rank_scale", 0.0):.6g}, '
                     f'{"channels-last" if args.channels_last else "contiguous (NCHW)"} memory format')
        if finishing:
            _logger.warning(f'--resume {args.resume}: the run has trained its {start_epoch} epoch(s), but its '
                            'results.json is missing or older (stopped while finishing): evaluating the model and '
                            'writing what the end of the run writes')
        elif resumed is not None:
            _logger.info(f'resuming at epoch {start_epoch}' + (f', step {start_step}' if start_step else '')
                         + f' of {num_epochs}')

    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    num_updates = start_epoch * steps_per_epoch + start_step
    eval_metrics: Dict[str, float] = {}
    t0 = time.time()
    try:
        for epoch in range(start_epoch, stop_epoch):
            train_loader.sampler.set_epoch(epoch)
            torch.manual_seed(args.seed * 100003 + epoch * 1009 + args.rank)  # dropout etc., per rank
            first = mid is not None and epoch == start_epoch
            train_loader.sampler.skip = start_step * args.batch_size if first else 0
            lr = mid['lr'] if first else optimizer.param_groups[0]['lr']  # the lr this epoch trains with
            try:
                train_metrics, num_updates, stopped_at = train_one_epoch(
                    epoch, train_model, train_loader, optimizer, loss_fn, args, device, amp_ctx, loss_scaler,
                    lr_scheduler, num_updates, normalizer, recorder, steps_per_epoch, stop,
                    start_step=start_step if first else 0, resume_state=mid['ranks'][args.rank] if first else None)
            except Diverged as e:
                raise _diverged(args, e, out_dir) from None
            if stopped_at is not None:
                _stop_mid_epoch(args, model, saver, stop, epoch, stopped_at, steps_per_epoch, train_metrics,
                                num_updates, lr)
            if args.distributed:
                distribute_bn(model, args.world_size, reduce=True)
            eval_metrics = validate(model, val_loader, loss_fn, args, device, amp_ctx, args.limit_val_batches)
            lr_scheduler.step(epoch + 1, eval_metrics['top1'])
            if not all_finite(model):
                raise _diverged(args, Diverged(epoch, steps_per_epoch, 'non-finite weights'), out_dir)
            if _is_main(args):
                update_summary(os.path.join(out_dir, 'summary.csv'), epoch, train_metrics, eval_metrics, lr)
                if writer is not None:
                    for k, v in train_metrics.items():
                        writer.add_scalar(f'train/{k}', v, epoch)
                    for k, v in eval_metrics.items():
                        writer.add_scalar(f'eval/{k}', v, epoch)
                    writer.add_scalar('lr', lr, epoch)
                saver.save_checkpoint(epoch, metric=eval_metrics['top1'])
                _logger.info(f'epoch {epoch}: train loss {train_metrics["loss"]:.4f}, eval top1 '
                             f'{eval_metrics["top1"]:.2f}, lr {lr:.4g}')
            if _signalled(args, stop) and epoch + 1 < stop_epoch:
                last = os.path.join(out_dir, 'last.pth.tar')
                raise TrainingStopped(f'stopped by {signal.Signals(_signum(stop)).name} after epoch {epoch}: resume '
                                      f'with --resume {last} (continues at epoch {epoch + 1})',
                                      128 + _signum(stop))
        if finishing:  # no epoch left: the final metrics of the model as it is
            eval_metrics = validate(model, val_loader, loss_fn, args, device, amp_ctx, args.limit_val_batches)
    finally:
        if writer is not None:
            writer.close()
    train_time = time.time() - t0

    best_top1 = saver.best_metric if saver is not None else None
    results: Dict[str, Any] = OrderedDict(
        model=args.model, dataset=args.dataset, experiment=os.path.basename(os.path.abspath(out_dir)),
        initial_checkpoint=args.initial_checkpoint, factorized_layers=n_factorized,
        rank_scale=float(getattr(model, 'rank_scale', 0.0) or 0.0), target_ratio=args.target_ratio,
        spectral=args.spectral, square=args.square, wd2fd=args.wd2fd, no_frob=args.no_frob,
        normalize=args.normalize, epochs=args.epochs, epochs_run=stop_epoch, start_epoch=start_epoch,
        top1=eval_metrics.get('top1'), top5=eval_metrics.get('top5'), eval_loss=eval_metrics.get('loss'),
        best_top1=best_top1, params=stats.total_params, dense_params=stats.dense_params,
        compression_ratio=stats.param_ratio, macs=stats.total_macs, dense_macs=stats.dense_macs,
        macs_ratio=stats.macs_ratio, train_seconds=train_time, world_size=args.world_size,
        channels_last=args.channels_last)

    if args.distributed:
        results['ddp_max_weight_diff'] = _max_diff_across_ranks(model)
    if saver is not None:  # the best model as timm's local-dir folder (before --collapse changes the model)
        results.update(save_best_for_timm(model, out_dir, info))
        if results['hf']:
            _logger.info(f"best model for timm: {results['hf']} (--model local-dir:{results['hf']} in timm's scripts)")
        else:
            _logger.warning(f"no timm folder for the best model: {results['hf_note']}")
    if recorder is not None and _is_main(args) and len(recorder):
        path = os.path.join(out_dir, 'frobnorms.pt')
        norms = recorder.norms(steps_per_epoch)
        atomic_torch_save(norms, path)
        results['frobnorms'] = path
    if args.collapse and stop_epoch == num_epochs:
        results.update(_collapse(model, val_loader, device, out_dir if _is_main(args) else None))
    results = strict_json(results)
    if _is_main(args):
        write_results(os.path.join(out_dir, 'results.json'), results)
        _logger.info(json.dumps(results))
    return results


def _signum(stop: StopSignal) -> int:
    return stop.signum or signal.SIGTERM


def _signalled(args: argparse.Namespace, stop: StopSignal) -> bool:
    """Whether any rank got a stop signal (all ranks agree)."""
    flag = stop.signum is not None
    if args.distributed:
        t = torch.tensor([float(flag), float(stop.signum or 0)], device=dist_device(args))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t[0])
        if flag and stop.signum is None:
            stop.signum = int(t[1])
    return flag


def dist_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device if args.device.startswith('cuda') else 'cpu')


def _stop_mid_epoch(args, model, saver, stop, epoch, step, steps_per_epoch, rank_state, num_updates, lr) -> None:
    """Write the resumable mid-epoch checkpoint (rank 0, with every rank's random state and meters) and stop."""
    ranks = [rank_state]
    if args.distributed:
        ranks = [None] * args.world_size
        dist.all_gather_object(ranks, rank_state)
        stop.signum = stop.signum or _signum(stop)
    name = signal.Signals(_signum(stop)).name
    if not all_finite(model):
        raise TrainingStopped(f'stopped by {name} at epoch {epoch}, step {step}, with non-finite weights: nothing '
                              'written', 1)
    path = None
    if _is_main(args):
        path = saver.save_mid_epoch(epoch, step, {'ranks': ranks, 'world_size': args.world_size,
                                                  'num_updates': num_updates, 'lr': lr})
    if args.distributed:
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    raise TrainingStopped(f'stopped by {name} at epoch {epoch}, step {step} of {steps_per_epoch}: resume with '
                          f'--resume {path} (continues at this step, with the result of an uninterrupted run)',
                          128 + _signum(stop))


def _diverged(args: argparse.Namespace, e: Diverged, out_dir: str) -> TrainingStopped:
    last = os.path.join(out_dir, 'last.pth.tar')
    kept = (f'the last finite checkpoint, {last}, is kept' if os.path.exists(last)
            else 'no checkpoint was written')
    hint = 'a lower --lr (now {:g})'.format(args.lr)
    if args.clip_grad is None:
        hint += ' or gradient clipping (--clip-grad 1.0)'
    return TrainingStopped(f'training diverged: {e.what} at epoch {e.epoch}, step {e.step}; nothing of this epoch '
                           f'was saved and {kept}. Try {hint}', 1)


def _nothing_to_do(args: argparse.Namespace, results: Dict[str, Any], out_dir: str, start_epoch: int,
                   stop_epoch: int) -> Dict[str, Any]:
    """A resume of a finished run (``results`` its ``results.json``) with no epoch left below --epochs /
    --stop-epoch: say so, change nothing, return its results."""
    limit = f'--stop-epoch {args.stop_epoch}' if stop_epoch < args.epochs else f'--epochs {args.epochs}'
    if _is_main(args):
        _logger.warning(f'--resume {args.resume}: the run has trained {start_epoch} epoch(s), {limit}: nothing left '
                        f'to train; {out_dir} is unchanged (give a larger --epochs to train on)')
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
    """The ``fnl-train`` console script. Bad input found while setting up (data, model, --resume) exits 2, an
    unwritable run folder or a diverged run 1, a stop signal 128 + its number (143 for SIGTERM, 130 for
    SIGINT) after writing a checkpoint to resume from; each with one line on stderr."""
    rank = os.environ.get('RANK')
    prog = 'fnl-train' if rank in (None, '0') or os.environ.get('WORLD_SIZE', '1') == '1' else f'fnl-train[rank {rank}]'
    try:
        run(argv)
    except ValueError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f'{prog}: {e}', file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f'{prog}: error: {e.strerror if e.filename is None else f"cannot write {e.filename}: {e.strerror}"}'
              if e.strerror else f'{prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
