"""Without fairseq installed, the plugin's command lines say in one line what to install.

fairseq is hidden from a fresh interpreter (``sys.modules['fairseq'] = None`` makes ``import fairseq``
raise ``ModuleNotFoundError``, as when it is not installed), so these run with or without fairseq.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDE = "import sys; sys.modules['fairseq'] = None; sys.modules['fairseq_cli'] = None; "
LINE = 'fnl_fairseq needs fairseq, which is not installed: pip install "fnl[fairseq]"'


def _python(code, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", HIDE + code, *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("cli, code, args", [
    # what the fnl-fairseq-train console script runs
    ("fnl-fairseq-train", "from fnl_fairseq.launch import main; sys.exit(main())", ["--", "data-bin", "--cpu"]),
    ("python -m fnl_fairseq", "import runpy; runpy.run_module('fnl_fairseq', run_name='__main__')", []),
])
def test_cli_without_fairseq_says_what_to_install(cli, code, args):
    out = _python(code, *args)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [f"{cli}: error: {LINE}"], out.stderr  # one line, no traceback
    assert out.stdout == ""


def test_the_extra_named_is_the_one_pyproject_declares():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        pytest.skip("tomllib needs Python >= 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith(("fairseq==", "fairseq-fixed==")) for req in extras["fairseq"])


def test_library_import_without_fairseq_raises_with_the_advice():
    out = _python("import fnl_fairseq\n"
                  "try:\n    fnl_fairseq.FNLTransformerModel\nexcept ImportError as e:\n    print(e)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == LINE
