"""The normalisation experiment (paper section 3.3; docs/experiments.md#normalisation).

ResNet20 on CIFAR-10 at rank_scale 0.111, three runs, each with and without spectral init:

* none: ``--no-frob --wd2fd`` (factors unregularised),
* frob: ``--dump-frobnorms --wd2fd`` (Frobenius decay; records ||U Vᵀ||_F after every step),
* norm: ``--no-frob --normalize <frob>/frobnorms.pt --wd2fd`` (no FD, but every layer's product
  norm is forced along the frob run's trajectory).

Every run records its norms; ``normalization.png`` plots the mean product norm per step and the
accuracies, ``normalization.json`` holds the table.

    python recipes/normalization.py --data-dir data --download
    python recipes/normalization.py --smoke
"""
import os

from _common import base_parser, experiment_dir, finish, run

PAPER = ['--model', 'fnl_resnet20', '--dataset', 'cifar10', '--rank-scale', '0.111', '--opt', 'fdmomentum',
         '--lr', '0.1', '--momentum', '0.9', '--weight-decay', '1e-4', '--batch-size', '128', '--epochs', '200',
         '--wd2fd', '--dump-frobnorms']


def plot(rows, out_png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch

    fig, (ax_norm, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        norms = torch.load(r['frobnorms'], weights_only=True)  # [epochs, steps, layers]
        curve = norms.reshape(-1, norms.shape[-1]).mean(dim=1)
        ax_norm.plot(curve.numpy(), label=r['run'], linestyle='--' if r['mode'] == 'norm' else '-')
    ax_norm.set_xlabel('optimizer step')
    ax_norm.set_ylabel('mean ||U Vᵀ||_F over layers')
    ax_norm.legend(fontsize=8)
    names = [r['run'] for r in rows]
    ax_acc.bar(range(len(rows)), [r['top1'] or 0.0 for r in rows],
               color=['tab:blue' if r['spectral'] else 'tab:orange' for r in rows])
    ax_acc.set_xticks(range(len(rows)))
    ax_acc.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
    ax_acc.set_ylabel('top-1 accuracy (%)')
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def build_parser():
    return base_parser(__doc__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = []
    for spectral in (False, True):
        tag = '-spectral' if spectral else ''
        spec = ['--spectral'] if spectral else []
        frob_name = f'resnet20-frob{tag}'
        frobnorms = None
        runs = [
            ('frob', frob_name, []),
            ('none', f'resnet20-none{tag}', ['--no-frob']),
            ('norm', f'resnet20-norm{tag}',
             ['--no-frob', '--normalize', os.path.join(experiment_dir(args, frob_name), 'frobnorms.pt')]),
        ]
        for mode, name, extra in runs:
            if mode == 'norm' and frobnorms:  # the frob run's own file (its folder may carry a -N suffix)
                extra = ['--no-frob', '--normalize', frobnorms]
            res = run(PAPER + spec + extra + ['--experiment', name], args, smoke_epochs=2, small=dict(depth=8))
            if res is not None:
                rows.append(dict(run=name, mode=mode, **res))
                if mode == 'frob':
                    frobnorms = res.get('frobnorms')
    if finish(rows, args, ['run', 'spectral', 'top1', 'eval_loss'], 'normalization.json'):
        plot(rows, os.path.join(args.output, 'normalization.png'))
        print(f'plot: {os.path.join(args.output, "normalization.png")}')
    return rows


if __name__ == '__main__':
    main()
