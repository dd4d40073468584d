"""Any timm model, factorized (timm's ``fnl`` model): ViT-Tiny at patch 4 and ResNet-50 on 32x32 digits.

For each model three ``fnl-train`` runs on the embedded digits data (scikit-learn's, upsampled to
32x32): dense; low rank with the default init and weight decay; low rank with spectral init and
Frobenius decay (for the ViT also the query-key / output-value forms rebalanced by SVD:
``spectral_quekey`` / ``spectral_outval``). The ViT shrinks its heads (``attention='heads'``, the
paper's Transformer method) and factorizes its MLPs; ResNet-50 factorizes every conv but the stem.
Prints the table and writes ``timm_any.png`` (validation accuracy per epoch) and ``timm_any.json``.

    python recipes/timm_any.py                       # both models, the settings below
    python recipes/timm_any.py --models vit --epochs 3
    python recipes/timm_any.py --smoke               # every run for a few steps
"""
import csv
import os
from typing import Any, Dict, List

from _common import base_parser, finish, run

# model -> (fnl-train argv, model kwargs, smaller model kwargs for --smoke --small, the low-rank flags,
#           low-rank extra kwargs, spectral extra kwargs)
MODELS = {
    # heads shrunk to d_h = int(0.25 * 192 / 3) = 16, MLP linears at rank_scale 0.25
    'vit': (['--opt', 'fdadamw', '--lr', '1e-3', '--weight-decay', '0.05', '--sched', 'cosine', '--batch-size', '64'],
            ['base=vit_tiny_patch16_224', 'img_size=32', 'patch_size=4'], ['depth=2', 'embed_dim=48', 'num_heads=3'],
            ['--rank-scale', '0.25'], ['attention=heads'], ['spectral_quekey=True', 'spectral_outval=True']),
    # the paper's conv rank rule scales with out*kh, so rank_scale 0.25 keeps 0.67 of ResNet-50's parameters
    # (its 1x1 expansion convs grow): a target ratio instead
    'resnet50': (['--opt', 'fdmomentum', '--lr', '0.05', '--momentum', '0.9', '--weight-decay', '5e-4',
                  '--sched', 'cosine', '--batch-size', '64'],
                 ['base=resnet50'], ['channels=(8,16,32,64)', 'stem_width=8'], ['--target-ratio', '0.25'], [], []),
}
EPOCHS = 10


def _curve(run_dir: str) -> List[float]:
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return [float(row['eval_top1']) for row in csv.DictReader(f)]


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = sorted({r['model_name'] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r['model_name'] == model):
            ax.plot(range(1, len(r['curve']) + 1), r['curve'], marker='o',
                    label=f"{r['setting']} ({r['params']:,} params)")
        ax.set_title(f'{model} on digits (32x32)')
        ax.set_xlabel('epoch')
        ax.set_ylabel('validation top-1 (%)')
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():
    p = base_parser(__doc__)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS), help='which models to run')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.small and not args.smoke:
        raise SystemExit('--small only goes with --smoke')
    if not args.smoke and args.epochs is None:
        args.epochs = EPOCHS
    rows = []
    for model in args.models:
        flags, kwargs, small, rank, low_rank, spectral = MODELS[model]
        kwargs = kwargs + (small if args.small else [])
        settings = [('dense', [], []),
                    ('low rank, default init + wd', rank, low_rank),
                    ('low rank, spectral + FD', rank + ['--spectral', '--wd2fd'], low_rank + spectral)]
        for setting, extra, extra_kwargs in settings:
            name = f'{model}-' + ('dense' if not extra else 'lowrank-spectral-fd' if '--wd2fd' in extra else 'lowrank-wd')
            argv_run = (['--model', 'fnl', '--dataset', 'digits', '--img-size', '32', '--experiment', name]
                        + flags + extra + ['--model-kwargs'] + kwargs + extra_kwargs)
            res = run(argv_run, args)
            if res is not None:
                rows.append(dict(run=name, model_name=model, setting=setting, **res,
                                 curve=_curve(os.path.join(args.output, res['experiment']))))
    for r in rows:  # against the dense run: fnl.summary's dense count is that of the head-shrunk ViT
        dense = next((d for d in rows if d['model_name'] == r['model_name'] and d['setting'] == 'dense'), None)
        r['params_vs_dense_run'] = None if dense is None else r['params'] / dense['params']
    finish(rows, args, ['run', 'params', 'params_vs_dense_run', 'compression_ratio', 'macs_ratio', 'top1',
                        'train_seconds'], 'timm_any.json')
    if rows:
        png = os.path.join(args.output, 'timm_any.png')
        plot(rows, png)
        print(f'plot: {png}')
    return rows


if __name__ == '__main__':
    main()
