"""Whole models: factorize, collapse, target compression ratio, counts (paper sections 2 and 4; docs/method.md).

``factorize`` swaps ``nn.Linear`` / ``nn.Conv2d`` (and optionally ``nn.Embedding``) submodules for
their factorized versions; ``collapse`` turns every factorized layer back into its dense
equivalent. ``solve_rank_scale`` finds the global rank_scale whose whole-model parameter ratio is
closest to a target, from analytic per-layer counts (no model copies).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._validate import check_rank_choice, check_target_ratio
from .base import FactorizedLayer, InitFn
from .conv import FactorizedConv2d, conv_output_hw
from .embedding import FactorizedEmbedding
from .linear import FactorizedLinear

__all__ = ["ModelSummary", "collapse", "count_macs", "count_parameters", "factorize", "solve_rank_scale", "summary"]

Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

# exact types only: subclasses (timm's StdConv2d, torch's NonDynamicallyQuantizableLinear, ...) may
# use their weight in ways a factorized layer cannot reproduce
_FACTORIZED_OF = {nn.Linear: FactorizedLinear, nn.Conv2d: FactorizedConv2d, nn.Embedding: FactorizedEmbedding}


def _selects(selector: Selector, name: str, module: nn.Module) -> bool:
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector or ())
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_selector(arg: str, selector: Selector) -> None:
    if selector is None or callable(selector) or isinstance(selector, str):
        return
    if not isinstance(selector, (list, tuple, set)) or not all(isinstance(p, str) for p in selector):
        raise TypeError(f"{arg} must be None, a pattern, a list of fnmatch patterns over module names, or a "
                        f"callable (name, module) -> bool; got {selector!r}")


def _eligible(module: nn.Module, embeddings: bool) -> bool:
    kind = type(module)
    if kind is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    if kind is nn.Embedding:
        return embeddings and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    return kind is nn.Linear


def _candidates(model: nn.Module, include: Selector, exclude: Selector, embeddings: bool) -> list[tuple[str, nn.Module]]:
    _check_selector("include", include)
    _check_selector("exclude", exclude)
    found = []
    inside_mha = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # it reads out_proj.weight directly
            inside_mha.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
        if not name or name in inside_mha or not _eligible(module, embeddings):
            continue
        if include is not None and not _selects(include, name, module):
            continue
        if exclude is not None and _selects(exclude, name, module):
            continue
        found.append((name, module))
    if include is not None and not found:
        raise ValueError(f"include={include!r} selects no nn.Linear / nn.Conv2d"
                         f"{' / nn.Embedding' if embeddings else ''} (groups=1) in the model")
    return found


def _rank_base(module: nn.Module) -> tuple[int, int, int]:
    """(rank_scale base, m + n, bias parameters) of a dense layer, by the paper's rank rules."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        m, n = module.out_channels * kh, module.in_channels * kw
        return m, m + n, module.out_channels if module.bias is not None else 0
    if isinstance(module, nn.Linear):
        m, n = module.out_features, module.in_features
        return min(m, n), m + n, m if module.bias is not None else 0
    m, n = module.num_embeddings, module.embedding_dim
    return min(m, n), m + n, 0


def count_parameters(model: nn.Module, dense: bool = False) -> int:
    """Parameters of ``model``; with ``dense``, factorized layers count as the dense layers they replace."""
    total = sum(p.numel() for p in model.parameters())
    if dense:
        for layer in model.modules():
            if isinstance(layer, FactorizedLayer):
                total += layer.dense_num_parameters() - layer.num_parameters()
    return total


