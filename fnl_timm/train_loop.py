"""``fnl-train``'s loops: data loaders, one training epoch (stop signals, divergence, progress),
evaluation, the DDP weight check and the final collapse to dense layers."""
import argparse
import logging
import os
import random
import signal
import sys
import threading
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

import fnl

from .train_checkpoint import atomic_torch_save

_logger = logging.getLogger('fnl_train')


def _is_main(args: argparse.Namespace) -> bool:
    return args.rank == 0


class ResumableSampler(DistributedSampler):
    """timm-style DDP sharding with deterministic per-epoch shuffling (``set_epoch``) that yields
    ``(index, seed)`` pairs: the seed of each sample's augmentation is a function of (``--seed``,
    epoch, index) only, so it does not depend on the worker process that loads it, and a run stopped
    mid-epoch continues with the same samples and the same augmentation (``skip``)."""

    def __init__(self, *args: Any, augment_seed: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.augment_seed = augment_seed
        self.skip = 0  # samples of this rank's share to leave out this epoch (a mid-epoch resume)

    def __iter__(self) -> Iterator:
        indices = list(super().__iter__())[self.skip:]
        if self.augment_seed is None:
            return iter(indices)
        base = (self.augment_seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, (base + i) % (2 ** 63)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class SeededDataset(Dataset):
    """Applies ``dataset[index]`` with the torch and Python random generators seeded per sample (the
    caller's generator states are put back), for :class:`ResumableSampler`'s ``(index, seed)`` pairs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        if get_worker_info() is not None:  # a loader process: nothing else draws from its generators
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return self.dataset[index]
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        # the CPU generator the transforms draw from (torch.manual_seed also seeds every accelerator's: 90 us, not 1)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)


def _create_loader(ds, batch_size: int, train: bool, args: argparse.Namespace) -> DataLoader:
    # one sampler for both cases: deterministic per-epoch shuffling (set_epoch), DDP sharding
    sampler = ResumableSampler(ds, num_replicas=args.world_size, rank=args.rank, shuffle=train,
                               seed=args.seed, drop_last=train, augment_seed=args.seed if train else None)
    return DataLoader(SeededDataset(ds) if train else ds, batch_size=batch_size, sampler=sampler,
                      num_workers=args.workers, drop_last=train, pin_memory=args.device.startswith('cuda'),
                      persistent_workers=False)


class StopSignal:
    """SIGTERM / SIGINT handlers that ask the training loop to stop after the current step.

    A second signal of either kind restores the default handlers and re-raises it, stopping at once.
    Used as a context manager; the previous handlers are put back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        _logger.warning(f'{signal.Signals(signum).name} received: stopping after the current step and writing a '
                        f'checkpoint to resume from (send it again to stop at once, without one)')

    def __enter__(self) -> 'StopSignal':
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class Diverged(Exception):
    """Training produced a non-finite loss or gradient norm."""

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f'{what} at epoch {epoch}, step {step}')
        self.epoch, self.step, self.what = epoch, step, what


def rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and CUDA) and Python random states, for a mid-epoch checkpoint."""
    state = {'torch': torch.get_rng_state(), 'python': list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate((3, tuple(int(v) for v in state['python']), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _meters_state(*meters: AverageMeter) -> List[Tuple[Any, int]]:
    return [(torch.as_tensor(m.sum).detach().cpu(), int(m.count)) for m in meters]


def _load_meters(meters: Sequence[AverageMeter], state: Sequence[Tuple[Any, int]], device) -> None:
    for m, (total, count) in zip(meters, state):
        m.sum, m.count = torch.as_tensor(total).to(device), count
        m.avg = m.sum / max(count, 1)


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, amp_ctx, loss_scaler,
                    lr_scheduler, num_updates, normalizer, recorder, steps_per_epoch, stop: StopSignal,
                    start_step: int = 0, resume_state: Optional[Dict[str, Any]] = None):
    """Train ``steps_per_epoch`` steps of ``epoch`` from ``start_step``.

    Returns ``(metrics, num_updates, stopped_at)``: ``stopped_at`` is None for a finished epoch, or the
    number of steps done when a stop signal ended the epoch early (then ``metrics`` holds the per-rank
    state to resume from). Raises :class:`Diverged` on a non-finite loss or gradient norm; under a
    GradScaler a skipped step (non-finite gradients) is not one, a loss scale below 1e-4 is.
    """
    model.train()
    losses = AverageMeter()
    top1 = AverageMeter()
    if resume_state is not None:
        _load_meters((losses, top1), resume_state['meters'], device)
    iterator = iter(loader)
    if resume_state is not None:  # after iter(): creating it draws from the generator
        set_rng_state(resume_state['rng'])
    bar = None
    periodic = _is_main(args) and (args.no_progress or not sys.stderr.isatty())
    if _is_main(args) and not periodic:
        from tqdm import tqdm
        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f'epoch {epoch}', leave=False,
                   dynamic_ncols=True)
    # the first step with a non-finite loss / grad norm, kept on the device (no host sync per step)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    scale = getattr(loss_scaler, '_scaler', None)
    params = [p for p in model.parameters() if p.requires_grad]
    stopped_at = None
    for step in range(start_step, steps_per_epoch):
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
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params)
            # GradScaler skips steps with non-finite gradients and lowers the scale; it diverged if that never ends
            bad = (scale._scale < 1e-4).reshape(()) if getattr(scale, '_scale', None) is not None else None
        else:
            loss.backward()
            bad = ~torch.isfinite(loss.detach())
            if args.clip_grad is not None and args.clip_mode == 'norm':
                bad = bad | ~torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.clip_grad))
            elif args.clip_grad is not None:
                dispatch_clip_grad(params, args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if bad is not None:
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        if normalizer is not None:
            normalizer.step()
        if recorder is not None:
            recorder.record()
        num_updates += 1
        lr_scheduler.step_update(num_updates=num_updates)
        losses.update(loss.detach(), x.size(0))
        top1.update(accuracy(out.detach(), y)[0], x.size(0))
        last = step == steps_per_epoch - 1
        at_interval = (step + 1) % args.log_interval == 0 or last
        if bar is not None:
            bar.update(1)
        # one host sync per --log-interval steps (every rank at the same steps): the divergence check, the
        # stop decision of all ranks together, and the log line
        if at_interval or (not args.distributed and stop.signum is not None):
            flags = torch.stack([torch.where(first_bad >= 0, steps_per_epoch - first_bad, 0),
                                 torch.full_like(first_bad, int(stop.signum is not None and not last))])
            if args.distributed:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_step, stopping = int(flags[0]), bool(flags[1])
            if bad_step:
                raise Diverged(epoch, steps_per_epoch - bad_step,
                               'loss scale below 1e-4' if scale is not None else 'non-finite loss or gradient norm')
            if _is_main(args) and at_interval:
                lr = optimizer.param_groups[0]['lr']
                if bar is not None:
                    bar.set_postfix(loss=f'{float(losses.avg):.4f}', lr=f'{lr:.4g}')
                else:
                    _logger.info(f'Train: {epoch} [{step + 1:>{len(str(steps_per_epoch))}d}/{steps_per_epoch} '
                                 f'({100 * (step + 1) / steps_per_epoch:>3.0f}%)]  loss {float(loss.detach()):.4f} '
                                 f'({float(losses.avg):.4f})  lr {lr:.4g}')
            if stopping:
                stopped_at = step + 1
                break
    if bar is not None:
        bar.close()
    if stopped_at is not None:
        return {'meters': _meters_state(losses, top1), 'rng': rng_state()}, num_updates, stopped_at
    loss_avg, top1_avg = losses.avg, top1.avg
    if args.distributed:
        loss_avg = reduce_tensor(torch.as_tensor(loss_avg, device=device, dtype=torch.float32), args.world_size)
        top1_avg = reduce_tensor(torch.as_tensor(top1_avg, device=device, dtype=torch.float32), args.world_size)
    return OrderedDict(loss=float(loss_avg), top1=float(top1_avg)), num_updates, None


def all_finite(model: nn.Module) -> bool:
    """Whether every floating parameter and buffer is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


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
        atomic_torch_save(model.state_dict(), path)
        out['collapsed_model'] = path
    return out
