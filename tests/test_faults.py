"""Faults injected into real fnl-train runs: a run never corrupts or loses a user's results.

Each test injects the fault for real where it can here (SIGTERM / SIGINT / SIGKILL, a full or
read-only tmpfs when one can be mounted, otherwise the OS error the write would raise), and
asserts the exit code, the one-line message, that earlier files are unchanged (checksums), and that
a resumed run ends exactly where the uninterrupted run ends. Tiny model, 8x8 inputs, 3 steps an epoch.
"""
import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

timm = pytest.importorskip('timm')
import fnl_timm  # noqa: E402,F401
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm import train_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'fnl_test_resnet', '--img-size', '8', '--batch-size', '16', '--workers', '0',
        '--limit-train-batches', '3', '--limit-val-batches', '1', '--no-progress', '--no-tensorboard',
        '--lr', '0.05', '--rank-scale', '0.3', '--wd2fd', '--checkpoint-hist', '1', '--epochs', '3']
VOLATILE = ('train_seconds', 'start_epoch', 'experiment', 'frobnorms', 'collapsed_model', 'hf')


def _argv(out, name, *extra):
    return BASE + ['--output', str(out), '--experiment', name, *extra]


def _checksums(folder):  # every file, those in sub-folders (hf/) too
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def _results(folder):
    res = json.loads((folder / 'results.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in JSON'))
    return {k: v for k, v in res.items() if k not in VOLATILE}


def _summary_rows(folder):
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _assert_same_run(a, b):
    """Two run folders hold the same training: weights, optimizer state, results, summary rows, kept files."""
    ca = torch.load(a / 'last.pth.tar', weights_only=False)
    cb = torch.load(b / 'last.pth.tar', weights_only=False)
    assert ca['epoch'] == cb['epoch']
    for k, v in ca['state_dict'].items():
        assert torch.equal(v, cb['state_dict'][k]), f'{k}: {(v.float() - cb["state_dict"][k].float()).abs().max()}'
    for k, st in ca['optimizer']['state'].items():
        assert torch.equal(st['momentum_buffer'], cb['optimizer']['state'][k]['momentum_buffer']), k
    assert _results(a) == _results(b)
    assert _summary_rows(a) == _summary_rows(b)
    assert sorted(n for n in os.listdir(a) if n.endswith('.pth.tar')) == \
        sorted(n for n in os.listdir(b) if n.endswith('.pth.tar'))
    best_a = torch.load(a / 'model_best.pth.tar', weights_only=False)
    best_b = torch.load(b / 'model_best.pth.tar', weights_only=False)
    assert (best_a['epoch'], best_a['metric']) == (best_b['epoch'], best_b['metric'])


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread here and in the child processes: the same arithmetic everywhere (bitwise
    comparisons across processes), and no thread oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, one_thread):
    """The uninterrupted 3-epoch run every resumed run must equal."""
    out = tmp_path_factory.mktemp('ref')
    fnl_train.run(_argv(out, 'ref'))
    return out / 'ref'


def _main(argv, capsys):
    """Exit code and last stderr line of the console script (argparse's own errors exit through SystemExit)."""
    try:
        code = fnl_train.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ''


def test_resume_writes_only_into_its_folder_and_keeps_history(tmp_path, reference):
    """Cases 1, 2, 8: X and X-1 from the same --experiment; resuming X-1 leaves X byte for byte as it was,
    restores X-1's checkpoint history (--checkpoint-hist 1: one ranked file), and ends exactly as the
    uninterrupted run, summary.csv without duplicate epochs."""
    fnl_train.run(_argv(tmp_path, 'X', '--epochs', '1'))
    fnl_train.run(_argv(tmp_path, 'X', '--stop-epoch', '1'))
    before = _checksums(tmp_path / 'X')
    res = fnl_train.run(_argv(tmp_path, 'X', '--resume', str(tmp_path / 'X-1' / 'last.pth.tar')))
    assert res['experiment'] == 'X-1' and res['epochs_run'] == 3
    assert _checksums(tmp_path / 'X') == before
    assert [r['epoch'] for r in _summary_rows(tmp_path / 'X-1')] == ['0', '1', '2']
    _assert_same_run(reference, tmp_path / 'X-1')


