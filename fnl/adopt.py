"""Loading a checkpoint whose layers have other ranks: the model adopts the checkpoint's shapes.

A factorized model's state dict carries its ranks in the factors' shapes (``U`` is m x r), its
form in its keys (``weight`` for a dense layer, ``U``/``V`` with an optional ``S`` for ``U S Vᵀ``,
``core1..3`` for a Tensor-Train conv, ``core`` + ``factor1..3`` for a Tucker conv; paper sections
2 and 4, docs/method.md). :func:`adopt_state_dict_shapes` rebuilds every layer of a model whose
entries in a state dict have another form or other ranks, keeping what the architecture fixes
(input and output sizes, kernel, stride, padding, dilation, bias), so that the state dict then
loads with ``load_state_dict``. A state dict that cannot fit the architecture (other channels,
another depth, other classes) raises one :class:`CheckpointMismatchError` naming the first layer
that does not fit and why; the model is then left unchanged.

:func:`adopt_on_load` registers this as a ``load_state_dict`` pre-hook, so every loader that calls
``model.load_state_dict`` (timm's ``load_checkpoint`` and ``create_model(checkpoint_path=...)``
among them) adopts the checkpoint's shapes. Rebuilt layers get new parameters: create optimizers
after loading (a warning names the rebuilt layers).
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .conv import FactorizedConv2d
from .embedding import FactorizedEmbedding
from .linear import FactorizedLinear
from .tensor_conv import TensorConv2d, TTConv2d, TuckerConv2d, tensor_modes

__all__ = ["CheckpointMismatchError", "adopt_on_load", "adopt_state_dict_shapes"]

_DENSE = (nn.Linear, nn.Conv2d, nn.Embedding)
_FACTORIZED = (FactorizedLinear, FactorizedConv2d, FactorizedEmbedding, TTConv2d, TuckerConv2d)
_LOWRANK_OF = {nn.Linear: FactorizedLinear, nn.Conv2d: FactorizedConv2d, nn.Embedding: FactorizedEmbedding}


class CheckpointMismatchError(ValueError):
    """A state dict that cannot fit the model's architecture; the message names the first layer and why."""


def _kind(module: nn.Module) -> Optional[type]:
    """``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``: the dense layer an adoptable module is or stands
    for; None for any other module (subclasses of the dense layers included: their forward may use
    the weight differently)."""
    if type(module) in _DENSE:
        return type(module)
    if isinstance(module, (FactorizedConv2d, TensorConv2d)):
        return nn.Conv2d
    if isinstance(module, FactorizedLinear):
        return nn.Linear
    if isinstance(module, FactorizedEmbedding):
        return nn.Embedding
    return None


def _form(entries: Mapping[str, Tensor]) -> Optional[str]:
    """The layer form a checkpoint's entries of one layer hold: 'dense', 'lowrank', 'square' (``U S Vᵀ``),
    'tt', 'tucker', '' (only a bias) or None (unknown)."""
    names = set(entries) - {"bias"}
    forms = {"": set(), "dense": {"weight"}, "lowrank": {"U", "V"}, "square": {"U", "S", "V"}}
    for form, keys in forms.items():
        if names == keys:
            return form
    if names - {"depthwise"} == {"core1", "core2", "core3"}:
        return "tt"
    if names - {"depthwise"} == {"core", "factor1", "factor2", "factor3"}:
        return "tucker"
    return None


def _form_of(module: nn.Module) -> str:
    if isinstance(module, TTConv2d):
        return "tt"
    if isinstance(module, TuckerConv2d):
        return "tucker"
    if isinstance(module, _FACTORIZED):
        return "square" if module.square else "lowrank"
    return "dense"


def _geometry(module: nn.Module) -> str:
    """What the architecture fixes about a layer, for error messages."""
    kind = _kind(module)
    if kind is nn.Linear:
        s = f"in_features={module.in_features}, out_features={module.out_features}"
    elif kind is nn.Conv2d:
        s = (f"in_channels={module.in_channels}, out_channels={module.out_channels}, "
             f"kernel_size={tuple(module.kernel_size)}")
    else:
        s = f"num_embeddings={module.num_embeddings}, embedding_dim={module.embedding_dim}"
    return s + (", bias=False" if getattr(module, "bias", None) is None and kind is not nn.Embedding else "")


