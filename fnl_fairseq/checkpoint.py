"""Loading fairseq checkpoints without running code from them.

**Weights only.** fairseq 0.12 calls ``torch.load`` without ``weights_only``; since torch 2.6 that
means ``weights_only=True``, which refuses every non-tensor, non-container type in the pickle.
fairseq saves its config as plain containers (``OmegaConf.to_container``), except for the legacy
models' argument namespace (``cfg.model``, an ``argparse.Namespace``), and
``torch.serialization.get_unsafe_globals_in_checkpoint`` lists exactly that one type for the
checkpoints this plugin writes (fp32, --amp, --memory-efficient-fp16, with and without the FD
optimizers' state). So that one type is allowed, once, at plugin import, rather than turning
``weights_only`` off for the whole process. A file that names anything else (a pickled object, a
payload) is refused, and no code from it runs.

**Clear errors.** At plugin import fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (which
``fairseq-generate --path``, ``fairseq-interactive --path``, ``fairseq-train --restore-file`` and
``from_pretrained`` use) is wrapped: when it fails, the file is examined and the error says in
one line what is wrong with it (missing, a folder, empty, truncated, not a torch file, a pickle
that only the full unpickler reads, not a fairseq checkpoint). A successful load is unchanged.

**No eval of checkpoint strings.** A checkpoint's config is data from whoever wrote the file, but
fairseq reads some settings with ``eval()`` when it builds a model, an optimizer or a criterion
(``utils.eval_str_list`` / ``eval_str_dict`` / ``eval_bool`` and direct ``eval`` calls, in any
architecture). Every loaded fairseq module gets an ``eval`` that evaluates literals only
(:mod:`fnl_fairseq.safe_eval`), installed at plugin import and again before each checkpoint load.
The wrapper also refuses, at load time and naming the flag, a checkpoint in which one of the
settings of :data:`EVALUATED_SETTINGS` is not a plain Python literal, and ``fnl_transformer``
checks its own settings the same way when it is built.
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import sys
from typing import Any, Callable

import torch

from fnl._serialization import load_file

from . import safe_eval

__all__ = ["EVALUATED_SETTINGS", "SAFE_GLOBALS", "check_literal_settings", "register_safe_globals",
           "wrap_checkpoint_loading"]

SAFE_GLOBALS: list = [argparse.Namespace]

# the model settings fairseq 0.12 evaluates with eval() when it builds a model, and their flags
EVALUATED_SETTINGS = {"adaptive_softmax_cutoff": "--adaptive-softmax-cutoff",
                      "adaptive_input_cutoff": "--adaptive-input-cutoff",
                      "encoder_xformers_att_config": "--encoder-xformers-att-config",
                      "decoder_xformers_att_config": "--decoder-xformers-att-config",
                      "xformers_att_config": "--xformers-att-config"}

# the fairseq flags that name a checkpoint file (--path takes several, separated by os.pathsep)
_PATH_FLAGS = ("--path", "--restore-file", "--finetune-from-model")

_HINT = "a fairseq checkpoint needs no unpickling of Python objects beyond argparse.Namespace; do not load this file"


def register_safe_globals() -> None:
    """Allow the types fairseq checkpoints hold in ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


def check_literal_settings(args: Any, where: str) -> None:
    """Refuse a config whose settings of :data:`EVALUATED_SETTINGS` are strings that are not Python literals.

    Args:
        args: a model config (``argparse.Namespace``, ``DictConfig`` or dataclass).
        where: what the config came from, for the message (a flag list, a checkpoint path).

    Raises:
        ValueError: a setting fairseq would ``eval()`` that is not a literal, naming its flag.
    """
    for attr, flag in EVALUATED_SETTINGS.items():
        try:
            value = getattr(args, attr, None)
        except Exception:  # noqa: BLE001 - a DictConfig without the key
            value = None
        if not isinstance(value, str):
            continue
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"{where}: {flag} {value[:80]!r} is not a Python literal (numbers, strings, tuples, "
                             "lists, dicts); fairseq would run it as code with eval(), which this plugin refuses") \
                from None


def _model_configs(state: Any) -> list:
    configs = []
    if isinstance(state, dict):
        if state.get("args") is not None:
            configs.append(state["args"])
        cfg = state.get("cfg")
        if cfg is not None:
            model = cfg.get("model") if hasattr(cfg, "get") else getattr(cfg, "model", None)
            if model is not None:
                configs.append(model)
    return configs


def _arg_name(path: str) -> str:
    """The command-line flag that named ``path`` (``--path``, ``--restore-file``, ...), else 'checkpoint'."""
    argv = sys.argv
    for flag, value in zip(argv, argv[1:]):
        if flag in _PATH_FLAGS and path in value.split(os.pathsep):
            return flag
    return "checkpoint"


def _explain(path: Any, error: BaseException) -> None:
    """Raise a one-line ``ValueError`` saying what is wrong with the file ``path`` (a load of it just failed)."""
    if not isinstance(path, str) or "://" in path:
        return  # a remote path: fairseq's own error stands
    arg = _arg_name(path)
    state = load_file(path, arg, safe_globals=SAFE_GLOBALS, hint=_HINT)  # raises for an unreadable file
    if not isinstance(state, dict) or "model" not in state or ("cfg" not in state and "args" not in state):
        keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{arg} {path!r} is not a fairseq checkpoint (it holds {keys}; a fairseq checkpoint "
                         "has 'model' and 'cfg'), e.g. a checkpoint of another library or architecture") from None


def wrap_checkpoint_loading() -> None:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (once): clear errors for bad files and
    a refusal of configs with strings fairseq would ``eval()``."""
    from fairseq import checkpoint_utils

    original: Callable = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_fnl_checked", False):
        return

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args: Any, **kwargs: Any):
        # registered again on every load: torch's ``safe_globals`` context (timm's ``load_checkpoint``
        # uses one) removes its globals on exit, the plugin's registration at import included
        register_safe_globals()
        safe_eval.install()  # fairseq modules imported since the plugin was
        try:
            state = original(path, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - explained below, or re-raised as it was
            _explain(path, e)
            raise
        for config in _model_configs(state):
            check_literal_settings(config, f"{_arg_name(path) if isinstance(path, str) else 'checkpoint'} {path!r}")
        return state

    load_checkpoint_to_cpu._fnl_checked = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


register_safe_globals()
safe_eval.install()
wrap_checkpoint_loading()