def test_resume_of_a_finished_run_changes_nothing(tmp_path, reference, caplog):
    """Case 3: nothing left to do is said and changes no file; a larger --epochs trains on."""
    run = tmp_path / 'ref'
    shutil.copytree(reference, run)
    before = _checksums(run)
    res = fnl_train.run(_argv(tmp_path, 'ignored', '--resume', str(run / 'last.pth.tar')))
    assert 'nothing left to train' in caplog.text and f'{run} is unchanged' in caplog.text
    assert _checksums(run) == before
    assert res == json.loads((reference / 'results.json').read_text())
    res = fnl_train.run(_argv(tmp_path, 'ignored', '--resume', str(run / 'last.pth.tar'), '--epochs', '4'))
    assert (res['epochs_run'], res['start_epoch']) == (4, 3) and res['top1'] is not None
    assert [r['epoch'] for r in _summary_rows(run)] == ['0', '1', '2', '3']
    assert not (tmp_path / 'ignored').exists()


def test_divergence_stops_and_keeps_the_finite_checkpoint(tmp_path, capsys):
    """Case 4: --lr 1e8 from the start stops in epoch 0 (exit 1, epoch and step named, nothing written);
    a finite run resumed with --lr 1e8 stops in epoch 1 and its last.pth.tar stays the finite one."""
    code, line = _main(_argv(tmp_path, 'd0', '--lr', '1e8'), capsys)
    assert code == 1
    assert line.startswith('fnl-train: training diverged: non-finite loss or gradient norm at epoch 0, step ')
    assert '--lr' in line and '--clip-grad' in line and 'no checkpoint was written' in line
    assert sorted(os.listdir(tmp_path / 'd0')) == []
    fnl_train.run(_argv(tmp_path, 'd1', '--stop-epoch', '1'))
    before = _checksums(tmp_path / 'd1')
    code, line = _main(_argv(tmp_path, 'd1', '--lr', '1e8', '--resume', str(tmp_path / 'd1' / 'last.pth.tar')),
                       capsys)
    assert code == 1 and 'at epoch 1, step ' in line and 'last.pth.tar, is kept' in line, line
    assert _checksums(tmp_path / 'd1') == before


def test_results_json_is_strict():
    """Case 4: a non-finite number is null in results.json (json.loads with NaN refused)."""
    out = train_checkpoint.strict_json({'a': float('nan'), 'b': [float('inf'), 1.5], 'c': None})
    assert out == {'a': None, 'b': [None, 1.5], 'c': None}


def test_amp_skipped_scaler_step_is_not_divergence(tmp_path, monkeypatch):
    """Case 4: under a GradScaler (float16 autocast; on the CPU here) a step with an infinite gradient is
    skipped and the scale halved; the run goes on and ends finite."""
    from timm.utils import NativeScaler
    monkeypatch.setattr(fnl_train, '_amp', lambda args, device: (
        torch.autocast('cpu', dtype=torch.float16), NativeScaler(device='cpu')))
    create = fnl_train._create_model
    calls = []

    def with_inf_grad(*a, **k):
        model = create(*a, **k)
        p = next(model.parameters())
        p.register_hook(lambda g: (calls.append(1), g * float('inf') if len(calls) == 2 else g)[1])
        return model
    monkeypatch.setattr(fnl_train, '_create_model', with_inf_grad)
    res = fnl_train.run(_argv(tmp_path, 'amp', '--amp', '--epochs', '1'))
    assert res['epochs_run'] == 1 and res['top1'] is not None
    ckpt = torch.load(tmp_path / 'amp' / 'last.pth.tar', weights_only=False)
    assert ckpt['amp_scaler']['scale'] == 65536.0 / 2  # exactly one step skipped
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


@pytest.mark.parametrize('at_forward,stopped', [
    (5, 'at epoch 1, step 2 of 3: resume with --resume {last} (continues at this step, with the result of an '
        'uninterrupted run)'),
    (3, 'after epoch 0: resume with --resume {last} (continues at epoch 1)'),  # in the last step of epoch 0
])
def test_sigint_resumes_exactly(tmp_path, reference, monkeypatch, capsys, at_forward, stopped):
    """Case 5: Ctrl-C (SIGINT, sent to this process) during a step finishes the step, writes last.pth.tar
    (mid-epoch, or the epoch's checkpoint in its last step), names it and exits 130; its --resume ends
    exactly as the uninterrupted run."""
    create = fnl_train._create_model
    forwards = []

    def interrupted(*a, **k):
        model = create(*a, **k)

        def hook(module, inputs, output):
            if module.training:
                forwards.append(1)
                if len(forwards) == at_forward:
                    os.kill(os.getpid(), signal.SIGINT)
        model.register_forward_hook(hook)
        return model
    monkeypatch.setattr(fnl_train, '_create_model', interrupted)
    handler = signal.getsignal(signal.SIGINT)
    code, line = _main(_argv(tmp_path, 'int'), capsys)
    monkeypatch.undo()
    last = tmp_path / 'int' / 'last.pth.tar'
    assert code == 130
    assert line == 'fnl-train: stopped by SIGINT ' + stopped.format(last=last)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers put back
    mid = torch.load(last, weights_only=False).get('fnl', {}).get('mid_epoch')
    assert (mid['epoch'], mid['step']) == (1, 2) if at_forward == 5 else mid is None
    fnl_train.run(_argv(tmp_path, 'int', '--resume', str(last)))
    _assert_same_run(reference, tmp_path / 'int')


