"""``python -m fnl_timm.run SCRIPT.py ARGS``: timm scripts without --device-modules see the fnl models."""
import subprocess
import sys
import textwrap

import pytest

# a stand-in for timm's validate.py / benchmark.py: it knows nothing of fnl_timm
SCRIPT = textwrap.dedent('''
    import argparse, sys
    import timm
    import helper_beside_script  # the script's own folder is on sys.path, as with `python SCRIPT.py`
    p = argparse.ArgumentParser()
    p.add_argument('--model')
    p.add_argument('--exit-code', type=int, default=0)
    a = p.parse_args()
    m = timm.create_model(a.model, rank_scale=0.111)
    print('params', sum(x.numel() for x in m.parameters()), 'main', __name__, 'argv0', sys.argv[0].endswith('fake_validate.py'))
    sys.exit(a.exit_code)
''')


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def script(tmp_path):
    # the script lives in its own folder, the commands run from tmp_path: only the runner's sys.path
    # entry lets it import its neighbour
    folder = tmp_path / 'timm_repo'
    folder.mkdir()
    (folder / 'helper_beside_script.py').write_text('X = 1\n')
    path = folder / 'fake_validate.py'
    path.write_text(SCRIPT)
    return path


def test_script_sees_fnl_models_only_through_the_runner(script, tmp_path):
    # `python -m fnl_timm.run` imports the fnl_timm package before run.py itself: that registration is what
    # the runner exists for, and a plain `python SCRIPT.py` lacks it
    plain = _run([str(script), '--model', 'fnl_resnet20'], tmp_path)
    assert plain.returncode != 0 and 'Unknown model' in plain.stderr, plain.stderr[-500:]

    ran = _run(['-m', 'fnl_timm.run', str(script), '--model', 'fnl_resnet20'], tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    # 63,850 parameters: ResNet20 at rank_scale 0.111 (ranks 5, 11, 21), as in the paper's count
    assert 'params 63850 main __main__ argv0 True' in ran.stdout, ran.stdout


def test_exit_code_and_bad_arguments(script, tmp_path):
    ran = _run(['-m', 'fnl_timm.run', str(script), '--model', 'fnl_resnet20', '--exit-code', '3'], tmp_path)
    assert ran.returncode == 3, ran.stderr[-2000:]

    missing = _run(['-m', 'fnl_timm.run', str(tmp_path / 'nope.py')], tmp_path)
    assert missing.returncode == 2 and "SCRIPT" in missing.stderr and 'nope.py' in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr

    empty = _run(['-m', 'fnl_timm.run'], tmp_path)
    assert empty.returncode == 2 and 'usage' in empty.stdout


def test_module_form(tmp_path):
    (tmp_path / 'fake_bench_mod.py').write_text(
        "import sys, timm\nm = timm.create_model(sys.argv[1])\nprint('ok', type(m).__name__, __name__)\n")
    ran = subprocess.run([sys.executable, '-m', 'fnl_timm.run', '-m', 'fake_bench_mod', 'fnl_test_resnet'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**__import__('os').environ, 'PYTHONPATH': str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert 'ok CifarResNet __main__' in ran.stdout, ran.stdout