def _factory(module: nn.Module) -> dict:
    p = next(iter(module.parameters()), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _conv_args(module: nn.Module) -> tuple:
    return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, 1, module.bias is not None)


def _settings(module: nn.Module, names: tuple[str, ...]) -> dict:
    """The old layer's non-shape settings that the new one keeps (init functions, path)."""
    return {n: getattr(module, n) for n in names if hasattr(module, n)}


def _tucker_modes(module: nn.Module, n: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_modes, in_modes) with mode sizes ``n``: the old layer's, else the derived ones (a Tucker state
    dict holds only the products o_k i_k)."""
    if isinstance(module, TensorConv2d) and module.modes == n:
        return module.out_modes, module.in_modes
    o, i = tensor_modes(module.out_channels, module.in_channels)
    if tuple(a * b for a, b in zip(o, i)) != n:
        raise ValueError(f"Tucker mode sizes {n} are not the derived ones {tuple(a * b for a, b in zip(o, i))} "
                         f"of {module.out_channels} x {module.in_channels} channels")
    return o, i


def _rebuilt(module: nn.Module, form: str, entries: Mapping[str, Tensor]) -> nn.Module:
    """A layer of ``form`` at the checkpoint's ranks with ``module``'s architecture (raises ValueError or
    TypeError when the form cannot have that architecture)."""
    kind = _kind(module)
    if form == "dense":
        return module.to_dense() if isinstance(module, _FACTORIZED) else module
    if type(module) is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"):
        raise ValueError(f"a conv with groups={module.groups}, padding_mode={module.padding_mode!r} has no "
                         "factorized form (one group, zero padding only)")
    if type(module) is nn.Embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        raise ValueError("an nn.Embedding with max_norm / scale_grad_by_freq / sparse has no factorized form")
    if form in ("tt", "tucker") and kind is not nn.Conv2d:
        raise ValueError(f"tensor-format ({form}) factors are for convs, and this layer is an {kind.__name__}")
    keep = _settings(module, ("init", "depthwise_init", "path"))
    if form in ("lowrank", "square"):
        u = entries["U"]
        rank, square = int(u.shape[1]) if u.dim() == 2 else 0, form == "square"
        if rank < 1:
            raise ValueError(f"the checkpoint's U has shape {tuple(u.shape)}, not (m, r)")
        cls = _LOWRANK_OF[kind]
        if kind is nn.Conv2d:
            keep = {k: v for k, v in keep.items() if k in ("init", "path")}
            return cls(*_conv_args(module), rank=rank, square=square, **keep, **_factory(module))
        keep = {k: v for k, v in keep.items() if k == "init"}
        if kind is nn.Linear:
            return cls(module.in_features, module.out_features, module.bias is not None, rank=rank, square=square,
                       **keep, **_factory(module))
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx, rank=rank, square=square,
                   **keep, **_factory(module))
    if form == "tt":
        cores = [entries[f"core{k}"] for k in (1, 2, 3)]
        if any(c.dim() != 4 for c in cores):
            raise ValueError(f"the checkpoint's TT cores have shapes {[tuple(c.shape) for c in cores]}, "
                             "not (r_{k-1}, o_k, i_k, r_k)")
        return TTConv2d(*_conv_args(module), rank=(int(cores[0].shape[3]), int(cores[1].shape[3])),
                        out_modes=tuple(int(c.shape[1]) for c in cores), in_modes=tuple(int(c.shape[2]) for c in cores),
                        **keep, **_factory(module))
    factors = [entries[f"factor{k}"] for k in (1, 2, 3)]
    if entries["core"].dim() != 3 or any(f.dim() != 2 for f in factors):
        raise ValueError("the checkpoint's Tucker core / factors are not (R_1, R_2, R_3) / (n_k, R_k)")
    out_modes, in_modes = _tucker_modes(module, tuple(int(f.shape[0]) for f in factors))
    return TuckerConv2d(*_conv_args(module), rank=tuple(int(r) for r in entries["core"].shape),
                        out_modes=out_modes, in_modes=in_modes, **keep, **_factory(module))


def _describe(module: nn.Module) -> str:
    form = _form_of(module)
    if form == "dense":
        return f"dense {type(module).__name__}"
    if form in ("lowrank", "square"):
        return f"{type(module).__name__} rank {module.rank}" + (" square" if module.square else "")
    return f"{type(module).__name__} ranks {module.ranks}"


def _shared_shape_mismatch(own: Mapping[str, Tensor], entries: Mapping[str, Tensor]) -> Optional[str]:
    """The first tensor both have with another shape (keys only one has are for the strict check)."""
    for key in [k for k in own if k in entries]:
        if tuple(own[key].shape) != tuple(entries[key].shape):
            return f"the checkpoint's {key!r} has shape {tuple(entries[key].shape)}, this layer needs " \
                   f"{tuple(own[key].shape)}"
    return None


def _layer_entries(state_dict: Mapping[str, Tensor], key_prefix: str) -> dict[str, Tensor]:
    """The state dict's tensors that belong to the module itself (not to its children)."""
    n = len(key_prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(key_prefix) and "." not in k[n:]}


