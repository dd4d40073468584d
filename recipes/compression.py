"""Compression (paper section 4; docs/experiments.md#compression).

ResNet32-x2 and VGG-19 at target parameter ratios, spectral init + Frobenius decay; CIFAR-10,
CIFAR-100 (ratios 0.02 / 0.05 / 0.1) and Tiny-ImageNet (ResNet: 0.05 / 0.1 / 0.15; VGG: 0.02 /
0.05 / 0.1). SGD momentum 0.9, lr 0.1 x0.1 at 50% and 75%, 200 epochs, batch 128, weight decay
1e-4 (ResNet) / 2e-4 (VGG).

    python recipes/compression.py --data-dir data --download --datasets cifar10 cifar100
    python recipes/compression.py --datasets tiny-imagenet --tiny-dir data/tiny-imagenet-200
    python recipes/plot_results.py runs --out compression.png
    python recipes/compression.py --smoke          # each model at its largest ratio, on digits
"""
import os

from _common import base_parser, run_rows

SMALL = {  # --smoke --small
    'fnl_resnet32_x2': dict(depth=8),
    'fnl_vgg19': dict(cfg=(16, 'M', 32, 32, 'M', 64, 64)),
}
MODELS = {
    'fnl_resnet32_x2': ['--weight-decay', '1e-4'],
    'fnl_vgg19': ['--weight-decay', '2e-4'],
}
RATIOS = {
    ('fnl_resnet32_x2', 'tiny-imagenet'): (0.05, 0.1, 0.15),
}
DEFAULT_RATIOS = (0.02, 0.05, 0.1)
COMMON = ['--opt', 'fdmomentum', '--lr', '0.1', '--momentum', '0.9', '--batch-size', '128', '--epochs', '200',
          '--spectral', '--wd2fd']


def build_parser():
    p = base_parser(__doc__)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS), help='models to train')
    p.add_argument('--datasets', nargs='+', default=['cifar10', 'cifar100', 'tiny-imagenet'],
                   choices=['cifar10', 'cifar100', 'tiny-imagenet'],
                   help='datasets to train on (with --smoke: the first one, replaced by digits)')
    p.add_argument('--dense', action='store_true', help='also train the dense models')
    p.add_argument('--tiny-dir', default=os.path.join('data', 'tiny-imagenet-200'),
                   help='the unzipped tiny-imagenet-200 folder')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    datasets = args.datasets[:1] if args.smoke else args.datasets

    def runs():
        for dataset in datasets:
            for model in args.models:
                ratios = RATIOS.get((model, dataset), DEFAULT_RATIOS)
                if args.smoke:
                    ratios = ratios[-1:]
                settings = [(f'tr{r:g}', ['--target-ratio', str(r)] + COMMON) for r in ratios]
                if args.dense:
                    settings.append(('dense', [a for a in COMMON if a not in ('--spectral', '--wd2fd')]))
                for tag, extra in settings:
                    where = ['--data-dir', args.tiny_dir] if dataset == 'tiny-imagenet' and not args.smoke else []
                    yield (f'{model}-{dataset}-{tag}',
                           ['--model', model, '--dataset', dataset] + MODELS[model] + extra + where, SMALL[model], {})

    return run_rows(runs(), args, ['run', 'rank_scale', 'params', 'compression_ratio', 'macs_ratio', 'top1'],
                    'compression.json')


if __name__ == '__main__':
    main()
