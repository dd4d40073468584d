"""Factorized ResNet20 on CIFAR-10 (docs/experiments.md#factorized-resnet20).

rank_scale 0.111, spectral init and Frobenius decay; SGD lr 0.1, momentum 0.9, weight decay 1e-4,
batch 128, 200 epochs, lr x0.1 at 50% and 75%. Also runs the dense model and the factorized
baseline (default init, weight decay).

    python recipes/factorized_resnet.py --data-dir data --download
    python recipes/factorized_resnet.py --smoke
"""

from _common import base_parser, run_rows

PAPER = ['--model', 'fnl_resnet20', '--dataset', 'cifar10', '--opt', 'fdmomentum', '--lr', '0.1',
         '--momentum', '0.9', '--weight-decay', '1e-4', '--batch-size', '128', '--epochs', '200']

RUNS = {
    'resnet20-dense': [],
    'resnet20-lowrank-wd': ['--rank-scale', '0.111'],
    'resnet20-lowrank-spectral-fd': ['--rank-scale', '0.111', '--spectral', '--wd2fd'],
}


def build_parser():
    return base_parser(__doc__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = ((name, PAPER + extra, dict(depth=8), {}) for name, extra in RUNS.items())
    return run_rows(runs, args, ['run', 'params', 'compression_ratio', 'macs_ratio', 'top1'],
                    'factorized_resnet.json')


if __name__ == '__main__':
    main()
