"""Throughput of factorized against dense timm models (the models of docs/experiments.md).

Training (forward + backward + SGD step, with Frobenius decay for the factorized model) and inference images per second of
``fnl_resnet20`` at rank_scale 0.111 against dense ``fnl_resnet20``, and of ``fnl_wrn28_10`` at
target ratio 0.06667 against the dense WRN-28-10, on 32x32 inputs; each factorized/dense speed
ratio is printed next to the dense/factorized multiply-add ratio (the ideal speed-up).

    python bench/bench_timm.py                       # CPU, small batches
    python bench/bench_timm.py --device cuda --batch-size 128 --iters 50 --amp
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401

PAIRS = {
    'resnet20': ('fnl_resnet20', dict(rank_scale=0.111)),
    'wrn28_10': ('fnl_wrn28_10', dict(target_ratio=0.06667)),
}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def throughput(model: torch.nn.Module, device: torch.device, batch_size: int, iters: int, warmup: int,
               train: bool, amp: bool, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> float:
    """Images per second of ``iters`` timed steps after ``warmup`` untimed ones."""
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    dtype = amp_dtype or (torch.float16 if device.type == 'cuda' else torch.bfloat16)
    ctx = torch.autocast(device.type, dtype=dtype) if amp else torch.autocast(device.type, enabled=False)
    if train:
        model.train()
        factorized = bool(fnl.factorized_layers(model))  # dense: plain momentum SGD, factorized: with FD
        opt = create_optimizer_v2(model, 'fdmomentum' if factorized else 'momentum', lr=0.01, momentum=0.9,
                                  weight_decay=1e-4)

        def step() -> None:
            with ctx:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.no_grad()
        def step() -> None:
            with ctx:
                model(x)
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def bench_pair(key: str, device: torch.device, batch_size: int, iters: int, warmup: int,
               amp: bool, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> List[Dict[str, Any]]:
    name, kwargs = PAIRS[key]
    rows = []
    for label, kw in (('dense', {}), ('factorized', kwargs)):
        torch.manual_seed(0)
        model = timm.create_model(name, **kw)
        stats = fnl.summary(model, (3, 32, 32))
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the same parameters, FD registration kept
        kw_t = dict(amp_dtype=amp_dtype, channels_last=channels_last)
        rows.append(dict(
            model=name, variant=label, settings=kw, params=stats.total_params, macs=stats.total_macs,
            train_ips=throughput(model, device, batch_size, iters, warmup, True, amp, **kw_t),
            infer_ips=throughput(model, device, batch_size, iters, warmup, False, amp, **kw_t)))
    dense, fact = rows
    fact['train_speedup'] = fact['train_ips'] / dense['train_ips']
    fact['infer_speedup'] = fact['infer_ips'] / dense['infer_ips']
    fact['mac_ratio'] = dense['macs'] / fact['macs']
    fact['param_ratio'] = fact['params'] / dense['params']
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=list(PAIRS), choices=list(PAIRS),
                   help='model pairs (factorized against dense) to time (default: all)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='where to run (default: cuda when available, else cpu)')
    p.add_argument('--batch-size', type=int, default=None, help='default: 128 on CUDA, 32 (ResNet) / 8 (WRN) on CPU')
    p.add_argument('--iters', type=int, default=None, help='timed steps (default: 30 CUDA, 5 CPU)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (default: 2)')
    p.add_argument('--amp', action='store_true', help='autocast (float16 on CUDA, bfloat16 on CPU)')
    p.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'],
                   help='autocast dtype with --amp (default: float16 on CUDA, bfloat16 on CPU)')
    p.add_argument('--channels-last', action='store_true', help='models and inputs in channels-last memory format')
    p.add_argument('--json', default=None, help='also write the rows to this file')
    args = p.parse_args(argv)
    if args.amp_dtype and not args.amp:
        p.error('--amp-dtype needs --amp')
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    device = torch.device(args.device)
    for name in ('batch_size', 'iters'):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1, got {v}')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    rows = []
    for key in args.models:
        cpu_bs = 32 if key == 'resnet20' else 8
        bs = args.batch_size or (128 if device.type == 'cuda' else cpu_bs)
        iters = args.iters or (30 if device.type == 'cuda' else 5)
        rows += bench_pair(key, device, bs, iters, args.warmup, args.amp, amp_dtype, args.channels_last)

    print(f'device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, amp {args.amp} ({args.amp_dtype or "default dtype"}), '
          f'channels-last {args.channels_last}')
    head = (f'{"model":<14} {"variant":<11} {"params":>11} {"MMACs":>9} {"train img/s":>12} {"infer img/s":>12} '
            f'{"train x":>8} {"infer x":>8} {"MAC x":>7}')
    print(head)
    print('-' * len(head))
    for r in rows:
        extra = (f'{r["train_speedup"]:>8.2f} {r["infer_speedup"]:>8.2f} {r["mac_ratio"]:>7.2f}'
                 if 'mac_ratio' in r else f'{"":>8} {"":>8} {"":>7}')
        print(f'{r["model"]:<14} {r["variant"]:<11} {r["params"]:>11,} {r["macs"] / 1e6:>9.1f} '
              f'{r["train_ips"]:>12.1f} {r["infer_ips"]:>12.1f} {extra}')
    print('train x / infer x: factorized speed / dense speed; MAC x: dense MACs / factorized MACs (ideal)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
