"""Faults at the end of a run and resumes into folders that hold other results (fnl-train).

A run killed while it finishes (replacing the timm folder ``hf/``, before ``results.json``) is
finished by the next ``--resume`` of its last checkpoint, with the previous ``hf/`` kept meanwhile;
``--resume`` refuses a checkpoint older than its folder's ``last.pth.tar`` and a folder whose
``results.json`` is not an fnl-train run's, leaving every file as it was; the temporary files of
other programs are never removed. Tiny model, 8x8 inputs, 3 steps an epoch.
"""
import json
import os
import shutil

import pytest
import torch

timm = pytest.importorskip('timm')
import fnl_timm  # noqa: E402,F401
from fnl_timm import _hf  # noqa: E402
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm import train_checkpoint  # noqa: E402
from test_faults import _checksums, one_thread  # noqa: E402,F401  (one_thread: the module's autouse fixture)

BASE = ['--model', 'fnl_test_resnet', '--img-size', '8', '--batch-size', '16', '--workers', '0',
        '--limit-train-batches', '3', '--limit-val-batches', '1', '--no-progress', '--no-tensorboard',
        '--lr', '0.05', '--rank-scale', '0.3', '--wd2fd', '--checkpoint-hist', '3', '--epochs', '2']


@pytest.fixture(scope='module')
def finished(tmp_path_factory, one_thread):
    """A finished 2-epoch run (checkpoint-0 and checkpoint-1 kept)."""
    out = tmp_path_factory.mktemp('finished')
    fnl_train.run(BASE + ['--output', str(out), '--experiment', 'r'])
    return out / 'r'


def _main(argv, capsys):
    try:
        code = fnl_train.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _resume(run, *extra):
    return BASE + ['--resume', str(run / 'last.pth.tar'), *extra]


def test_a_kill_while_hf_is_replaced_keeps_the_old_one_and_the_next_resume_finishes(tmp_path, finished,
                                                                                  monkeypatch):
    """The kill falls between moving the old hf/ aside and renaming the new one in: the next resume puts the
    old one back, removes the unverified new one, and (results.json being of the shorter run) finishes the
    run: a new hf/ and results.json of all its epochs."""
    run = tmp_path / 'r'
    shutil.copytree(finished, run)
    real_replace = os.replace
    moved = []

    def killed(src, dst):
        if os.path.basename(src) == 'hf' and '.old-hf-' in str(dst):
            moved.append(dst)
        elif moved and os.path.basename(dst) == 'hf':
            raise KeyboardInterrupt('killed between the two renames')
        return real_replace(src, dst)
    monkeypatch.setattr(_hf.os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt):
        fnl_train.run(_resume(run, '--epochs', '3'))
    monkeypatch.undo()
    assert not (run / 'hf').exists()
    assert any(n.startswith('.old-hf-') for n in os.listdir(run))
    assert json.loads((run / 'results.json').read_text())['epochs_run'] == 2  # the old results
    res = fnl_train.run(_resume(run, '--epochs', '3'))
    assert res['epochs_run'] == 3 and res['top1'] is not None and res['hf'] == str(run / 'hf')
    assert json.loads((run / 'results.json').read_text())['epochs_run'] == 3
    assert (run / 'hf' / 'model.safetensors').exists()
    assert not [n for n in os.listdir(run) if n.startswith(('.old-hf-', '.tmp-hf-'))]
    # the timm folder loads and is the best checkpoint's model
    model = timm.create_model(f'local-dir:{run / "hf"}', pretrained=True)
    best = torch.load(run / 'model_best.pth.tar', weights_only=False)['state_dict']  # written by this test
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_tidying_puts_back_the_old_hf_folder(tmp_path):
    """remove_stale_tmp restores hf/ from .old-hf-*/hf where hf/ is missing, and keeps a present hf/."""
    run = tmp_path / 'r'
    (run / '.old-hf-abc' / 'hf').mkdir(parents=True)
    (run / '.old-hf-abc' / 'hf' / 'config.json').write_text('{"old": 1}')
    (run / '.tmp-hf-xyz').mkdir()
    (run / '.tmp-hf-xyz' / 'config.json').write_text('{"new": 1}')
    train_checkpoint.remove_stale_tmp(str(run))
    assert sorted(os.listdir(run)) == ['hf'] and (run / 'hf' / 'config.json').read_text() == '{"old": 1}'
    (run / '.old-hf-def' / 'hf').mkdir(parents=True)
    (run / '.old-hf-def' / 'hf' / 'config.json').write_text('{"older": 1}')
    train_checkpoint.remove_stale_tmp(str(run))  # hf/ is there: the one moved aside stays where it is
    assert (run / 'hf' / 'config.json').read_text() == '{"old": 1}'
    assert (run / '.old-hf-def' / 'hf' / 'config.json').exists()