def solve_rank_scale(
        model: nn.Module,
        target_ratio: float,
        *,
        include: Selector = None,
        exclude: Selector = None,
        square: bool = False,
        embeddings: bool = False,
) -> float:
    """The global rank_scale whose parameter ratio (factorized / dense model) is closest to ``target_ratio``.

    All parameters count (stem, norms, classifier). The count is a step function of rank_scale,
    monotone, so bisection on the analytic per-layer counts finds the step that crosses the target
    and the closer of it and the step below is returned. The model is not modified.

    Args:
        model: the dense model (factorized layers already in it count as fixed, at their dense size).
        target_ratio: the wanted ratio, a finite float > 0, reachable between all ranks 1 and
            rank_scale 1.
        include, exclude, square, embeddings: as in ``factorize``.
    """
    check_target_ratio(target_ratio)
    layers = [_rank_base(m) for _, m in _candidates(model, include, exclude, embeddings)]
    if not layers:
        raise ValueError("the model has no layer to factorize, so no target_ratio can be reached")
    dense_total = count_parameters(model, dense=True)
    fixed = dense_total - sum(sum(p.numel() for p in m.parameters())
                              for _, m in _candidates(model, include, exclude, embeddings))

    def ratio(scale: float) -> float:
        total = fixed
        for base, sides, bias in layers:
            r = max(1, round(scale * base))
            total += r * sides + bias + (r * r if square else 0)
        return total / dense_total

    lowest, highest = ratio(0.0), ratio(1.0)
    if not lowest <= target_ratio <= highest:
        raise ValueError(f"target_ratio={target_ratio} cannot be reached: this model's ratios run from "
                         f"{lowest:.6g} (every rank 1) to {highest:.6g} (rank_scale 1.0)")
    return _closest_scale(ratio, target_ratio, lo=0.0)


def _closest_scale(ratio: Callable[[float], float], target_ratio: float, lo: float, floor: float = 1e-9) -> float:
    """The scale in [lo, 1] whose ratio (monotone in the scale) is closest to ``target_ratio``.

    Bisection keeps ``ratio(lo) < target <= ratio(hi)``; a target at or below ``ratio(lo)`` gives
    ``floor``, the smallest scale returned (a scale of 0 would mean dense).
    """
    hi = 1.0
    if ratio(lo) >= target_ratio:
        return floor
    for _ in range(64):
        mid = (lo + hi) / 2
        if ratio(mid) >= target_ratio:
            hi = mid
        else:
            lo = mid
    below = max(lo, floor)
    return hi if abs(ratio(hi) - target_ratio) <= abs(ratio(below) - target_ratio) else below


def _factorize_one(module: nn.Module, rank: Optional[int], rank_scale: Optional[float], spectral: bool,
                   square: bool, init: Optional[InitFn]) -> FactorizedLayer:
    cls = _FACTORIZED_OF[type(module)]
    if spectral:
        return cls.from_dense(module, rank=rank, rank_scale=rank_scale, square=square)
    w = module.weight
    common = dict(rank=rank, rank_scale=rank_scale, square=square, init=init, device=w.device, dtype=w.dtype)
    if isinstance(module, nn.Conv2d):
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, 1, module.bias is not None, **common)
    elif isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, module.bias is not None, **common)
    else:
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, **common)
    bias = getattr(module, "bias", None)
    if bias is not None:
        with torch.no_grad():
            new.bias.copy_(bias)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _all_names(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


def factorize(
        model: nn.Module,
        *,
        rank: Optional[int] = None,
        rank_scale: Optional[float] = None,
        target_ratio: Optional[float] = None,
        spectral: bool = False,
        square: bool = False,
        include: Selector = None,
        exclude: Selector = None,
        embeddings: bool = False,
        init: Optional[InitFn] = None,
) -> nn.Module:
    """Replace the model's dense layers by factorized ones, in place, and return the model.

    Args:
        model: any module; its ``nn.Linear`` and ``nn.Conv2d`` (groups 1, zero padding) submodules,
            and ``nn.Embedding`` ones with ``embeddings``, are candidates (exact types only, and not
            the projections inside ``nn.MultiheadAttention``).
        rank: one rank for every layer, an int >= 1 (exactly one of rank / rank_scale / target_ratio;
            the rule: docs/method.md#rank-settings).
        rank_scale: the paper's per-layer rank rule (see the layer classes), a finite float > 0.
        target_ratio: a whole-model parameter ratio (> 0); the rank_scale is solved by ``solve_rank_scale``.
        spectral: factorize the weights already in the layers by SVD (for a trained model, the best
            rank-r approximation); else the factors get ``init`` and only the biases are kept.
        square: add the (r x r) factor S.
        include: fnmatch patterns over module names (or a predicate ``(name, module) -> bool``)
            selecting candidates; None selects all.
        exclude: patterns or a predicate removing candidates.
        embeddings: also factorize ``nn.Embedding``.
        init: the per-factor init of the non-spectral case (see the layer classes).

    Raises:
        ValueError, TypeError: for bad arguments, or naming the first selected layer that cannot be
            factorized (e.g. ``padding='same'`` with an even kernel); every layer is checked before
            any is replaced, so the model is then left exactly as it was.
    """
    check_rank_choice(rank, rank_scale, target_ratio, required=True)  # before touching the model
    if isinstance(model, FactorizedLayer) or type(model) in _FACTORIZED_OF:
        raise TypeError(f"model is a single {type(model).__name__}; use the layer's from_dense() instead")
    if target_ratio is not None:
        rank_scale = solve_rank_scale(model, target_ratio, include=include, exclude=exclude, square=square,
                                      embeddings=embeddings)
    # every layer is built (and so validated) before any is swapped in: an invalid layer raises with
    # the model exactly as it was
    built: dict[int, tuple[nn.Module, FactorizedLayer]] = {}
    for name, module in _candidates(model, include, exclude, embeddings):
        if id(module) not in built:
            try:
                built[id(module)] = module, _factorize_one(module, rank, rank_scale, spectral, square, init)
            except (ValueError, TypeError) as e:
                raise type(e)(f"cannot factorize layer {name!r} ({module}): {e}; the model is unchanged") from e
    for module, new in built.values():
        for alias in _all_names(model, module):  # a shared layer stays shared
            _replace(model, alias, new)
    return model


def collapse(model: nn.Module) -> nn.Module:
    """Replace every factorized layer by its dense equivalent (same outputs), in place; return the model."""
    if isinstance(model, FactorizedLayer):
        return model.to_dense()
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, FactorizedLayer) and id(module) not in done:
            done[id(module)] = module.to_dense()
            for alias in _all_names(model, module):
                _replace(model, alias, done[id(module)])
    return model


