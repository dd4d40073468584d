"""The package as a user gets it from ``pip``: pyproject.toml metadata, the wheel's contents, and the
wheel working on its own in a fresh virtual environment (no source tree on the path).

The wheel is built offline (``--no-index --no-build-isolation``) from a copy of the files a source
distribution carries, so the test neither needs the network nor writes ``build/`` into the checkout.
The fresh environment is ``python -m venv --without-pip``; torch and timm come from the project's
own environment through ``PYTHONPATH`` (``.pth`` files there, such as an editable install of this
project, are not read from ``PYTHONPATH``), and the check that ``fnl`` was imported from the
unpacked wheel guards against the checkout leaking in.
"""
import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ('fnl', 'fnl_timm', 'fnl_fairseq')

EXTRAS = {
    'timm': {'timm>=1.0.12', 'torchvision', 'scikit-learn', 'matplotlib', 'tqdm', 'tensorboard'},
    'fairseq': {'fairseq==0.12.2; python_version < "3.11"', 'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
                'sacrebleu>=2.0', 'sentencepiece'},
    'onnx': {'onnx', 'onnxscript', 'onnxruntime'},
    'dev': {'pytest', 'tensorly', 'hypothesis', 'mutmut'},
}
SCRIPTS = {
    'fnl-train': 'fnl_timm.train:main',
    'fnl-demo': 'fnl_timm.demo:main',
    'fnl-compress': 'fnl_timm.compress:main',
    'fnl-fairseq-train': 'fnl_fairseq.launch:main',
}

@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp('src')
    for name in ('pyproject.toml', 'setup.py', 'README.md'):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    out = tmp_path_factory.mktemp('wheel')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
         '-w', str(out), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob('fnl-0.1.0-*.whl'))
    assert len(wheels) == 1, os.listdir(out)
    return wheels[0]


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    return zf.read(f'fnl-0.1.0.dist-info/{name}').decode()


def test_setup_py_is_a_shim():
    """All metadata lives in pyproject.toml: setup.py only calls setup()."""
    code = (ROOT / 'setup.py').read_text()
    assert 'setup()' in code
    for key in ('name=', 'version=', 'install_requires', 'extras_require', 'entry_points'):
        assert key not in code, key


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = email.parser.Parser().parsestr(_dist_info(zf, 'METADATA'))
        entry_points = _dist_info(zf, 'entry_points.txt')
    assert meta['Name'] == 'fnl' and meta['Version'] == '0.1.0'
    assert meta['Requires-Python'] == '>=3.9'
    assert meta['Description-Content-Type'] == 'text/markdown'
    assert 'Frobenius decay' in meta.get_payload()  # the README is the long description
    assert set(meta.get_all('Provides-Extra')) == set(EXTRAS)
    requires = meta.get_all('Requires-Dist')
    assert [r for r in requires if 'extra ==' not in r] == ['torch>=2.1']  # the core needs only torch
    for extra, expected in EXTRAS.items():
        got = set()
        for r in requires:
            req, sep, marker = r.partition(';')
            if f'extra == "{extra}"' not in marker:
                continue
            env = marker.replace(f'and extra == "{extra}"', '').replace(f'extra == "{extra}"', '').strip()
            got.add(f'{req.strip()}; {env}' if env else req.strip())
        assert got == expected, extra
    scripts = {}
    section = None
    for line in entry_points.splitlines():
        line = line.strip()
        if line.startswith('['):
            section = line
        elif line and section == '[console_scripts]':
            k, v = (s.strip() for s in line.split('=', 1))
            scripts[k] = v
    assert scripts == SCRIPTS


def test_wheel_files(wheel):
    """Exactly the three packages, every module of them; no tests, recipes or benchmarks."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    tops = {n.split('/')[0] for n in names}
    assert tops == set(PACKAGES) | {'fnl-0.1.0.dist-info'}
    source = {str(p.relative_to(ROOT)).replace(os.sep, '/') for pkg in PACKAGES for p in (ROOT / pkg).rglob('*.py')
              if '__pycache__' not in p.parts}
    assert source <= names, sorted(source - names)
    assert not any(n.startswith(('tests/', 'recipes/', 'bench/', 'docs/')) for n in names)


def test_wheel_in_a_fresh_venv(wheel, tmp_path):
    """``import fnl, fnl_timm``, ``fnl-train --help`` through its entry point, one fnl_resnet20 forward."""
    site = tmp_path / 'site'
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env_dir = tmp_path / 'env'
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
    deps = sysconfig.get_paths()['purelib']  # this environment's torch and timm
    script = '\n'.join([
        'import sys, contextlib, io',
        'from importlib.metadata import distribution',
        'import fnl, fnl_timm, torch, timm',
        f'assert fnl.__file__.startswith({str(site)!r}), fnl.__file__',
        f'assert fnl_timm.__file__.startswith({str(site)!r}), fnl_timm.__file__',
        'eps = {ep.name: ep for ep in distribution("fnl").entry_points if ep.group == "console_scripts"}',
        'main = eps["fnl-train"].load()',
        'sys.argv = ["fnl-train", "--help"]',
        'buf = io.StringIO()',
        'with contextlib.redirect_stdout(buf):',
        '    try:',
        '        main()',
        '    except SystemExit as e:',
        '        assert e.code in (0, None), e.code',
        'assert buf.getvalue().startswith("usage: fnl-train"), buf.getvalue()[:200]',
        'model = timm.create_model("fnl_resnet20", rank_scale=0.111).eval()',
        'with torch.no_grad():',
        '    out = model(torch.randn(2, 3, 32, 32))',
        'assert out.shape == (2, 10), out.shape',
        'print("ok", sum(p.numel() for p in model.parameters()))',
    ])
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
    env['PYTHONPATH'] = os.pathsep.join([str(site), deps])
    proc = subprocess.run([str(python), '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ['ok', '63850']  # the paper's factorized ResNet20
