"""Shared plumbing of the recipes: each recipe is a list of ``fnl-train`` runs with the paper's
settings (docs/experiments.md); ``--smoke`` runs every one of them for a few steps on the embedded
digits."""
import argparse
import json
import os
import shlex
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

SMOKE_FLAGS = ['--dataset', 'digits', '--limit-train-batches', '2', '--limit-val-batches', '1',
               '--batch-size', '16', '--workers', '0', '--no-progress', '--no-tensorboard']


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The recipe's docstring as written (its example commands keep their lines), and each option's
    default after its help, except where there is none to show (unset options and switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every recipe takes; ``description`` is the recipe's module docstring."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument('--smoke', action='store_true',
                   help='every run for a few steps on the embedded digits (a test, not an experiment)')
    p.add_argument('--data-dir', default='data', help='dataset root')
    p.add_argument('--download', action='store_true', help='download CIFAR with torchvision')
    p.add_argument('--output', default='runs', help='parent folder of the run folders')
    p.add_argument('--device', default=None, help='cpu, cuda, ... (unset: cuda when available, else cpu)')
    p.add_argument('--workers', type=int, default=4, help='data-loading worker processes per run')
    p.add_argument('--epochs', type=int, default=None, help='override the paper\'s epoch count')
    p.add_argument('--dry-run', action='store_true', help='print the fnl-train commands only')
    p.add_argument('--small', action='store_true',
                   help='with --smoke: a shallower/narrower variant of each model (for CI on small CPUs); '
                        'every other setting unchanged')
    return p


def run(argv: List[str], args: argparse.Namespace, smoke_epochs: int = 1,
        small: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Run ``fnl-train argv`` in this process (with the recipe's common flags); returns its results.

    ``small``: the model kwargs of the ``--smoke --small`` variant.
    """
    from fnl_timm import train as fnl_train

    if args.small and not args.smoke:
        raise ValueError('--small only goes with --smoke')
    full = list(argv) + ['--output', args.output, '--workers', str(args.workers)]
    if args.device:
        full += ['--device', args.device]
    if args.epochs is not None:
        full += ['--epochs', str(args.epochs)]
    if args.smoke:
        full += SMOKE_FLAGS + ['--epochs', str(smoke_epochs)]
        if args.small and small:
            full += ['--model-kwargs'] + [f'{k}={v!r}' for k, v in small.items()]
    else:
        if '--data-dir' not in argv:
            full += ['--data-dir', args.data_dir]
        full += ['--download'] if args.download else []
    print('fnl-train ' + ' '.join(shlex.quote(a) for a in full), flush=True)
    if args.dry_run:
        return None
    return fnl_train.run(full)


def run_rows(runs: Iterable[Tuple[str, List[str], Optional[Dict[str, Any]], Dict[str, Any]]],
             args: argparse.Namespace, columns: Sequence[str], json_name: str,
             smoke_epochs: int = 1) -> List[Dict[str, Any]]:
    """Run each ``(experiment, fnl-train argv, small model kwargs, extra row fields)`` with :func:`run`
    (``--experiment`` added), then :func:`finish` the rows; returns them."""
    rows = []
    for name, argv, small, fields in runs:
        res = run(list(argv) + ['--experiment', name], args, smoke_epochs=smoke_epochs, small=small)
        if res is not None:
            rows.append(dict(run=name, **fields, **res))
    return finish(rows, args, columns, json_name)


def finish(rows: List[Dict[str, Any]], args: argparse.Namespace, columns: Sequence[str],
           json_name: str) -> List[Dict[str, Any]]:
    """Print the table of ``columns`` and write the rows to ``--output/json_name`` (when any ran)."""
    if rows:
        print(table(rows, columns))
        save_json(os.path.join(args.output, json_name), rows)
    return rows


def experiment_dir(args: argparse.Namespace, name: str) -> str:
    return os.path.join(args.output, name)


def table(rows: Sequence[Dict[str, Any]], keys: Sequence[str]) -> str:
    """A plain-text table of ``keys`` over ``rows``."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f'{v:.4g}'
        return '-' if v is None else str(v)
    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) if cells else len(k) for i, k in enumerate(keys)]
    lines = ['  '.join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return '\n'.join(lines)


def save_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
