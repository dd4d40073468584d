"""WRN-28-10 on CIFAR-10 at target compression 0.06667 (paper section 4;
docs/experiments.md#tensor-formats-against-low-rank).

Low-rank block convs with spectral init and Frobenius decay, against the dense WRN-28-10. SGD
momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 200 epochs, lr x0.2 at epochs 60/120/160,
crop + flip + Cutout(16).
(The Tensor-Train / Tucker points, with this low-rank run beside them: recipes/wrn_tensor.py.)

    python recipes/wrn_lowrank.py --data-dir data --download
    python recipes/wrn_lowrank.py --smoke          # the factorized model only
"""

from _common import base_parser, run_rows

PAPER = ['--model', 'fnl_wrn28_10', '--dataset', 'cifar10', '--opt', 'fdmomentum', '--lr', '0.1',
         '--momentum', '0.9', '--weight-decay', '5e-4', '--batch-size', '128', '--epochs', '200',
         '--decay-milestones', '60', '120', '160', '--decay-rate', '0.2', '--cutout', '16']

RUNS = {
    'wrn28_10-lowrank-0.06667-spectral-fd': ['--target-ratio', '0.06667', '--spectral', '--wd2fd'],
    'wrn28_10-dense': [],
}


def build_parser():
    p = base_parser(__doc__)
    p.add_argument('--no-dense', action='store_true', help='skip the dense baseline')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    milestones = ['--decay-milestones', '1', '2', '3'] if args.smoke else []
    runs = ((name, PAPER + extra + milestones, dict(depth=10, width=2), {}) for name, extra in RUNS.items()
            if not (extra == [] and (args.no_dense or args.smoke)))
    return run_rows(runs, args, ['run', 'rank_scale', 'params', 'compression_ratio', 'macs_ratio', 'top1'],
                    'wrn_lowrank.json')


if __name__ == '__main__':
    main()
