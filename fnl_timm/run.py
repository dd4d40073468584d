"""Run any timm script with the FNL plugin loaded.

timm's ``train.py`` takes ``--device-modules fnl_timm``, but ``validate.py``, ``benchmark.py`` and
``inference.py`` have no such flag, so ``--model fnl_resnet20`` is an unknown model there. This
runner imports :mod:`fnl_timm` (which registers the factorized models and the Frobenius-decay
optimizers in timm's registries) and then runs the script exactly as ``python SCRIPT.py ARGS``
would: as ``__main__``, with ``sys.argv = [SCRIPT.py, *ARGS]`` and the script's folder first on
``sys.path``::

    python -m fnl_timm.run validate.py --model fnl_resnet20 --checkpoint model_best.pth.tar ...
    python -m fnl_timm.run benchmark.py --model fnl_resnet20 --model-kwargs rank_scale=0.111 ...
    python -m fnl_timm.run -m some.module ARGS     # a module instead of a file, like ``python -m``

Nothing is imported into other Python processes: only the process this command starts sees the
plugin.
"""
import os
import runpy
import sys
from typing import List, Optional, Sequence

USAGE = ("usage: python -m fnl_timm.run SCRIPT.py [ARGS ...]\n"
         "       python -m fnl_timm.run -m MODULE [ARGS ...]\n"
         "Runs a timm script (validate.py, benchmark.py, inference.py, train.py, ...) with the fnl_timm "
         "models and optimizers registered.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Import the plugin, then run ``argv[0]`` (a script path, or ``-m MODULE``) as ``__main__``.

    Args:
        argv: the runner's arguments (default: ``sys.argv[1:]``): the script and its own arguments.
    """
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ('-h', '--help'):
        print(USAGE)
        raise SystemExit(0 if args else 2)

    # the fnl_timm package, imported before this submodule, has registered the models and optimizers

    if args[0] == '-m':
        if len(args) < 2:
            print(f"fnl_timm.run: error: -m needs a module name\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
        module, rest = args[1], args[2:]
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name='__main__', alter_sys=True)
        return

    script, rest = args[0], args[1:]
    if not os.path.isfile(script):
        print(f"fnl_timm.run: error: SCRIPT {script!r} is not a file (give the path of a timm script such as "
              "validate.py, or -m MODULE)", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