def _dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
    if isinstance(module, nn.Conv2d):
        h_out, w_out = conv_output_hw(module, shape)
        kh, kw = module.kernel_size
        return module.out_channels * (module.in_channels // module.groups) * kh * kw * h_out * w_out
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    return 0




@dataclass
class LayerRow:
    name: str
    kind: str
    shape: str
    rank: Optional[int]
    params: int
    dense_params: int
    macs: Optional[int]
    dense_macs: Optional[int]
    why_dense: Optional[str] = None  # for a dense Linear / Conv2d / Embedding: why it was not factorized


@dataclass
class ModelSummary:
    """Per-layer counts of a model; ``str()`` gives a table."""
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    dense_params: int = 0
    total_macs: Optional[int] = None
    dense_macs: Optional[int] = None

    @property
    def param_ratio(self) -> float:
        return self.total_params / self.dense_params

    @property
    def macs_ratio(self) -> Optional[float]:
        return None if not self.dense_macs else self.total_macs / self.dense_macs

    def __str__(self) -> str:
        def num(x: Optional[int]) -> str:
            return "-" if x is None else f"{x:,}"
        header = ("layer", "kind", "shape", "rank", "params", "dense params", "MACs", "dense MACs", "why dense")
        body = [(r.name, r.kind, r.shape, "-" if r.rank is None else str(r.rank), num(r.params), num(r.dense_params),
                 num(r.macs), num(r.dense_macs), r.why_dense or "") for r in self.rows]
        ratio_macs = "-" if self.macs_ratio is None else f"{self.macs_ratio:.4f}"
        body.append(("total (whole model)", "", "", "", num(self.total_params), num(self.dense_params),
                     num(self.total_macs), num(self.dense_macs), ""))
        body.append(("ratio", "", "", "", f"{self.param_ratio:.4f}", "", ratio_macs, "", ""))
        widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
        left = {0, 1, 2, 3, len(header) - 1}
        lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                 for row in [header, *body]]
        rule = "-" * max(len(x) for x in lines)
        lines.insert(1, rule)
        lines.insert(len(lines) - 2, rule)
        return "\n".join(lines)


_COUNTED = (FactorizedLayer, nn.Linear, nn.Conv2d, nn.Embedding)


