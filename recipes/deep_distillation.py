"""Overcomplete knowledge distillation (paper section 5; docs/experiments.md#overcomplete-knowledge-distillation).

ResNet32 on CIFAR-100 trained overcomplete, W = U S Vᵀ at rank_scale 1.0 with --square --wd2fd,
then collapsed into a plain dense ResNet32 (``model_collapsed.pth`` loads into
``timm.create_model('fnl_resnet32', num_classes=100)``). The dense ResNet32 trained directly is
the comparison.

    python recipes/deep_distillation.py --data-dir data --download
    python recipes/deep_distillation.py --smoke
"""

from _common import base_parser, run_rows

PAPER = ['--model', 'fnl_resnet32', '--dataset', 'cifar100', '--opt', 'fdmomentum', '--lr', '0.1',
         '--momentum', '0.9', '--weight-decay', '1e-4', '--batch-size', '128', '--epochs', '200']

RUNS = {
    'resnet32-c100-dense': [],
    'resnet32-c100-square-fd': ['--rank-scale', '1.0', '--square', '--wd2fd', '--collapse'],
}


def build_parser():
    return base_parser(__doc__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = ((name, PAPER + extra, dict(depth=8), {}) for name, extra in RUNS.items())
    return run_rows(runs, args, ['run', 'params', 'collapsed_params', 'collapse_max_abs_diff', 'top1'],
                    'deep_distillation.json')


if __name__ == '__main__':
    main()