def _child(argv, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-m', 'fnl_timm.train', *argv], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, **kw)


def _wait_for(proc, prefix):
    """Read the child's log until a line starts with ``prefix``; returns the lines read."""
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip('\n'))
        if line.startswith(prefix):
            return lines
    pytest.fail('child ended before ' + prefix + ':\n' + '\n'.join(lines[-20:]))


def test_sigterm_with_worker_processes_resumes_exactly(tmp_path, reference):
    """Case 5: SIGTERM (what schedulers send) to a run loading data in 2 worker processes: exit 143, the
    message names the checkpoint; resumed here without workers it ends exactly as the reference
    (augmentation is seeded per sample, not per worker)."""
    proc = _child(_argv(tmp_path, 'term', '--workers', '2', '--log-interval', '1'))
    _wait_for(proc, 'Train: 1 [1/3')
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read().strip().splitlines()
    assert proc.wait(timeout=120) == 143, rest[-5:]
    last = os.path.join(str(tmp_path), 'term', 'last.pth.tar')
    assert rest[-1].startswith('fnl-train: stopped by SIGTERM ') and f'--resume {last} ' in rest[-1], rest[-3:]
    fnl_train.run(_argv(tmp_path, 'term', '--resume', last))
    _assert_same_run(reference, tmp_path / 'term')


def test_sigkill_then_resume_continues_exactly(tmp_path, reference):
    """SIGKILL (no handler runs) right after epoch 0 is logged: every file left is whole, and --resume
    ends exactly as the uninterrupted run."""
    proc = _child(_argv(tmp_path, 'kill', '--log-interval', '1'))
    _wait_for(proc, 'Train: 1 [1/3')
    proc.kill()
    proc.wait(timeout=60)
    run = tmp_path / 'kill'
    assert not [n for n in os.listdir(run) if n.endswith('.tmp') or n.startswith('tmp')]
    assert torch.load(run / 'last.pth.tar', weights_only=False)['epoch'] == 0
    fnl_train.run(_argv(tmp_path, 'kill', '--resume', str(run / 'last.pth.tar')))
    _assert_same_run(reference, run)