def _why_dense(name: str, module: nn.Module, recorded: dict, inside_mha: set) -> str:
    """Why a dense Linear / Conv2d / Embedding of a model was not factorized.

    A reason the model recorded when it was factorized (``model.fnl_kept_dense``, written by the
    timm plugin's ``fnl`` models: stem, classifier, excluded, depthwise, ...) comes first; else what
    ``factorize`` itself would refuse; else it was not selected (``include`` / ``exclude``, the
    model's own rules) or the model is dense.
    """
    if name in recorded:
        return str(recorded[name])
    if name in inside_mha:
        return "inside nn.MultiheadAttention (it reads the weight directly)"
    if type(module) not in _FACTORIZED_OF:
        return f"{type(module).__name__} is a subclass of nn.{type(module).__mro__[1].__name__} (exact types only)"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups}): the factorized conv has one group"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: the factorized conv pads with zeros"
    if isinstance(module, nn.Embedding):
        unsupported = [f"max_norm={module.max_norm!r}"] if module.max_norm is not None else []
        unsupported += [f"{a}=True" for a in ("scale_grad_by_freq", "sparse") if getattr(module, a)]
        if unsupported:
            return f"embedding with {', '.join(unsupported)}: the factorized embedding has none of these"
        return "embedding (factorized only with embeddings=True)"
    return "not selected (include / exclude, or the model's rules)"


def _trace_input_shapes(model: nn.Module, example: Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape (batch dim dropped) of every counted layer, from one forward pass in eval mode."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _COUNTED):
            def hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
                shapes.setdefault(_name, tuple(args[0].shape[1:]))
            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _example(model: nn.Module, input_size: Sequence[int]) -> Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else None
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros((1, *input_size), device=device, dtype=dtype)


def summary(model: nn.Module, input_size: Optional[Sequence[int]] = None,
            example_input: Optional[Tensor] = None) -> ModelSummary:
    """Per-layer kind, shape, rank, parameters and multiply-adds, with totals against the dense model.

    Args:
        model: the model.
        input_size: one sample's input shape, e.g. (3, 32, 32), to count multiply-adds (one forward
            pass in eval mode on zeros); without it (and ``example_input``) MACs are not counted.
        example_input: a batch of one sample to use instead of zeros (e.g. token ids).

    MACs are those of the Linear / Conv2d / Embedding layers and their factorized versions, per sample.
    Every dense Linear / Conv2d / Embedding row says why it is dense (``why dense``): the reason the
    model recorded in ``model.fnl_kept_dense`` when it was factorized (the timm plugin's ``fnl``
    models: stem, classifier, excluded, depthwise, grouped, ...), else what ``factorize`` refuses
    (grouped or depthwise convs, subclasses, layers inside ``nn.MultiheadAttention``, embeddings with
    ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), else "not selected".
    """
    if example_input is None and input_size is not None:
        example_input = _example(model, input_size)
    shapes = _trace_input_shapes(model, example_input) if example_input is not None else {}
    out = ModelSummary(total_params=count_parameters(model), dense_params=count_parameters(model, dense=True))
    recorded = getattr(model, "fnl_kept_dense", None) or {}
    inside_mha = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.update(f"{name}.{c}" if name else c for c, _ in module.named_modules() if c)
    total_macs = dense_macs = 0
    for name, module in model.named_modules():
        if not isinstance(module, _COUNTED):
            continue
        shape = shapes.get(name)
        if isinstance(module, FactorizedLayer):
            row = LayerRow(name, type(module).__name__, "x".join(map(str, module._dense_weight_shape())), module.rank,
                           module.num_parameters(), module.dense_num_parameters(),
                           None if shape is None else module.macs(shape),
                           None if shape is None else module.dense_macs(shape))
        else:
            n = sum(p.numel() for p in module.parameters())
            macs = None if shape is None else _dense_macs(module, shape)
            row = LayerRow(name, type(module).__name__, "x".join(map(str, module.weight.shape)), None, n, n, macs, macs,
                           _why_dense(name, module, recorded, inside_mha))
        out.rows.append(row)
        if row.macs is not None:
            total_macs += row.macs
            dense_macs += row.dense_macs
    if example_input is not None:
        out.total_macs, out.dense_macs = total_macs, dense_macs
    return out


def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None,
               example_input: Optional[Tensor] = None, dense: bool = False) -> int:
    """Multiply-adds of one sample through the model's Linear / Conv2d / Embedding layers (factorized or not).

    With ``dense``, factorized layers count as the dense layers they replace.
    """
    if input_size is None and example_input is None:
        raise ValueError("count_macs needs input_size (one sample's shape, e.g. (3, 32, 32)) or example_input")
    s = summary(model, input_size, example_input)
    return s.dense_macs if dense else s.total_macs
