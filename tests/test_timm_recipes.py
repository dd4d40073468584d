"""Every vision recipe runs for real with --smoke (a few steps on the embedded digits).

ResNet recipes use their real models; the compression and WRN recipes use ``--small`` (shallower /
narrower variants of the same architectures) to keep CI on 2 CPU cores in seconds.
"""
import importlib
import json
import os
import sys

import pytest

pytest.importorskip('timm')
pytest.importorskip('matplotlib')

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes')


def _recipe(name):
    if RECIPES not in sys.path:
        sys.path.insert(0, RECIPES)
    return importlib.import_module(name)


def test_factorized_resnet(tmp_path):
    rows = _recipe('factorized_resnet').main(['--smoke', '--output', str(tmp_path)])
    by = {r['run']: r for r in rows}
    assert by['resnet20-dense']['params'] == 269_722
    assert by['resnet20-lowrank-spectral-fd']['params'] == 63_850
    assert by['resnet20-lowrank-spectral-fd']['spectral'] and by['resnet20-lowrank-spectral-fd']['wd2fd']
    assert not by['resnet20-lowrank-wd']['wd2fd']
    assert json.loads((tmp_path / 'factorized_resnet.json').read_text())[0]['run'] == 'resnet20-dense'


def test_normalization(tmp_path):
    import torch
    rows = _recipe('normalization').main(['--smoke', '--small', '--output', str(tmp_path)])
    assert [r['mode'] for r in rows] == ['frob', 'none', 'norm'] * 2
    assert [r['spectral'] for r in rows] == [False] * 3 + [True] * 3
    for frob, norm in ((rows[0], rows[2]), (rows[3], rows[5])):
        a = torch.load(frob['frobnorms'], weights_only=True)
        b = torch.load(norm['frobnorms'], weights_only=True)
        assert a.shape[:2] == (2, 2) and torch.allclose(a, b, rtol=1e-5)
    assert (tmp_path / 'normalization.png').stat().st_size > 10_000


def test_deep_distillation(tmp_path):
    rows = _recipe('deep_distillation').main(['--smoke', '--small', '--output', str(tmp_path)])
    dense, square = rows
    assert square['square'] and square['rank_scale'] == 1.0
    assert square['params'] > dense['params']  # overcomplete while training
    assert square['collapsed_params'] == dense['params'] == square['dense_params']
    assert square['collapse_max_abs_diff'] < 1e-4


def test_compression_and_plot(tmp_path):
    rows = _recipe('compression').main(['--smoke', '--small', '--output', str(tmp_path)])
    assert [r['model'] for r in rows] == ['fnl_resnet32_x2', 'fnl_vgg19']
    for r in rows:
        assert r['target_ratio'] == 0.1 and abs(r['compression_ratio'] - 0.1) < 0.01, r['compression_ratio']
    out = _recipe('plot_results').main([str(tmp_path), '--out', str(tmp_path / 'acc.png')])
    assert os.path.getsize(out) > 10_000


def test_wrn_lowrank(tmp_path):
    rows = _recipe('wrn_lowrank').main(['--smoke', '--small', '--output', str(tmp_path)])
    (r,) = rows
    assert r['model'] == 'fnl_wrn28_10' and abs(r['compression_ratio'] - 0.06667) < 0.005


def test_small_needs_smoke(tmp_path):
    with pytest.raises(ValueError, match='--small'):
        _recipe('factorized_resnet').main(['--small', '--dry-run', '--output', str(tmp_path)])


def test_demo_quick(tmp_path):
    from fnl_timm import demo
    rows = demo.run(['--epochs', '1', '--limit-train-batches', '2', '--batch-size', '16', '--output', str(tmp_path)])
    assert [r['run'] for r in rows] == ['dense', 'low rank, default init + wd', 'low rank, spectral + FD']
    assert rows[0]['params'] == 269_722 and rows[1]['params'] == rows[2]['params'] < 269_722 // 4
    assert all(0.0 <= r['top1'] <= 100.0 and len(r['curve']) == 1 for r in rows)
    assert (tmp_path / 'demo.png').stat().st_size > 10_000


def test_bench_smoke():
    bench_dir = os.path.join(os.path.dirname(RECIPES), 'bench')
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    bench = importlib.import_module('bench_timm')
    rows = bench.main(['--models', 'resnet20', '--batch-size', '4', '--iters', '1', '--warmup', '0'])
    dense, fact = rows
    assert (dense['params'], fact['params']) == (269_722, 63_850)
    assert fact['mac_ratio'] == pytest.approx(dense['macs'] / fact['macs']) and fact['mac_ratio'] > 4
    assert fact['train_speedup'] > 0 and fact['infer_speedup'] > 0


def test_train_module_help():
    import subprocess
    root = os.path.dirname(RECIPES)
    proc = subprocess.run([sys.executable, '-m', 'fnl_timm.train', '--help'], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and '--wd2fd' in proc.stdout and '--normalize' in proc.stdout
    from fnl_timm import train as fnl_train
    with pytest.raises(SystemExit) as exc:
        fnl_train.run(['--spectral'])
    assert exc.value.code == 2
