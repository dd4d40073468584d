"""``fnl-train``'s files: checkpoints, resume, the run folder, ``summary.csv`` and ``results.json``.

Nothing a run wrote before is ever left half-written or removed without a replacement: every file
is written to a temporary name in the same folder and renamed over the old one (``os.replace`` is
atomic on POSIX), and a failed write removes its temporary file and names the file and the reason.
"""
import argparse
import csv
import errno
import json
import math
import os
import shutil
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from timm.models import clean_state_dict
from timm.utils import CheckpointSaver, get_state_dict

from ._hf import save_timm_folder
from ._serialization import WEIGHTS_ONLY_HINT, load_file, state_dict_mismatch, state_dict_of

# flags that define the model, its data and the regulariser: a resumed run must give the values the
# checkpoint was trained with (the optimizer state restores momentum, weight decay and FD coefficients,
# so a changed value would be silently ignored or the state dict would not fit)
RESUME_MUST_MATCH = (
    'model', 'rank_scale', 'target_ratio', 'square', 'model_kwargs', 'drop', 'dataset', 'img_size',
    'opt', 'opt_kwargs', 'momentum', 'weight_decay', 'wd2fd', 'no_frob', 'normalize', 'batch_size',
    'limit_train_batches', 'sync_bn',
)


class TrainingStopped(Exception):
    """A run that ended early on purpose or on a fault, with the message for the user and the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _write_failed(path: str, e: BaseException) -> OSError:
    """An OSError naming the file; a full disk says so even where torch hides the reason."""
    code = getattr(e, 'errno', None)
    if code is None and 'unexpected pos' in str(e):  # torch's zip writer on a short write
        code = errno.ENOSPC
    reason = os.strerror(code) if code else f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    return OSError(code or errno.EIO, f'cannot write {path}: {reason}')


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, then rename it over ``path``.

    On any failure the temporary file is removed and an OSError names ``path`` and the reason
    ("No space left on device", "Read-only file system", ...).
    """
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb' if binary else 'w', newline=None if binary else '') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _write_failed(path, e) from None


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and a rename (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so that ``json.dump(allow_nan=False)`` works."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return type(obj)((k, strict_json(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_results(path: str, results: Dict[str, Any]) -> None:
    """``results.json``: strict JSON (a missing or non-finite number is null), written atomically."""
    text = json.dumps(strict_json(results), indent=2, allow_nan=False) + '\n'
    atomic_write(path, lambda f: f.write(text), binary=False)


def update_summary(path: str, epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
                   lr: float) -> None:
    """timm's ``summary.csv`` row for ``epoch``, written atomically; rows of this epoch and later ones
    (left by a run that was stopped after writing them and resumed from an earlier checkpoint) are dropped."""
    row = OrderedDict(epoch=epoch)
    row.update(('train_' + k, v) for k, v in train_metrics.items())
    row.update(('eval_' + k, v) for k, v in eval_metrics.items())
    row['lr'] = lr
    rows: List[Dict[str, str]] = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = [r for r in csv.DictReader(f) if r.get('epoch', '').isdigit() and int(r['epoch']) < epoch]

    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=list(row.keys()), extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
        w.writerow(row)

    atomic_write(path, write, binary=False)


def new_run_dir(parent: str, name: str) -> str:
    """Create and return ``parent/name``, or ``name-1``, ``name-2``, ... if taken (as timm's ``get_outdir``),
    with ``os.mkdir`` as the test so that two runs starting at the same instant get different folders."""
    os.makedirs(parent, exist_ok=True)
    for i in range(10000):
        path = os.path.join(parent, name if i == 0 else f'{name}-{i}')
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f'cannot create a run folder: {os.path.join(parent, name)} and 9999 numbered ones '
                                'exist; give another --experiment')


def check_writable(folder: str) -> None:
    """Fail at once (before training) when ``folder`` cannot be written."""
    probe = os.path.join(folder, '.fnl-write-test')
    atomic_write(probe, lambda f: f.write(b'ok'))
    os.remove(probe)


# the files fnl-train writes in a run folder through a temporary ``<name>.tmp`` (atomic_write)
_RUN_FILES = ('results.json', 'summary.csv', 'frobnorms.pt', 'model_collapsed.pth')


def _own_tmp(name: str) -> bool:
    """Whether ``name`` is a temporary file fnl-train's own writes leave behind (nothing else is touched)."""
    if name == 'tmp.pth.tar':  # timm's CheckpointSaver
        return True
    if not name.endswith('.tmp'):
        return False
    base = name[:-len('.tmp')]
    return base in _RUN_FILES or base.endswith('.pth.tar') or base == '.fnl-write-test'


