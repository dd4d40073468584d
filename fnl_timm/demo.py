"""``python -m fnl_timm.demo`` (``make demo``): the paper's main comparison in a few CPU minutes.

``fnl_resnet20`` on scikit-learn's digits (embedded, upsampled to 32x32), three ways:

1. dense;
2. factorized at a low rank with the default init (Kaiming normal per factor) and weight decay;
3. the same factorized model with spectral init and Frobenius decay (``--spectral --wd2fd``).

Each row is trained once per seed (``--seeds``, 3 by default) and reported as the mean, the
standard deviation and the range of the final validation accuracy over the seeds. Prints a table
(parameters, multiply-adds, accuracy, time) and saves ``demo.png`` (validation accuracy per epoch,
mean and range; the final accuracies, mean with a one-std error bar and each seed as a dot, on an
axis from 0) and ``demo.json`` in ``--output``.
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from . import train as fnl_train

RUNS = (
    ('dense', []),
    ('low rank, default init + wd', ['--rank-scale', '{rank_scale}']),
    ('low rank, spectral + FD', ['--rank-scale', '{rank_scale}', '--spectral', '--wd2fd']),
)
COLORS = ('tab:blue', 'tab:orange', 'tab:green')


def _curve(run_dir: str) -> List[float]:
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return [float(row['eval_top1']) for row in csv.DictReader(f)]


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values))


def plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(rows, COLORS):
        epochs = range(1, len(r['curve']) + 1)
        ax_curve.plot(epochs, r['curve'], marker='o', color=color, label=f"{r['run']} (mean)")
        lo = [min(c[i] for c in r['curves']) for i in range(len(r['curve']))]
        hi = [max(c[i] for c in r['curves']) for i in range(len(r['curve']))]
        ax_curve.fill_between(epochs, lo, hi, color=color, alpha=0.2)
    ax_curve.set_xlabel('epoch')
    ax_curve.set_ylabel('validation top-1 (%)')
    ax_curve.set_ylim(0, 100)
    n = len(rows[0]['top1_seeds']) if rows else 0
    ax_curve.set_title(f'fnl_resnet20, digits 32x32: mean and range, {n} seed(s)', fontsize=10)
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.legend(fontsize=8)
    xs = range(len(rows))
    ax_bar.bar(xs, [r['top1'] for r in rows], yerr=[r['top1_std'] for r in rows], capsize=6,
               color=COLORS[:len(rows)], alpha=0.8)
    for x, r in zip(xs, rows):
        ax_bar.plot([x] * len(r['top1_seeds']), r['top1_seeds'], 'k.', markersize=6)
    ax_bar.set_xticks(list(xs))
    ax_bar.set_xticklabels([f"{r['run']}\n{r['params']:,} params" for r in rows], fontsize=8)
    ax_bar.set_ylabel('final validation top-1 (%), mean ± std')
    ax_bar.set_ylim(0, 100)  # from 0, so the bars compare honestly
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The ``fnl-demo`` command line."""
    p = argparse.ArgumentParser(prog='fnl-demo', description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--rank-scale', type=float, default=0.05,
                   help='rank_scale of the two factorized runs, in (0, 1)')
    p.add_argument('--epochs', type=int, default=5, help='training epochs of each run')
    p.add_argument('--batch-size', type=int, default=64, help='training batch size')
    p.add_argument('--lr', type=float, default=0.05, help='initial learning rate of every run')
    p.add_argument('--weight-decay', type=float, default=5e-4,
                   help='weight decay of every run (the spectral + FD run uses it as the factors\' '
                        'Frobenius-decay coefficient)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the first run of each row')
    p.add_argument('--seeds', type=int, default=3,
                   help='runs per row, with seeds --seed, --seed + 1, ...; the table reports their mean and spread')
    p.add_argument('--output', default='demo_out', help='folder for the runs, the table and demo.png')
    p.add_argument('--limit-train-batches', type=int, default=None,
                   help='stop each epoch after this many batches, for a quick check (None: no limit)')
    return p


def run(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run the demo with command-line ``argv``; returns the table rows."""
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.rank_scale < 1:
        p.error(f'--rank-scale must be in (0, 1), got {args.rank_scale}')

    if args.seeds < 1:
        p.error(f'--seeds must be >= 1, got {args.seeds}')
    seeds = list(range(args.seed, args.seed + args.seeds))

    rows = []
    for name, extra in RUNS:
        exp = 'demo-' + name.split(',')[0].replace(' ', '') + ('-spectral-fd' if '--spectral' in extra else
                                                               ('-wd' if extra else ''))
        argv_run = ['--model', 'fnl_resnet20', '--dataset', 'digits', '--epochs', str(args.epochs),
                    '--batch-size', str(args.batch_size), '--lr', str(args.lr), '--weight-decay',
                    str(args.weight_decay), '--workers', '0', '--output', args.output,
                    '--no-tensorboard', '--device', 'cpu']
        if args.epochs >= 4:  # lr x0.1 for the last two epochs, then x0.1 again for the last one
            argv_run += ['--decay-milestones', str(args.epochs - 2), str(args.epochs - 1)]
        argv_run += [a.format(rank_scale=args.rank_scale) for a in extra]
        if args.limit_train_batches:
            argv_run += ['--limit-train-batches', str(args.limit_train_batches)]
        results, curves, t0 = [], [], time.time()
        for seed in seeds:
            print(f'\n== {name}, seed {seed}')
            res = fnl_train.run(argv_run + ['--seed', str(seed), '--experiment', f'{exp}-seed{seed}'])
            results.append(res)
            curves.append(_curve(os.path.join(args.output, res['experiment'])))
        top1 = spread([r['top1'] for r in results])
        rows.append(dict(run=name, params=results[0]['params'], macs=results[0]['macs'],
                         compression=results[0]['compression_ratio'], top1=top1['mean'], top1_std=top1['std'],
                         top1_min=top1['min'], top1_max=top1['max'], top1_seeds=[r['top1'] for r in results],
                         seeds=seeds, seconds=time.time() - t0,
                         curve=[statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))],
                         curves=curves))

    header = (f'{"run":<30} {"params":>9} {"ratio":>6} {"MMACs":>7} {"top-1 % mean ± std":>19} '
              f'{"min - max":>13} {"time s":>7}')
    lines = [f'{len(seeds)} seed(s) ({", ".join(map(str, seeds))}) per row, {args.epochs} epoch(s) each'
             + (f', {args.limit_train_batches} batches per epoch' if args.limit_train_batches else ''),
             header, '-' * len(header)]
    for r in rows:
        mean_std = f'{r["top1"]:.2f} ± {r["top1_std"]:.2f}'
        lines.append(f'{r["run"]:<30} {r["params"]:>9,} {r["compression"]:>6.3f} {r["macs"] / 1e6:>7.2f} '
                     f'{mean_std:>19} {r["top1_min"]:>6.2f}-{r["top1_max"]:<6.2f} {r["seconds"]:>7.1f}')
    print('\n' + '\n'.join(lines))
    os.makedirs(args.output, exist_ok=True)
    png = os.path.join(args.output, 'demo.png')
    plot(rows, png)
    with open(os.path.join(args.output, 'demo.json'), 'w') as f:
        json.dump(rows, f, indent=2)
    print(f'\nplot: {png}')
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
