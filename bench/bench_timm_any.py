"""Throughput of timm's ``fnl`` model (any timm model, factorized) against the dense timm model.

Inference and training (forward + backward + momentum SGD step; Frobenius decay for the factorized
model) images per second of ``resnet50`` and ``vit_small_patch16_224`` at 224x224, dense against
``timm.create_model('fnl', base=..., rank_scale=...)`` (the ViT with ``attention='heads'``), timed
interleaved (``fnl.measure_latency``: medians, background load spread evenly); each speed-up is
printed next to the multiply-add ratio dense / factorized (the ideal speed-up) and their quotient.
With ``--channels-last`` both models also run channels-last (model and input; what ``fnl-train``
does on the CPU for factorized convs), in the same interleaved rounds, each speed-up against the
dense model in the contiguous format.

    python bench/bench_timm_any.py                            # CPU, batch 8
    python bench/bench_timm_any.py --models resnet50 --channels-last
    python bench/bench_timm_any.py --device cuda --batch-size 64 --repeats 20
    python bench/bench_timm_any.py --smoke                    # tiny widths, 32x32: checks the script runs
"""
import argparse
import copy
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402

# name -> (timm kwargs, fnl kwargs besides the rank, --smoke kwargs)
MODELS = {
    'resnet50': ({}, {}, dict(channels=(8, 16, 32, 64), stem_width=8)),
    'vit_small_patch16_224': ({}, dict(attention='heads'), dict(img_size=32, patch_size=8, depth=2)),
}


def _step_fn(model: torch.nn.Module, x: torch.Tensor, train: bool):
    if not train:
        model.eval()
        return lambda: model(x)
    model.train()
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    factorized = bool(fnl.factorized_layers(model))  # dense: plain momentum SGD, factorized: with FD
    opt = create_optimizer_v2(model, 'fdmomentum' if factorized else 'momentum', lr=1e-4, momentum=0.9,
                              weight_decay=1e-4)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench(name: str, rank_scale: float, device: torch.device, batch_size: int, repeats: int,
          smoke: bool, channels_last: bool = False) -> Dict[str, Any]:
    kwargs, fnl_kwargs, small = MODELS[name]
    kwargs = dict(kwargs, **(small if smoke else {}))
    dense = timm.create_model(name, **kwargs).to(device)
    fact = timm.create_model('fnl', base=name, rank_scale=rank_scale, **fnl_kwargs, **kwargs).to(device)
    size = dense.pretrained_cfg['input_size'] if not smoke else (3, 32, 32)
    x = torch.randn(batch_size, *size, device=device)
    macs_dense = fnl.count_macs(dense, size)
    macs_fact = fnl.count_macs(fact, size)
    row: Dict[str, Any] = dict(model=name, rank_scale=rank_scale, batch_size=batch_size, input=list(size),
                               params=sum(p.numel() for p in fact.parameters()),
                               dense_params=sum(p.numel() for p in dense.parameters()),
                               mac_speedup=macs_dense / macs_fact)
    cl = torch.channels_last
    for mode, train in (('infer', False), ('train', True)):
        steps = [_step_fn(dense, x, train), _step_fn(fact, x, train)]
        if channels_last:  # copies: .to(memory_format=...) changes a model in place
            x_cl = x.contiguous(memory_format=cl)
            fact_cl = copy.deepcopy(fact).to(memory_format=cl)
            fnl_timm.mark_factors(fact_cl)  # a copy's factors are new parameters: register them for fdmomentum
            steps += [_step_fn(copy.deepcopy(dense).to(memory_format=cl), x_cl, train), _step_fn(fact_cl, x_cl, train)]
        ms = fnl.measure_latency(steps, device, repeats=repeats, warmup=2, grad=train)
        row[f'{mode}_img_s_dense'] = batch_size * 1e3 / ms[0]
        row[f'{mode}_img_s_fnl'] = batch_size * 1e3 / ms[1]
        row[f'{mode}_speedup'] = ms[0] / ms[1]
        row[f'{mode}_of_mac_speedup'] = row[f'{mode}_speedup'] / row['mac_speedup']
        if channels_last:
            row[f'{mode}_speedup_dense_cl'] = ms[0] / ms[2]
            row[f'{mode}_speedup_fnl_cl'] = ms[0] / ms[3]
    return row


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS),
                   help='timm models to compare, each dense against factorized (default: %(default)s)')
    p.add_argument('--rank-scale', type=float, default=0.25, help='rank_scale of the factorized models')
    p.add_argument('--device', default='cpu', help='device to time on, e.g. cpu or cuda (default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=8, help='images per timed batch (default: %(default)s)')
    p.add_argument('--repeats', type=int, default=7, help='timed rounds (medians)')
    p.add_argument('--smoke', action='store_true', help='tiny widths at 32x32: checks that the script runs')
    p.add_argument('--channels-last', action='store_true',
                   help='also time both models channels-last (speed-ups against the dense model in NCHW)')
    p.add_argument('--json', default=None, help='also write the rows to this file')
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        p.error('--batch-size and --repeats must be >= 1')
    if not args.rank_scale > 0:
        p.error(f'--rank-scale must be > 0, got {args.rank_scale}')
    device = torch.device(args.device)
    rows = [bench(n, args.rank_scale, device, args.batch_size, args.repeats, args.smoke, args.channels_last)
            for n in args.models]
    cols = ('model', 'params', 'dense_params', 'mac_speedup', 'infer_img_s_dense', 'infer_img_s_fnl', 'infer_speedup',
            'infer_of_mac_speedup', 'train_img_s_dense', 'train_img_s_fnl', 'train_speedup', 'train_of_mac_speedup')
    if args.channels_last:
        cols += ('infer_speedup_dense_cl', 'infer_speedup_fnl_cl', 'train_speedup_dense_cl', 'train_speedup_fnl_cl')
    cells = [[f'{r[c]:.3g}' if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print('  '.join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
