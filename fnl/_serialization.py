"""Reading torch files without running code from them.

Unpickling a file can call any Python function the file names (an object's ``__reduce__``), so a
checkpoint from someone else is a program. Every file this project reads goes through
:func:`load_file`: ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and
the few types a caller allows, nothing else), never a silent retry with the full unpickler. The
full unpickler runs only when the caller passes ``trust_pickle=True`` (``--trust-pickle`` on the
command line); a file that needs it is refused with an :class:`UntrustedPickleError` that names
the argument, what the file holds, and the flag. Missing, empty, folder, truncated and corrupt
inputs get one-line ``ValueError``s naming the argument. Nothing here writes anything.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterable, Union

import torch

__all__ = ["TRUST_HINT", "UntrustedPickleError", "allow_globals", "check_input_file", "load_file"]

PathLike = Union[str, os.PathLike]

TRUST_HINT = "add --trust-pickle (trust_pickle=True in Python) only if you trust where the file came from"


class UntrustedPickleError(ValueError):
    """A file that only the full unpickler can read, refused because the user did not ask for it."""


def allow_globals(types: Iterable[Any]) -> AbstractContextManager:
    """A context in which ``weights_only`` loads also accept ``types``.

    torch's ``safe_globals`` context removes its globals on exit even when they were registered
    before (the fairseq plugin registers ``argparse.Namespace`` at import), so only the types not
    allowed already are entered.
    """
    allowed = torch.serialization.get_safe_globals()
    missing = [t for t in types if t not in allowed]
    return torch.serialization.safe_globals(missing) if missing else nullcontext()


def check_input_file(path: PathLike, arg_name: str) -> str:
    """``path`` as a string, or a ``ValueError`` naming ``arg_name`` if it is missing, a folder or empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{arg_name} {path!r}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{arg_name} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"{arg_name} {path!r} is not a regular file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{arg_name} {path!r} is empty (0 bytes), not a torch.save file")
    return path


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).split(". ")[0]  # the first sentence
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


# torch.save's legacy (non-zip) format starts with its magic number, pickled: LONG1 of 10 bytes
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _is_torch_file(path: str) -> bool:
    """A zip archive (torch.save's format) or torch's legacy format, by the first bytes."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return _LEGACY_MAGIC in f.read(64)


def _needed_globals(path: str, error: BaseException, allowed: Iterable[Any]) -> list[str]:
    """The Python globals the file names that ``weights_only`` refuses (read from the archive, no unpickling)."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a listing failure leaves the error's own message
            names = []
    if not names:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    skip = {f"{t.__module__}.{t.__qualname__}" for t in allowed if isinstance(t, type)}
    return sorted(n for n in dict.fromkeys(names) if n not in skip)


def load_file(
        path: PathLike,
        arg_name: str,
        *,
        trust_pickle: bool = False,
        safe_globals: Iterable[Any] = (),
        hint: str = TRUST_HINT,
        map_location: Any = "cpu",
) -> Any:
    """``torch.load`` of a file given by the user, weights-only unless the user trusts it.

    Args:
        path: the file.
        arg_name: the argument that named it (``--checkpoint``, ``path``): every error names it.
        trust_pickle: a file the weights-only reader refuses is then loaded with the full unpickler
            (``weights_only=False``), which runs any code the file names. Only for files from a trusted
            source (e.g. a whole pickled module); other files still load weights-only.
        safe_globals: types allowed besides tensors and plain containers (e.g. ``argparse.Namespace``
            in timm checkpoints).
        hint: how to proceed if the file needs the full unpickler (the end of the refusal).
        map_location: as in ``torch.load``.

    Raises:
        UntrustedPickleError: the file names Python objects that only the full unpickler builds and
            ``trust_pickle`` is False.
        ValueError: missing, a folder, empty, truncated or not a torch file.
    """
    path = check_input_file(path, arg_name)
    safe_globals = list(safe_globals)
    try:
        return _load_weights_only(path, arg_name, safe_globals, hint, map_location)
    except UntrustedPickleError:
        if not trust_pickle:
            raise
    # the user's word: the full unpickler, only for a file the weights-only reader refused
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a torch file
        raise ValueError(f"{arg_name} {path!r} is not a readable torch.save file ({_first_line(e)})") from None


def _load_weights_only(path: str, arg_name: str, safe_globals: list, hint: str, map_location: Any) -> Any:
    try:
        with allow_globals(safe_globals):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or not _is_torch_file(path):
            raise ValueError(f"{arg_name} {path!r} is not a readable torch.save file (corrupt? "
                             f"{_first_line(e)})") from None
        names = _needed_globals(path, e, safe_globals)
        holds = f"Python objects ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names \
            else "pickle instructions that only the full unpickler runs"
        raise UntrustedPickleError(f"{arg_name} {path!r} is refused: it holds {holds}, and unpickling it can run "
                                   f"arbitrary code named in the file; {hint}") from None
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a torch file
        raise ValueError(f"{arg_name} {path!r} is not a readable torch.save file (truncated or corrupt? "
                         f"{_first_line(e)})") from None
