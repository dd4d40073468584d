"""fairseq's ``eval()`` of setting strings, without running code.

fairseq 0.12 turns some settings into Python values with the builtin ``eval()``: in
``fairseq.utils.eval_str_list`` / ``eval_str_dict`` / ``eval_bool`` and directly in models, optimizers
and criterions (convolution specs such as ``"[(512, 3)] * 20"``, ``--adam-betas``, attention flags).
When a model is built from a checkpoint, those strings come from the file, so a checkpoint could run
code through any of them, in any architecture. Checking a list of setting names cannot keep up with
every architecture; instead, at plugin import (and again before each checkpoint load) every loaded
``fairseq`` module gets a module-level ``eval`` that shadows the builtin: :func:`config_eval`, which
accepts what these settings are (literals: numbers, strings, booleans, None, tuples, lists, sets,
dicts, with ``+``, ``-`` and ``*`` between them, so that ``"[(512, 3)] * 20"`` keeps working) and
refuses anything else (names, calls, attribute access, comprehensions, lambdas, ``**``) with a
``ValueError`` before evaluating any of it. Sequence repetition is capped at :data:`MAX_ITEMS`
items, so a setting cannot exhaust memory either.

Command-line settings go through the same function: they must be literals too (every documented
fairseq setting of this kind is).
"""
from __future__ import annotations

import ast
import operator
import sys
from typing import Any

__all__ = ["MAX_ITEMS", "config_eval", "install"]

#: the largest sequence a ``*`` in a setting may build
MAX_ITEMS = 1_000_000

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_NUMBER = (int, float, complex)


class _Refused(ValueError):
    pass


def _size(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, tuple, list)) else 1


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_value(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else (items if isinstance(node, ast.List) else set(items))
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Refused("dict unpacking")
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        if not isinstance(v, _NUMBER) or isinstance(v, bool):
            raise _Refused("a sign on something that is not a number")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Mult):
            count = left if isinstance(left, int) else right if isinstance(right, int) else None
            seq = right if count is left else left
            if count is not None and not isinstance(seq, _NUMBER) and _size(seq) * max(count, 0) > MAX_ITEMS:
                raise _Refused(f"a repetition of more than {MAX_ITEMS} items")
        try:
            return _BINOPS[type(node.op)](left, right)
        except TypeError as e:
            raise _Refused(str(e)) from None
    raise _Refused(f"{type(node).__name__} (only literals and +, -, * between them are evaluated)")


def config_eval(source: Any, globals: Any = None, locals: Any = None) -> Any:  # noqa: A002 - eval's signature
    """``eval(source)`` for a fairseq setting: the value of a literal expression, never running code.

    Raises:
        TypeError: ``source`` is not a string (as the builtin raises for a non-string, non-code object;
            fairseq's ``eval_bool`` relies on it).
        ValueError: ``source`` is not a literal expression (see the module docstring), or not valid syntax.
    """
    if isinstance(source, bytes):
        source = source.decode()
    if not isinstance(source, str):
        raise TypeError(f"eval() arg 1 must be a string, got {type(source).__name__} "
                        "(the fnl_fairseq plugin evaluates only setting strings)")
    try:
        tree = ast.parse(source.strip(), mode="eval")
        return _value(tree.body)
    except (_Refused, SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"fairseq setting {source[:80]!r} is not a literal value ({e}); the fnl_fairseq plugin "
                         "evaluates fairseq's settings without running code, since a checkpoint's settings come "
                         "from whoever wrote the file") from None


def install() -> int:
    """Shadow the builtin ``eval`` with :func:`config_eval` in every loaded ``fairseq`` module (idempotent);
    returns how many modules got it now."""
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fairseq" or name.startswith("fairseq.")):
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("eval") is not config_eval:
            namespace["eval"] = config_eval
            count += 1
    return count