def test_sigterm_under_torchrun_stops_every_rank_and_resumes(tmp_path):
    """Case 5 under torchrun (2 CPU processes): SIGTERM to the launcher reaches both ranks; they stop at the
    same step, rank 0 writes the checkpoint, each rank names it and exits 143; torchrun --resume finishes
    with both ranks' weights equal. (Checked by hand as well: the resumed run's weights, results and
    summary.csv equal an uninterrupted 2-process run's exactly.)"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    # the signal goes at the first logged step of 3 epochs of 3 steps: the ranks cannot finish the run before
    # the launcher (slow to be scheduled on loaded cores) forwards it
    argv = [a for a in _argv(tmp_path, 'ddp', '--device', 'cpu', '--log-interval', '1', '--epochs', '3')]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
              '-m', 'fnl_timm.train']
    proc = subprocess.Popen(launch + argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    _wait_for(proc, 'Train: 0 [1/3')
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) != 0
    last = os.path.join(str(tmp_path), 'ddp', 'last.pth.tar')
    for prog in ('fnl-train', 'fnl-train[rank 1]'):
        assert f'{prog}: stopped by SIGTERM ' in rest and f'--resume {last} ' in rest, rest[-2000:]
    done = subprocess.run(launch + argv + ['--resume', last], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    assert (res['world_size'], res['epochs_run'], res['ddp_max_weight_diff']) == (2, 3, 0.0)


@pytest.mark.parametrize('changed,named', [
    (['--rank-scale', '0.2', '--wd2fd'], "--rank-scale 0.3 in the checkpoint, 0.2 now"),
    (['--rank-scale', '0.3'], '--wd2fd True in the checkpoint, False now'),
    (['--rank-scale', '0.3', '--wd2fd', '--weight-decay', '0.01'], '--weight-decay 0.0001 in the checkpoint, 0.01 now'),
])
def test_resume_checks_model_and_regulariser_flags(tmp_path, reference, capsys, changed, named):
    """Case 6: one line naming the flag and both values, exit 2, the run folder unchanged."""
    before = _checksums(reference)
    argv = [a for a in _argv(tmp_path, 'x') if a not in ('--rank-scale', '0.3', '--wd2fd')] + changed
    code, line = _main(argv + ['--resume', str(reference / 'last.pth.tar')], capsys)
    assert code == 2 and named in line and line.startswith('fnl-train: error: --resume'), line
    assert _checksums(reference) == before


@contextlib.contextmanager
def _small_fs(path, size, monkeypatch, error):
    """A tmpfs of ``size`` at ``path`` (read-only if ``error`` is EROFS) where one can be mounted; otherwise a
    plain folder where checkpoint writes raise ``error`` as the full or read-only file system would."""
    os.makedirs(path, exist_ok=True)
    opts = f'size={size}' + (',ro' if error == errno.EROFS else '')
    try:
        mounted = os.environ.get('FNL_TEST_NO_MOUNT') is None and subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(path)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        real_open = open

        def failing_open(file, mode='r', *a, **k):
            if ('w' in mode or 'a' in mode) and str(file).startswith(str(path)) and (
                    error == errno.EROFS or str(file).endswith('.pth.tar.tmp')):
                raise OSError(error, os.strerror(error), str(file))
            return real_open(file, mode, *a, **k)
        monkeypatch.setattr(train_checkpoint, 'open', failing_open, raising=False)
        if error == errno.EROFS:
            def no_mkdir(p, *a, **k):
                raise OSError(error, os.strerror(error), str(p))
            monkeypatch.setattr(train_checkpoint.os, 'mkdir', no_mkdir)
    try:
        yield
    finally:
        monkeypatch.undo()
        if mounted:
            subprocess.run(['umount', str(path)], check=True)


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """Case 7: no space for the checkpoint: exit 1, 'No space left on device' naming the file, no tmp file."""
    fs = tmp_path / 'fs'
    with _small_fs(fs, '48k', monkeypatch, errno.ENOSPC):
        code, line = _main(BASE + ['--output', str(fs), '--experiment', 'full'], capsys)
        left = os.listdir(fs / 'full')
    assert code == 1
    assert line.startswith(f'fnl-train: error: cannot write {fs / "full"}') and \
        line.endswith('No space left on device'), line
    assert not [n for n in left if 'tmp' in n], left


def test_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    fs = tmp_path / 'ro'
    with _small_fs(fs, '1m', monkeypatch, errno.EROFS):
        code, line = _main(BASE + ['--output', str(fs), '--experiment', 'r'], capsys)
    assert code == 1 and line == f'fnl-train: error: cannot write {fs / "r"}: Read-only file system', line


def test_bad_resume_files_and_data_folders_are_one_line(tmp_path, reference, capsys):
    """Case 7: empty and truncated --resume files; --dataset folder with a missing or an empty --data-dir."""
    empty = tmp_path / 'empty.pth.tar'
    empty.write_bytes(b'')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes((reference / 'last.pth.tar').read_bytes()[:3000])
    (tmp_path / 'nothing').mkdir()
    for argv, words in [
        (_argv(tmp_path, 'e', '--resume', str(empty)), f"--resume '{empty}' is empty"),
        (_argv(tmp_path, 'e', '--resume', str(truncated)), f"--resume '{truncated}' is not a readable"),
        (_argv(tmp_path, 'e', '--dataset', 'folder', '--data-dir', str(tmp_path / 'none')), 'is not a folder'),
        (_argv(tmp_path, 'e', '--dataset', 'folder', '--data-dir', str(tmp_path / 'nothing')), 'Found 0 images'),
    ]:
        code, line = _main(argv, capsys)
        assert code == 2 and line.startswith('fnl-train: error: ') and words in line, line
    assert not (tmp_path / 'e').exists()


def test_two_runs_creating_the_same_folder_get_different_ones(tmp_path, monkeypatch):
    """Case 7: another run takes the folder between the check and the creation: this one takes name-1."""
    real_mkdir = os.mkdir
    taken = []

    def racing_mkdir(path, *a, **k):
        if not taken and os.path.basename(path) == 'exp':  # the other run, at the same instant
            taken.append(path)
            real_mkdir(path)
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(train_checkpoint.os, 'mkdir', racing_mkdir)
    assert train_checkpoint.new_run_dir(str(tmp_path), 'exp') == str(tmp_path / 'exp-1')
    monkeypatch.undo()
    made = []
    threads = [threading.Thread(target=lambda: made.append(train_checkpoint.new_run_dir(str(tmp_path), 'many')))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8


def test_a_killed_write_never_leaves_a_file_missing_or_partial(tmp_path, reference, monkeypatch):
    """Case 8: a kill right before the rename of a new last.pth.tar, results.json or summary.csv over the old
    one (injected as an interrupt there) leaves every file as it was; the next start removes the temporary one."""
    run = tmp_path / 'ref'
    shutil.copytree(reference, run)
    before = _checksums(run)
    real_replace = os.replace

    def killed(src, dst):
        if os.path.basename(dst) in ('last.pth.tar', 'results.json', 'summary.csv'):
            raise KeyboardInterrupt('killed before the rename')
        return real_replace(src, dst)
    monkeypatch.setattr(train_checkpoint.os, 'replace', killed)
    saver = train_checkpoint.Saver(model=torch.nn.Linear(2, 2), optimizer=torch.optim.SGD([torch.zeros(1)], lr=1),
                                   checkpoint_dir=str(run), recovery_dir=str(run), max_history=1)
    with pytest.raises(KeyboardInterrupt):
        saver.save_checkpoint(3, metric=100.0)
    with pytest.raises(KeyboardInterrupt):
        train_checkpoint.write_results(str(run / 'results.json'), {'top1': 1.0})
    with pytest.raises(KeyboardInterrupt):
        train_checkpoint.update_summary(str(run / 'summary.csv'), 3, {'loss': 1.0}, {'top1': 1.0}, 0.1)
    monkeypatch.undo()
    after = _checksums(run)
    assert {k: v for k, v in after.items() if 'tmp' not in k} == before
    assert 'tmp.pth.tar' in after  # the new checkpoint, whole but not yet renamed
    train_checkpoint.remove_stale_tmp(str(run))
    assert _checksums(run) == before


def test_sync_bn_needs_cuda(capsys):
    """Case 9: --sync-bn uses torch's SyncBatchNorm, which synchronises GPU tensors only: a clear error on the CPU."""
    code, line = _main(BASE + ['--sync-bn', '--device', 'cpu'], capsys)
    assert code == 2 and '--sync-bn needs CUDA' in line, line