def remove_stale_tmp(folder: str) -> None:
    """Tidy a run folder after a killed or failed earlier write: remove the temporary files of fnl-train's
    own writes (no other ``*.tmp``), and finish an interrupted replacement of the ``hf`` folder: where
    ``hf`` is missing, the previous one (moved aside to ``.old-hf-*/hf`` just before) is put back; the
    unverified new one (``.tmp-hf-*``) and the emptied ``.old-hf-*`` folders are removed."""
    for name in os.listdir(folder):
        if _own_tmp(name):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    hf = os.path.join(folder, 'hf')
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith('.old-hf-') and os.path.isdir(path):
            kept = os.path.join(path, 'hf')
            if os.path.isdir(kept) and not os.path.lexists(hf):
                os.replace(kept, hf)
            if not os.path.exists(kept):
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith('.tmp-hf-') and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def read_results(folder: str) -> Optional[Dict[str, Any]]:
    """The run folder's ``results.json`` as a dict, or None where there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, 'results.json')) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def check_resume_folder(path: str, ckpt: Dict[str, Any], model: str) -> None:
    """Refuse ``--resume`` where the resumed run, which writes into the checkpoint's folder, would overwrite
    results that are not its own to replace: a checkpoint older than the folder's ``last.pth.tar`` (the later
    epochs' checkpoints, summary rows and results), or a folder whose ``results.json`` is not an fnl-train
    run's of ``model`` (fnl-train writes ``summary.csv`` before any ``results.json``)."""
    folder = os.path.dirname(path) or '.'
    if os.path.exists(os.path.join(folder, 'results.json')):
        owner = (read_results(folder) or {}).get('model')
        if owner != model or not os.path.exists(os.path.join(folder, 'summary.csv')):
            raise ValueError(f'--resume {path!r}: its folder holds a results.json that is not of an fnl-train run of '
                             f'{model} (the resumed run would overwrite it); copy the checkpoint into a folder of '
                             'its own and resume it from there')
    last = os.path.join(folder, 'last.pth.tar')
    if not os.path.exists(last) or os.path.samefile(last, path):
        return
    try:
        newest = load_file(last, 'the run folder\'s last.pth.tar', hint=WEIGHTS_ONLY_HINT)
        newest_at = resume_position(newest)
    except (ValueError, KeyError, TypeError):
        return  # an unreadable last.pth.tar: the checkpoint resumed is the best one left
    at = resume_position(ckpt)
    if newest_at > at:
        raise ValueError(f'--resume {path!r} continues at epoch {at[0]}, but its run folder\'s {last} continues at '
                         f'epoch {newest_at[0]}' + (f', step {newest_at[1]}' if newest_at[1] else '') + ': resuming '
                         'the earlier checkpoint there would overwrite the later epochs\' checkpoints and results. '
                         f'Resume {last}, or copy {os.path.basename(path)} into a new folder and resume it from there')


def load_resume_checkpoint(path: str) -> Dict[str, Any]:
    """The ``--resume`` checkpoint, read weights-only; a file that is not one (missing, empty, truncated,
    not a training checkpoint) is a one-line ValueError naming it."""
    ckpt = load_file(path, '--resume', hint=WEIGHTS_ONLY_HINT)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise ValueError(f'--resume {path!r} is not an fnl-train / timm training checkpoint (no state_dict and '
                         'epoch); to start from weights only, use --initial-checkpoint')
    return ckpt


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def check_resume_args(args: argparse.Namespace, saved: Optional[argparse.Namespace], path: str) -> None:
    """Raise one ValueError naming every flag of :data:`RESUME_MUST_MATCH` whose value differs from the checkpoint's."""
    if saved is None:
        return
    diffs = []
    for name in RESUME_MUST_MATCH:
        if not hasattr(saved, name):  # a checkpoint from before the flag existed
            continue
        old, new = getattr(saved, name), getattr(args, name, None)
        if old != new:
            diffs.append(f'{_flag(name)} {old!r} in the checkpoint, {new!r} now')
    if diffs:
        raise ValueError(f'--resume {path!r} was trained with other settings: {"; ".join(diffs)}. Give the '
                         'checkpoint\'s values (flags that define the model, data and regulariser must match; '
                         '--epochs, --lr, --stop-epoch, --clip-grad, --workers and the logging flags may change)')


def restore_training_state(ckpt: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           loss_scaler: Any = None) -> None:
    """Load the model, optimizer and loss-scaler state of a checkpoint read by :func:`load_resume_checkpoint`
    (what timm's ``resume_checkpoint`` does, from the dict already read)."""
    state = clean_state_dict(ckpt['state_dict'])
    mismatch = state_dict_mismatch(model, state)
    if mismatch:
        raise ValueError(f'--resume: the checkpoint does not fit the model: {mismatch}')
    model.load_state_dict(state)
    if 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])