def adopt_state_dict_shapes(
        model: nn.Module,
        state_dict: Mapping[str, Tensor],
        prefix: str = "",
        *,
        strict: bool = True,
) -> list[str]:
    """Rebuild the layers of ``model`` whose entries in ``state_dict`` have another form or other ranks.

    Every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` (exact types) and every factorized layer
    (``FactorizedLinear`` / ``FactorizedConv2d`` / ``FactorizedEmbedding`` / ``TTConv2d`` /
    ``TuckerConv2d``) is rebuilt in the form the state dict holds for it (dense, ``U Vᵀ`` with or
    without ``S``, Tensor-Train or Tucker) at the state dict's ranks and modes, with the old layer's
    architecture (sizes, kernel, stride, padding, dilation, bias) and settings (init functions,
    ``path``), device and dtype. The new layers hold fresh initial values: the caller loads the
    state dict next. Nothing is replaced unless everything fits.

    Args:
        model: the model the state dict is for.
        state_dict: the checkpoint's tensors, keys as ``model.state_dict()`` names them after ``prefix``.
        prefix: the model's key prefix in ``state_dict`` (as ``load_state_dict`` passes its hooks).
        strict: also refuse keys the model lacks and model keys the state dict lacks (as
            ``load_state_dict(strict=True)`` does); a tensor of another shape that no rebuild can
            fix is refused either way.

    Returns:
        The names of the rebuilt layers (empty when the model already had the state dict's shapes).

    Raises:
        CheckpointMismatchError: the first layer (in the model's order) the state dict cannot fit, and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    owner = type(model).__name__

    def fail(name: str, why: str) -> CheckpointMismatchError:
        where = f"layer {prefix + name!r}" if name else "the model itself"
        return CheckpointMismatchError(f"the checkpoint does not fit this {owner}: {where}: {why}")

    modules = list(model.named_modules())
    order = {name: i for i, (name, _) in enumerate(modules)}
    problems: list[tuple[int, str, str]] = []  # (model order, layer name, why): the first one is raised
    new_of: dict[int, nn.Module] = {}  # id(old layer) -> rebuilt layer
    for name, module in modules:
        kind = _kind(module)
        if not name or kind is None or id(module) in new_of:
            continue
        entries = {k: v for k, v in _layer_entries(state_dict, f"{prefix}{name}.").items() if isinstance(v, Tensor)}
        form = _form(entries)
        if form == "":
            continue  # no weight or factors (a partial state dict): missing keys are reported below
        if form is None:
            problems.append((order[name], name, f"the checkpoint holds {sorted(entries)} for this {_describe(module)}, "
                                                "neither a dense weight nor factors (U, V[, S]; TT core1..3; Tucker "
                                                "core, factor1..3)"))
            continue
        own = dict(module.named_parameters(recurse=False))
        if form == _form_of(module) and not _shared_shape_mismatch(own, entries):
            continue
        try:
            new = _rebuilt(module, form, entries)
        except (TypeError, ValueError) as e:
            problems.append((order[name], name, f"a {form} layer with this model's {_geometry(module)} cannot be "
                                                f"built: {str(e).splitlines()[0]}"))
            continue
        why = _shared_shape_mismatch(dict(new.named_parameters(recurse=False)), entries)
        if why:
            problems.append((order[name], name, f"{why} (this model's {_describe(module)} with {_geometry(module)})"))
            continue
        new.train(module.training)
        new_of[id(module)] = new

    # what no rebuild fixes: other shapes elsewhere (BatchNorm, ...), missing and unexpected keys
    reported = {name for _, name, _ in problems}
    own_shapes: dict[str, tuple[int, ...]] = {}
    for name, module in modules:
        layer = new_of.get(id(module), module)
        skip = getattr(layer, "_non_persistent_buffers_set", set())
        for key, t in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            if key not in skip and t is not None:
                own_shapes[f"{name}.{key}" if name else key] = tuple(t.shape)
    for key, shape in own_shapes.items():
        module_name = key.rpartition(".")[0]
        got = state_dict.get(prefix + key)
        if prefix + key not in state_dict:
            if strict and _layer_entries(state_dict, f"{prefix}{module_name}." if module_name else prefix):
                problems.append((order[module_name], module_name, f"the checkpoint has no {prefix + key!r} for it"))
            elif strict:
                problems.append((order[module_name], module_name, f"in the model but not in the checkpoint (no "
                                 f"{prefix + key!r}; a checkpoint of another depth or architecture?)"))
        elif isinstance(got, Tensor) and tuple(got.shape) != shape and module_name not in reported:
            problems.append((order[module_name], module_name, f"the checkpoint's {prefix + key!r} has shape "
                                                              f"{tuple(got.shape)}, the model's {shape}"))
    if strict:
        for key in state_dict:
            rest = key[len(prefix):]
            if not key.startswith(prefix) or rest in own_shapes or rest.endswith("_extra_state"):
                continue
            module_name = rest.rpartition(".")[0]
            if module_name in order:
                problems.append((order[module_name], module_name, f"the checkpoint has {key!r}, which this layer "
                                                                  "does not have"))
            else:
                problems.append((len(order), module_name, f"in the checkpoint but not in the model ({key!r}; a "
                                                          "checkpoint of another depth or architecture?)"))
    if problems:
        _, name, why = min(problems, key=lambda p: p[0])
        raise fail(name, why)

    rebuilt = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module.named_children()):
            if id(child) in new_of and new_of[id(child)] is not child:
                setattr(module, child_name, new_of[id(child)])
                rebuilt.append(f"{name}.{child_name}" if name else child_name)
    return rebuilt


def _strict_of_caller() -> bool:
    """The ``strict`` argument of the ``nn.Module.load_state_dict`` call running this hook.

    torch passes ``strict=True`` to every load pre-hook whatever the caller asked (it applies
    ``strict`` itself after the hooks), so it is read from that call's frame; False (refuse only
    tensors of another shape, as torch does then) where it cannot be found.
    """
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", False))
        frame = frame.f_back
    return False


def _adopt_pre_hook(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, local_metadata: dict,
                    strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list,
                    after: Optional[Callable[[nn.Module], object]] = None) -> None:
    rebuilt = adopt_state_dict_shapes(module, state_dict, prefix, strict=_strict_of_caller())
    if rebuilt:
        warnings.warn(f"{type(module).__name__}: {len(rebuilt)} layer(s) rebuilt at the checkpoint's shapes "
                      f"({', '.join(rebuilt[:3])}{', ...' if len(rebuilt) > 3 else ''}); their parameters are new "
                      "objects, so create optimizers after loading", stacklevel=2)
        if after is not None:
            after(module)


class _AdoptHook:
    """The pre-hook, picklable (a module-level class; ``after`` must be a module-level function too)."""

    def __init__(self, after: Optional[Callable[[nn.Module], object]]) -> None:
        self.after = after

    def __call__(self, module: nn.Module, *args: object) -> None:
        _adopt_pre_hook(module, *args, after=self.after)  # type: ignore[arg-type]


def adopt_on_load(model: nn.Module, after: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
    """Make ``model.load_state_dict`` adopt the state dict's layer shapes first (:func:`adopt_state_dict_shapes`).

    Idempotent. The hook lives in the model (it survives ``copy.deepcopy`` and pickling).

    Args:
        model: the model.
        after: called with the model after layers were rebuilt (e.g. a plugin registering the new
            factors for its optimizers); a module-level function, so that the model stays picklable.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for hook in model._load_state_dict_pre_hooks.values():
        if isinstance(getattr(hook, "hook", None), _AdoptHook):
            hook.hook.after = after
            return model
    model.register_load_state_dict_pre_hook(_AdoptHook(after))
    return model
