"""Accuracy versus compression from ``results.json`` files (docs/experiments.md).

One panel per (model, dataset), the parameter ratio (log scale) on x, top-1 accuracy on y, one
line per setting (spectral / FD / plain), dense runs as horizontal lines.

    python recipes/plot_results.py runs --out accuracy_vs_compression.png
    python recipes/plot_results.py --smoke      # runs the compression smoke first, then plots it
"""
import argparse
import glob
import json
import os
import sys
from collections import defaultdict


def load_results(paths):
    """Every results.json under ``paths`` (files or folders, searched recursively)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += glob.glob(os.path.join(p, '**', 'results.json'), recursive=True)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f'paths: {p!r} is neither a results.json file nor a folder')
    out = []
    for f in sorted(files):
        with open(f) as fh:
            r = json.load(fh)
        if r.get('top1') is not None and r.get('compression_ratio') is not None:
            out.append(r)
    return out


def setting(r):
    if not r.get('rank_scale'):
        return 'dense'
    parts = ['spectral' if r.get('spectral') else 'default init',
             'FD' if r.get('wd2fd') and not r.get('no_frob') else ('no reg.' if r.get('wd2fd') else 'wd')]
    return ' + '.join(parts)


def plot(results, out_png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(list))
    for r in results:
        panels[(r['model'], r['dataset'])][setting(r)].append((r['compression_ratio'], r['top1']))
    if not panels:
        raise ValueError('no results.json with top1 and compression_ratio found')
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, ((model, dataset), lines) in zip(axes[0], sorted(panels.items())):
        for name, pts in sorted(lines.items()):
            pts.sort()
            if name == 'dense':
                ax.axhline(max(a for _, a in pts), color='k', linestyle=':', label='dense')
            else:
                ax.plot([c for c, _ in pts], [a for _, a in pts], marker='o', label=name)
        ax.set_xscale('log')
        ax.set_xlabel('parameters / dense parameters')
        ax.set_ylabel('top-1 accuracy (%)')
        ax.set_title(f'{model} on {dataset}')
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return sorted(panels)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', default=['runs'], help='results.json files or folders holding them')
    p.add_argument('--out', default=None, help='PNG to write (default: <first path>/accuracy_vs_compression.png)')
    p.add_argument('--smoke', action='store_true', help='run the compression smoke into --output, then plot it')
    p.add_argument('--output', default='runs', help='with --smoke: where the smoke runs go')
    p.add_argument('--small', action='store_true', help='with --smoke: the small model variants')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import compression
        compression.main(['--smoke', '--output', args.output] + (['--small'] if args.small else []))
        args.paths = [args.output]
    results = load_results(args.paths)
    out = args.out or os.path.join(args.paths[0] if os.path.isdir(args.paths[0]) else '.',
                                   'accuracy_vs_compression.png')
    panels = plot(results, out)
    print(f'{len(results)} runs, {len(panels)} panels -> {out}')
    return out


if __name__ == '__main__':
    main()