def resume_position(ckpt: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, step) where a checkpoint continues: the step is > 0 for one written mid-epoch on a stop signal."""
    mid = (ckpt.get('fnl') or {}).get('mid_epoch')
    if mid:
        return int(mid['epoch']), int(mid['step'])
    return int(ckpt['epoch']) + 1, 0


class Saver(CheckpointSaver):
    """timm's CheckpointSaver with the FNL state in each checkpoint and no window without a file.

    * ``last.pth.tar`` is replaced by renaming the new file over it, and ``checkpoint-N`` /
      ``model_best`` by linking (or copying) to a temporary name renamed over the old one: a kill
      at any instant leaves every file either old or new, never missing or partial.
    * Each checkpoint holds the saver's history (timm's ``saver`` entry: kept checkpoints, best
      metric and epoch), restored by :meth:`restore` on resume.
    * ``fnl`` holds the recorded Frobenius norms and, for a checkpoint written on a stop signal,
      the position in the epoch and the random-number state (``mid_epoch``).
    """

    def __init__(self, *args: Any, extra_state: Optional[Callable[[], Optional[Dict[str, Any]]]] = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state
        self.mid_epoch: Optional[Dict[str, Any]] = None

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = dst + '.tmp'
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            if not self.can_hardlink:
                raise NotImplementedError
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            self.can_hardlink = False

            def copy(f) -> None:
                with open(src, 'rb') as s:
                    shutil.copyfileobj(s, f)
            atomic_write(dst, copy)
            return
        os.replace(tmp, dst)

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state: Dict[str, Any] = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
        }
        if self.args is not None:
            state['args'] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(None if self.mid_epoch else epoch, metric)
        fnl_state = dict(self.extra_state() or {}) if self.extra_state is not None else {}
        if self.mid_epoch:
            fnl_state['mid_epoch'] = self.mid_epoch
        if fnl_state:
            state['fnl'] = fnl_state
        atomic_torch_save(state, save_path)

    def save_mid_epoch(self, epoch: int, step: int, extra: Dict[str, Any]) -> str:
        """Write ``last.pth.tar`` for a run stopped after ``step`` steps of ``epoch``; it is not ranked."""
        self.mid_epoch = dict(extra, epoch=epoch, step=step)
        try:
            path = os.path.join(self.checkpoint_dir, 'last' + self.extension)
            self._save(path, epoch - 1)
        finally:
            self.mid_epoch = None
        return path

    def restore(self, ckpt: Dict[str, Any], source: str) -> None:
        """Continue the checkpoint history of ``ckpt`` (read from ``source`` in this folder): kept
        checkpoints, best metric and epoch; a ranked file or ``model_best`` that a kill right after
        writing ``last`` left out is made again from ``source``."""
        state = ckpt.get('saver')
        if not state:
            return
        self.load_state_dict(state)
        epoch, metric = state.get('pending', (None, None))
        if epoch is None or epoch != ckpt.get('epoch'):
            return
        path = self._checkpoint_path(epoch)
        if path not in [f for f, _ in self.checkpoint_files]:  # killed before it was ranked: rank it now
            worst = self.checkpoint_files[-1] if self.checkpoint_files else None
            if (len(self.checkpoint_files) < self.max_history or worst[1] is None
                    or (metric is not None and self.cmp(metric, worst[1]))):
                if len(self.checkpoint_files) >= self.max_history:
                    self._cleanup_checkpoints(1)
                self._duplicate(source, path)
                self._track_checkpoint(path, epoch, metric, update_best_file=False)
        if self.best_epoch == epoch:
            best = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
            if not (os.path.exists(best) and os.path.samefile(best, source)):
                self._duplicate(source, best)


def save_best_for_timm(model: nn.Module, out_dir: str, info: Any) -> Dict[str, Any]:
    """The best epoch's model as timm's ``local-dir`` folder ``out_dir/hf`` (:mod:`fnl_timm._hf`):
    ``timm.create_model('local-dir:RUN/hf', pretrained=True)`` and ``--model local-dir:RUN/hf`` in timm's
    scripts rebuild it with its arguments and the run's preprocessing (``info``: the dataset's
    input size, mean and std).

    Returns:
        ``{'hf': folder}``, or ``{'hf': None, 'hf_note': why not}``.
    """
    best = os.path.join(out_dir, 'model_best.pth.tar')
    if not os.path.isfile(best):
        return {'hf': None, 'hf_note': 'no model_best.pth.tar in the run folder'}
    state = state_dict_of(load_file(best, 'model_best.pth.tar'), best, 'model_best.pth.tar')
    folder = os.path.join(out_dir, 'hf')
    data_config = dict(input_size=tuple(info.input_size), mean=tuple(info.mean), std=tuple(info.std), crop_pct=1.0)
    try:
        reason = save_timm_folder(model, folder, info.input_size, state_dict=state, data_config=data_config)
    except OSError as e:
        raise _write_failed(folder, e) from None
    return {'hf': folder} if reason is None else {'hf': None, 'hf_note': reason}
