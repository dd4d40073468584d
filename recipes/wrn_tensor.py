"""WRN-28-10 on CIFAR-10 with tensor-format block convs against low rank (paper section 4;
docs/experiments.md#tensor-formats-against-low-rank).

conv1 and conv2 of every block become a depthwise 3x3 conv followed by a 1x1 conv held as a
Tensor-Train (s = 0.234, 0.705) or a Tucker tensor (s = 0.211, 0.68), each trained with the
tensor libraries' defaults (random cores, weight decay on them) and with spectral init (TT-SVD /
HOSVD of the dense init) + Frobenius decay; against the low-rank WRN-28-10 at target ratio
0.06667 (spectral + FD) and the dense one. SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch
128, 200 epochs, lr x0.2 at epochs 60/120/160, crop + flip + Cutout(16). Writes a table, a JSON and
a plot of top-1 accuracy against the parameter ratio.

    python recipes/wrn_tensor.py --data-dir data --download
    python recipes/wrn_tensor.py --smoke --small     # every run for 2 steps on digits, WRN-10-2
"""
import os

from _common import base_parser, run_rows

PAPER = ['--model', 'fnl_wrn28_10', '--dataset', 'cifar10', '--opt', 'fdmomentum', '--lr', '0.1',
         '--momentum', '0.9', '--weight-decay', '5e-4', '--batch-size', '128', '--epochs', '200',
         '--decay-milestones', '60', '120', '160', '--decay-rate', '0.2', '--cutout', '16']
SPECTRAL_FD = ['--spectral', '--wd2fd']

# name -> (conv format, scale flags, regularisation flags)
RUNS = {}
for _fmt, _scales in (('tt', ('0.234', '0.705')), ('tucker', ('0.211', '0.68'))):
    for _s in _scales:
        RUNS[f'wrn28_10-{_fmt}-{_s}'] = (_fmt, ['--rank-scale', _s], [])
        RUNS[f'wrn28_10-{_fmt}-{_s}-spectral-fd'] = (_fmt, ['--rank-scale', _s], SPECTRAL_FD)
RUNS['wrn28_10-lowrank-0.06667-spectral-fd'] = ('lowrank', ['--target-ratio', '0.06667'], SPECTRAL_FD)
RUNS['wrn28_10-dense'] = ('dense', [], [])

FORMAT_NAMES = {'tt': 'Tensor-Train', 'tucker': 'Tucker', 'lowrank': 'low rank', 'dense': 'dense'}
SMALL = dict(depth=10, width=2)  # --smoke --small: WRN-10-2, same settings otherwise


def plot(rows, out_png):
    """Top-1 against the parameter ratio (log x), one line per (format, init + regulariser)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = {}
    for r in rows:
        if r['format'] == 'dense':
            ax.axhline(r['top1'], color='k', linestyle=':', label='dense')
            continue
        label = f"{FORMAT_NAMES[r['format']]}, {'spectral + FD' if r['spectral'] else 'default init + wd'}"
        lines.setdefault(label, []).append((r['compression_ratio'], r['top1']))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([c for c, _ in pts], [a for _, a in pts], marker='o', label=label)
    ax.set_xscale('log')
    ax.set_xlabel('parameters / dense parameters')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(f"{rows[0]['model']} on {rows[0]['dataset']}: tensor formats vs low rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def build_parser():
    p = base_parser(__doc__)
    p.add_argument('--no-dense', action='store_true', help='skip the dense baseline')
    p.add_argument('--only', nargs='+', default=None, choices=sorted(RUNS), metavar='RUN',
                   help=f'run only these (of: {", ".join(RUNS)})')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.small and not args.smoke:
        raise ValueError('--small only goes with --smoke')
    milestones = ['--decay-milestones', '1', '2', '3'] if args.smoke else []

    def runs():
        for name, (fmt, scale, reg) in RUNS.items():
            if args.only is not None and name not in args.only:
                continue
            if fmt == 'dense' and (args.no_dense or (args.smoke and args.only is None)):
                continue
            kwargs = dict(SMALL) if args.small else {}
            if fmt in ('tt', 'tucker'):
                kwargs['conv'] = fmt
            # one --model-kwargs (a second one would replace the first), so the small variant goes here
            model_kwargs = ['--model-kwargs'] + [f'{k}={v!r}' for k, v in kwargs.items()] if kwargs else []
            yield name, PAPER + scale + reg + model_kwargs + milestones, None, {'format': fmt}

    rows = run_rows(runs(), args, ['run', 'format', 'rank_scale', 'params', 'compression_ratio', 'macs_ratio',
                                   'top1'], 'wrn_tensor.json')
    if rows:
        print('plot:', plot(rows, os.path.join(args.output, 'wrn_tensor.png')))
    return rows


if __name__ == '__main__':
    main()