def test_a_kill_before_results_json_is_finished_by_the_next_resume(tmp_path, finished, monkeypatch, caplog):
    run = tmp_path / 'r'
    shutil.copytree(finished, run)
    (run / 'results.json').unlink()
    (run / 'results.json.tmp').write_text('{"partial": ')  # what the kill left
    res = fnl_train.run(_resume(run))
    assert 'results.json is missing or older' in caplog.text
    assert res['epochs_run'] == 2 and res['top1'] is not None
    assert json.loads((run / 'results.json').read_text())['epochs_run'] == 2
    assert not (run / 'results.json.tmp').exists()
    before = _checksums(run)
    caplog.clear()
    fnl_train.run(_resume(run))  # now finished: nothing to do, nothing changed
    assert 'nothing left to train' in caplog.text and _checksums(run) == before


def test_resume_of_an_earlier_checkpoint_is_refused_and_changes_nothing(tmp_path, finished, capsys):
    run = tmp_path / 'r'
    shutil.copytree(finished, run)
    before = _checksums(run)
    code, err = _main(BASE + ['--resume', str(run / 'checkpoint-0.pth.tar'), '--lr', '0.5'], capsys)
    assert code == 2 and len(err) == 1, err
    assert "continues at epoch 1, but its run folder's" in err[0] and 'continues at epoch 2' in err[0]
    assert 'copy checkpoint-0.pth.tar into a new folder' in err[0]
    assert _checksums(run) == before
    # the suggested branch: a copy in a folder of its own trains from epoch 1 and leaves the run alone
    branch = tmp_path / 'branch'
    branch.mkdir()
    shutil.copy(run / 'checkpoint-0.pth.tar', branch)
    res = fnl_train.run(BASE + ['--resume', str(branch / 'checkpoint-0.pth.tar'), '--lr', '0.5'])
    assert (res['start_epoch'], res['epochs_run']) == (1, 2) and res['experiment'] == 'branch'
    assert _checksums(run) == before


def test_resume_into_a_folder_with_foreign_results_is_refused(tmp_path, finished, capsys):
    folder = tmp_path / 'downloads'
    folder.mkdir()
    shutil.copy(finished / 'last.pth.tar', folder / 'ckpt.pth.tar')
    (folder / 'results.json').write_text('{"my": "other experiment"}')
    (folder / 'draft.tmp').write_text('an editor buffer')
    before = _checksums(folder)
    code, err = _main(BASE + ['--resume', str(folder / 'ckpt.pth.tar'), '--epochs', '3'], capsys)
    assert code == 2 and len(err) == 1 and 'holds a results.json that is not of an fnl-train run' in err[0], err
    assert _checksums(folder) == before
    (folder / 'results.json').unlink()  # a folder of its own: the run goes on there; draft.tmp is not ours
    res = fnl_train.run(BASE + ['--resume', str(folder / 'ckpt.pth.tar'), '--epochs', '3'])
    assert res['epochs_run'] == 3
    assert (folder / 'draft.tmp').read_text() == 'an editor buffer'


def test_only_fnl_trains_own_temporary_files_are_removed(tmp_path):
    own = ['results.json.tmp', 'summary.csv.tmp', 'last.pth.tar.tmp', 'checkpoint-3.pth.tar.tmp', 'tmp.pth.tar',
           'frobnorms.pt.tmp', 'model_collapsed.pth.tmp', '.fnl-write-test.tmp']
    other = ['draft.tmp', 'notes.txt.tmp', 'data.tmp', 'results.json']
    for name in own + other:
        (tmp_path / name).write_text('x')
    train_checkpoint.remove_stale_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(other)
