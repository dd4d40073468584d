"""``fnl-train``'s loops: data loaders, one training epoch, evaluation, the DDP weight check and the
final collapse to dense layers."""
import argparse
import os
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

import fnl


def _is_main(args: argparse.Namespace) -> bool:
    return args.rank == 0


def _create_loader(ds, batch_size: int, train: bool, args: argparse.Namespace) -> DataLoader:
    # one sampler for both cases: deterministic per-epoch shuffling (set_epoch), DDP sharding
    sampler = DistributedSampler(ds, num_replicas=args.world_size, rank=args.rank, shuffle=train,
                                 seed=args.seed, drop_last=train)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
                      drop_last=train, pin_memory=args.device.startswith('cuda'),
                      persistent_workers=False)

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
