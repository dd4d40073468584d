"""Reading timm / fnl-train / fnl-compress files without running code from them.

Every command of this plugin reads its input files through :func:`load_file`:
``torch.load(weights_only=True)`` with exactly one extra type allowed, the ``argparse.Namespace``
that timm's ``CheckpointSaver`` (and so fnl-train) stores as ``args``. fnl-compress's
``compressed.pth`` and the normalisation experiment's norms need nothing extra, and their readers
(``load_compressed``, ``fnl.load_frobnorms``) allow nothing extra. A whole pickled
module (fnl-compress's ``model.pt``) and a TorchScript file are programs: they load only with
``trust_pickle=True`` (``--trust-pickle``), and are refused with the flag named otherwise.
"""
import argparse
import os
import zipfile
from contextlib import AbstractContextManager
from typing import Any, Dict, Optional

import torch
from torch import nn

from fnl._serialization import TRUST_HINT, UntrustedPickleError, allow_globals, check_input_file
from fnl._serialization import load_file as _load_file

__all__ = ['CHECKPOINT_GLOBALS', 'TRUST_HINT', 'UntrustedPickleError', 'WEIGHTS_ONLY_HINT', 'allow_argparse_namespace',
           'check_input_file', 'is_torchscript', 'load_checkpoint', 'load_file', 'load_torchscript', 'state_dict_mismatch',
           'state_dict_of']

CHECKPOINT_GLOBALS = (argparse.Namespace,)  # timm's CheckpointSaver saves the run's args

# the end of a refusal where the command has no --trust-pickle (fnl-train): what it reads instead
WEIGHTS_ONLY_HINT = ("this command reads only files that need no unpickling (state dicts, timm / fnl-train "
                     "checkpoints, fnl-compress's compressed.pth); from a pickled module you trust, save "
                     "model.state_dict() in Python and give that file")


def allow_argparse_namespace() -> AbstractContextManager:
    """A context in which ``weights_only`` loads accept ``argparse.Namespace``, leaving existing registrations in place."""
    return allow_globals(CHECKPOINT_GLOBALS)


def load_file(path: 'os.PathLike | str', arg_name: str, *, trust_pickle: bool = False,
              hint: str = TRUST_HINT) -> Any:
    """``fnl._serialization.load_file`` with the types timm / fnl-train checkpoints hold allowed.

    Args:
        path: the file.
        arg_name: the argument that named it; every error names it.
        trust_pickle: a file the weights-only reader refuses is then read by the full unpickler, which
            runs any code the file names: trusted files only.
        hint: the end of the refusal of a file that needs the full unpickler.
    """
    return _load_file(path, arg_name, trust_pickle=trust_pickle, safe_globals=CHECKPOINT_GLOBALS, hint=hint)


def is_torchscript(path: str) -> bool:
    """TorchScript archives hold ``<name>/code/`` and ``<name>/constants.pkl``; ``torch.save`` ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def load_torchscript(path: str, arg_name: str, *, trust_pickle: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU, only with ``trust_pickle``: a TorchScript file is a program (its code
    runs when it is loaded and called) and torch offers no safe mode for it."""
    path = check_input_file(path, arg_name)
    if not trust_pickle:
        raise UntrustedPickleError(
            f'{arg_name} {path!r} is refused: it is a TorchScript program, and loading it runs code from the file; '
            'only if you trust where it came from, add --trust-pickle (trust_pickle=True in Python), or give a '
            'state dict instead (torch.save(model.state_dict(), ...) needs no code to load)')
    try:
        return torch.jit.load(path, map_location='cpu')
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ValueError(f'{arg_name} {path!r} could not be read as TorchScript ({type(e).__name__}: {first})') \
            from None


def state_dict_of(obj: Any, path: str, arg_name: str = '--checkpoint') -> Dict[str, torch.Tensor]:
    """The model weights in a loaded file: a state dict, or one under 'state_dict' / 'model_state_dict' /
    'model' (timm, fnl-train), without DDP's ``module.`` prefix."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ('state_dict', 'model_state_dict', 'model'):  # the plain weights, not an EMA
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}
    raise ValueError(f'{arg_name} {path!r} holds no state dict (expected a dict of tensors, or one under '
                     f"'state_dict' / 'model'; got {type(obj).__name__})")


def state_dict_mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``model``, in one line ('' when it fits exactly)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing key(s) (e.g. {missing[0]!r})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]!r})')
    if shapes:
        k = shapes[0]
        parts.append(f'{len(shapes)} tensor(s) of another shape (e.g. {k!r}: {tuple(state[k].shape)} in the file, '
                     f'{tuple(own[k].shape)} in the model)')
    return ', '.join(parts)


def load_checkpoint(path: str, arg_name: str, model: Optional[nn.Module] = None, *,
                    hint: str = WEIGHTS_ONLY_HINT) -> Any:
    """:func:`load_file` (weights-only), and with ``model``, a one-line ``ValueError`` naming ``arg_name``
    unless the file's state dict fits it exactly (another architecture, other classes, ...).

    Returns:
        the loaded object (e.g. the whole timm checkpoint dict).
    """
    obj = load_file(path, arg_name, hint=hint)
    if model is not None:
        mismatch = state_dict_mismatch(model, state_dict_of(obj, path, arg_name))
        if mismatch:
            raise ValueError(f'{arg_name} {path!r} does not fit the model: {mismatch} (a checkpoint of another '
                             'architecture or other settings?)')
    return obj
