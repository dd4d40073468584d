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
"""
from . import checkpoint  # noqa: F401  (safe globals first: fairseq may load a checkpoint next)
from . import optim  # noqa: F401
from .models import fnl_transformer  # noqa: F401
from .models.fnl_transformer import FNLTransformerModel

__all__ = ["FNLTransformerModel", "user_dir"]


def user_dir() -> str:
    """The path to pass to fairseq's ``--user-dir``."""
    import os

    return os.path.dirname(os.path.abspath(__file__))