def test_summary_rewritten_from_an_epoch_has_no_later_rows(tmp_path):
    """Case 8: a run resumed from an earlier checkpoint than its last summary row rewrites that epoch's row
    and drops the later ones (no duplicate epochs)."""
    path = str(tmp_path / 'summary.csv')
    for epoch in (0, 1, 2, 1):
        train_checkpoint.update_summary(path, epoch, {'loss': float(epoch)}, {'top1': 10.0 * epoch}, 0.1)
    assert [(r['epoch'], r['eval_top1']) for r in _summary_rows(tmp_path)] == [('0', '0.0'), ('1', '10.0')]


@pytest.mark.parametrize('opts,reason', [('size=1m,ro', 'Read-only file system'), ('size=40k', 'No space left')])
def test_fnl_compress_unwritable_output_is_one_line(tmp_path, capsys, opts, reason):
    """Case 7 for fnl-compress: a read-only or full --output folder (a real tmpfs; skipped where none can be
    mounted) is one line and exit 1, with no partial file left."""
    from fnl_timm import compress
    fs = tmp_path / 'fs'
    fs.mkdir()
    try:
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(fs)], capture_output=True).returncode:
            pytest.skip('no tmpfs can be mounted here')
    except OSError:
        pytest.skip('no mount command')
    try:
        with pytest.raises(SystemExit) as e:
            compress.main(['--model', 'fnl_test_resnet', '--random-init', '--num-classes', '10', '--input-size', '3',
                           '8', '8', '--target-ratio', '0.5', '--no-latency', '--dataset', 'digits', '--img-size',
                           '8', '--eval-batches', '1', '--output', str(fs / 'out')])
        err = capsys.readouterr().err.strip().splitlines()
        left = [n for _, _, files in os.walk(fs) for n in files]
    finally:  # lazy: the failed writer's file handle may live until its traceback is collected
        subprocess.run(['umount', '-l', str(fs)], check=True)
    assert e.value.code == 1 and err[-1].startswith('fnl-compress: error: ') and reason in err[-1], err[-3:]
    assert left == []
