"""fairseq plugin for FNL (Khodak et al., ICLR 2022): factorized Transformers with query-key and
output-value factorization, spectral initialisation and Frobenius-decay optimizers.

Use it as a fairseq ``--user-dir`` (``python -m fnl_fairseq`` prints the path)::

    fairseq-train DATA --user-dir $(python -m fnl_fairseq) --arch fnl_transformer_small \\
        --rank-scale 0.5 --spectral --spectral-quekey --spectral-outval \\
        --wd2fd --wd2fd-quekey --wd2fd-outval --optimizer fd_nag --weight-decay 1e-4 ...

Importing it registers the ``fnl_transformer`` model and its architectures, the ``fd_nag``,
``fd_adam`` and ``fd_sgd`` optimizers, and the one type fairseq checkpoints hold besides tensors
and containers as a safe global for ``torch.load(weights_only=True)``; it also wraps fairseq's
checkpoint loader for one-line errors about bad files and refuses checkpoints whose config holds
code where fairseq would ``eval()`` a setting (``fnl_fairseq.checkpoint``).

Without fairseq installed the package still imports (registering nothing), so that its command
lines can say in one line what to install (:func:`require_fairseq`); ``FNLTransformerModel`` then
raises an ``ImportError`` with the same advice.
"""
from typing import Any, Optional

__all__ = ["FNLTransformerModel", "MISSING_FAIRSEQ", "require_fairseq", "user_dir"]

INSTALL_HINT = 'pip install "fnl[fairseq]"'


def _fairseq_missing() -> Optional[str]:
    """Why fairseq cannot be imported (a one-line message with the install command), or None."""
    try:
        import fairseq  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "fairseq":
            raise  # fairseq is there but one of its own dependencies is not: its error says which
        return f"fnl_fairseq needs fairseq, which is not installed: {INSTALL_HINT}"
    return None


MISSING_FAIRSEQ: Optional[str] = _fairseq_missing()

if MISSING_FAIRSEQ is None:
    from . import checkpoint  # noqa: F401  (safe globals first: fairseq may load a checkpoint next)
    from . import optim  # noqa: F401
    from .models import fnl_transformer  # noqa: F401
    from .models.fnl_transformer import FNLTransformerModel
else:
    def __getattr__(name: str) -> Any:
        if name == "FNLTransformerModel":
            raise ImportError(MISSING_FAIRSEQ)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_fairseq(prog: str) -> None:
    """For command lines: without fairseq, print one line with the install command and exit with status 1."""
    if MISSING_FAIRSEQ is not None:
        import sys

        print(f"{prog}: error: {MISSING_FAIRSEQ}", file=sys.stderr)
        raise SystemExit(1)


def user_dir() -> str:
    """The path to pass to fairseq's ``--user-dir``."""
    import os

    return os.path.dirname(os.path.abspath(__file__))
