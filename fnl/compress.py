"""Post-training compression of any trained model (beyond the paper;
docs/method.md#post-training-compression): spectral factorization of trained layers, with per-layer
rank selection by energy or a multiply-add budget.

``compress(model, target_ratio=0.3, input_size=(3, 224, 224))`` factorizes the model's
``nn.Conv2d`` / ``nn.Linear`` layers by SVD of their trained weights (``from_dense``: the best
rank-r approximation) and returns the compressed copy with a :class:`CompressionReport`.

Ranks come from one monotone family ``r_l(t)``, ``t`` in [0, 1], over every candidate layer ``l``:

* ``allocation='energy'``: ``r_l(t)`` is the smallest rank keeping a fraction ``t`` of the layer's
  spectral energy ``sum(s_i^2)`` (equal relative approximation error in every layer);
* ``allocation='uniform'``: ``r_l(t) = max(1, round(t * base_l))``, the paper's global rank_scale.

Each rank is rounded up to a multiple of ``rank_multiple`` (8 by default: matmul and conv kernels
run on SIMD/tensor-core tiles, so ranks like 13 cost as much as 16). A layer whose factorization at
``r_l(t)`` would not save parameters and multiply-adds (or, with ``measure=True``, is not measured
faster than the dense layer at the user's batch size) is kept dense, with the reason recorded; so
are the stem (first layer run), the classifier (last layer run), grouped convs, unused layers and
excluded ones. ``t`` is found by bisection so that the whole-model parameter ratio
(``target_ratio``) or multiply-add ratio (``target_macs``) is the closest reachable to the target;
``energy=t`` gives ``t`` directly. The counts are analytic: the model is not copied during the
search, only once at the end.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._validate import check_target_ratio
from .base import FactorizedLayer
from .conv import FactorizedConv2d, conv_output_hw
from .deploy import _replace, _timing_input, _trace
from .deploy import fold_batchnorm, measure_latency, select_fastest_paths, to_inference_form  # noqa: F401  (re-exported)
from .linear import FactorizedLinear
from .model import _check_selector, _selects

__all__ = ["CompressionReport", "LayerDecision", "apply_ranks", "compress", "fold_batchnorm", "measure_latency",
           "round_rank", "select_fastest_paths", "to_inference_form"]

Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

_ALLOCATIONS = ("energy", "uniform")
_BISECTION_STEPS = 60


def round_rank(rank: int, multiple: int, full_rank: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at most ``full_rank`` (and at least 1)."""
    if multiple > 1:
        rank = multiple * math.ceil(rank / multiple)
    return max(1, min(rank, full_rank))


@dataclass
class LayerDecision:
    """One Conv2d / Linear layer of the model: what was done to it and why."""
    name: str
    kind: str
    shape: str  # dense weight shape
    input_shape: Optional[tuple]  # one sample's input shape, None if the layer never ran
    decision: str  # 'factorized' or 'dense'
    reason: str
    rank: Optional[int]  # None when kept dense
    full_rank: Optional[int]  # min(m, n) of the layer's matrix
    energy: Optional[float]  # fraction of sum(s^2) kept at ``rank`` (energy allocation only)
    params: int
    dense_params: int
    macs: Optional[int]
    dense_macs: Optional[int]
    factored_ms: Optional[float] = None  # measured (measure=True), at the report's batch size
    dense_ms: Optional[float] = None


@dataclass
class CompressionReport:
    """Per-layer decisions and whole-model totals; ``str()`` gives a table, ``to_dict()`` JSON-able data."""
    layers: list[LayerDecision] = field(default_factory=list)
    mode: str = ""  # 'target_ratio', 'target_macs' or 'energy'
    target: Optional[float] = None
    allocation: str = "energy"
    rank_multiple: int = 8
    t: float = 0.0  # the solved energy fraction / rank_scale
    params: int = 0
    dense_params: int = 0
    macs: int = 0
    dense_macs: int = 0
    bracket: Optional[tuple[float, float]] = None  # achievable ratios just below / above the target
    measured_batch_size: Optional[int] = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # filled by callers (latency, accuracy, ...)

    @property
    def param_ratio(self) -> float:
        return self.params / self.dense_params

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.dense_macs if self.dense_macs else float("nan")

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of every factorized layer, by module name (enough to rebuild the structure)."""
        return {d.name: d.rank for d in self.layers if d.decision == "factorized"}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["param_ratio"] = self.param_ratio
        out["macs_ratio"] = self.macs_ratio
        return out

    def __str__(self) -> str:
        def num(x: Optional[int]) -> str:
            return "-" if x is None else f"{x:,}"

        def ms(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.3f}"

        header = ["layer", "kind", "shape", "rank", "energy", "params", "dense params", "MACs", "dense MACs"]
        timed = any(d.factored_ms is not None for d in self.layers)
        if timed:
            header += ["fact ms", "dense ms"]
        header.append("decision / reason")
        rows = []
        for d in self.layers:
            row = [d.name, d.kind, d.shape, "-" if d.rank is None else f"{d.rank}/{d.full_rank}",
                   "-" if d.energy is None else f"{d.energy:.3f}", num(d.params), num(d.dense_params),
                   num(d.macs), num(d.dense_macs)]
            if timed:
                row += [ms(d.factored_ms), ms(d.dense_ms)]
            row.append(d.decision if d.decision == "factorized" else f"{d.decision}: {d.reason}")
            rows.append(row)
        blank = [""] * (len(header) - 9)
        rows.append(["total", "", "", "", "", num(self.params), num(self.dense_params), num(self.macs),
                     num(self.dense_macs), *blank])
        rows.append(["ratio", "", "", "", "", f"{self.param_ratio:.4f}", "", f"{self.macs_ratio:.4f}", "", *blank])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        left = {0, 1, 2, len(header) - 1}
        lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in [header, *rows]]
        rule = "-" * max(len(x) for x in lines)
        lines.insert(1, rule)
        lines.insert(len(lines) - 2, rule)
        target = "" if self.target is None else f" {self.mode}={self.target:g}"
        bracket = ("" if self.bracket is None
                   else f", reachable neighbours {self.bracket[0]:.4f} / {self.bracket[1]:.4f}")
        lines.insert(0, f"compression{target}: allocation={self.allocation}, t={self.t:.4f}, "
                        f"rank_multiple={self.rank_multiple}{bracket}")
        return "\n".join(lines)


# --- per-layer analysis --------------------------------------------------------------------------
class _Candidate:
    """A dense layer that may be factorized: its matrix sizes, costs as functions of the rank, spectrum."""

    def __init__(self, name: str, module: nn.Module, input_shape: tuple, min_saving: float) -> None:
        self.name, self.module, self.input_shape = name, module, input_shape
        w = module.weight
        self.bias = module.bias.numel() if module.bias is not None else 0
        self.dense_params = w.numel() + self.bias
        if isinstance(module, nn.Conv2d):
            out, inp, kh, kw = w.shape
            # the paper's conv rank base (docs/method.md#rank-rules)
            self.m, self.n, self.base = out * kh, inp * kw, out * kh
            h_out, w_out = conv_output_hw(module, input_shape)
            # (1 x kw) conv on every input row, then (kh x 1) conv: FactorizedConv2d.macs / rank
            self.macs_per_rank = inp * kw * input_shape[-2] * w_out + out * kh * h_out * w_out
            self.dense_macs = out * inp * kh * kw * h_out * w_out
        else:
            out, inp = w.shape
            self.m, self.n, self.base = out, inp, min(out, inp)
            rows = math.prod(input_shape[:-1])
            self.macs_per_rank = rows * (inp + out)
            self.dense_macs = rows * inp * out
        self.full_rank = min(self.m, self.n)
        # largest rank that saves both parameters and multiply-adds (by min_saving)
        by_params = (self.dense_params - self.bias - 1) // (self.m + self.n)
        by_macs = math.ceil(self.dense_macs * (1 - min_saving) / self.macs_per_rank) - 1
        self.break_even = min(by_params, by_macs, self.full_rank)
        self.max_rank: Optional[int] = None  # lowered by measurement
        self._cum_energy: Optional[Tensor] = None

    def params(self, rank: int) -> int:
        return rank * (self.m + self.n) + self.bias

    def macs(self, rank: int) -> int:
        return rank * self.macs_per_rank

    @property
    def cum_energy(self) -> Tensor:
        """Cumulative fraction of ``sum(s_i^2)`` kept by ranks 1..full_rank (float64)."""
        if self._cum_energy is None:
            w = self.module.weight.detach().to(torch.float64)
            # the matrix FactorizedConv2d factors (docs/differences.md#spectral-initialisation-of-convolutions)
            if isinstance(self.module, nn.Conv2d):
                w = w.permute(0, 2, 1, 3).reshape(self.m, self.n)
            gram = w @ w.T if self.m <= self.n else w.T @ w
            s2 = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).cpu()
            total = s2.sum()
            self._cum_energy = s2.cumsum(0) / total if total > 0 else torch.ones_like(s2)
        return self._cum_energy

    def rank_at(self, t: float, allocation: str, multiple: int) -> int:
        if allocation == "uniform":
            raw = max(1, round(t * self.base))
        else:
            raw = int(torch.searchsorted(self.cum_energy, torch.tensor(t - 1e-12, dtype=torch.float64))) + 1
        return round_rank(raw, multiple, self.full_rank)

    def limit(self) -> int:
        return self.break_even if self.max_rank is None else min(self.break_even, self.max_rank)

    def energy_at(self, rank: int) -> float:
        return float(self.cum_energy[min(rank, self.full_rank) - 1])


def _dense_row(name: str, module: nn.Module, shape: Optional[tuple], reason: str) -> LayerDecision:
    n = sum(p.numel() for p in module.parameters(recurse=False))
    macs = None
    if shape is not None and isinstance(module, nn.Conv2d):
        h, w = conv_output_hw(module, shape)
        macs = module.weight.numel() * h * w
    elif shape is not None and isinstance(module, nn.Linear):
        macs = math.prod(shape[:-1]) * module.weight.numel()
    kind = type(module).__name__
    return LayerDecision(name, kind, "x".join(map(str, module.weight.shape)), shape, "dense", reason, None, None, None,
                         n, n, macs, macs)


# --- the solve -----------------------------------------------------------------------------------
def _check_fraction(name: str, value: object, upper_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a float in (0, 1], got {value!r}")
    if not (0 < value <= 1 if upper_inclusive else 0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class _Solver:
    def __init__(self, cands: list[_Candidate], fixed_params: int, dense_params: int, fixed_macs: int,
                 dense_macs: int, allocation: str, multiple: int) -> None:
        self.cands, self.allocation, self.multiple = cands, allocation, multiple
        self.fixed_params, self.dense_params = fixed_params, dense_params
        self.fixed_macs, self.dense_macs = fixed_macs, dense_macs

    def ranks(self, t: float) -> list[Optional[int]]:
        out: list[Optional[int]] = []
        for c in self.cands:
            r = c.rank_at(t, self.allocation, self.multiple)
            out.append(r if r <= c.limit() else None)
        return out

    def totals(self, t: float) -> tuple[int, int]:
        params, macs = self.fixed_params, self.fixed_macs
        for c, r in zip(self.cands, self.ranks(t)):
            params += c.dense_params if r is None else c.params(r)
            macs += c.dense_macs if r is None else c.macs(r)
        return params, macs

    def ratio(self, t: float, by_macs: bool) -> float:
        p, m = self.totals(t)
        return m / self.dense_macs if by_macs else p / self.dense_params

    def solve(self, target: float, by_macs: bool, arg: str) -> tuple[float, tuple[float, float]]:
        """The ``t`` whose ratio is closest to ``target``, and the reachable ratios around it."""
        low_t = 1e-9
        lowest = self.ratio(low_t, by_macs)
        if target < lowest:
            what = "multiply-add" if by_macs else "parameter"
            raise ValueError(f"{arg}={target:g} cannot be reached: the smallest {what} ratio of this model is "
                             f"{lowest:.4f} (every factorizable layer at rank {self.multiple}, stem, classifier "
                             f"and layers that cannot save compute kept dense); ask for at least {lowest:.4f}, "
                             f"lower rank_multiple, or factorize more layers")
        lo, hi = low_t, 1.0  # ratio(lo) <= target; find the smallest t with ratio >= target
        if self.ratio(hi, by_macs) < target:
            return hi, (self.ratio(hi, by_macs), self.ratio(hi, by_macs))
        if lowest >= target:
            return lo, (lowest, lowest)
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            if self.ratio(mid, by_macs) >= target:
                hi = mid
            else:
                lo = mid
        below, above = self.ratio(lo, by_macs), self.ratio(hi, by_macs)
        return (lo if target - below <= above - target else hi), (below, above)


def compress(
        model: nn.Module,
        *,
        target_ratio: Optional[float] = None,
        target_macs: Optional[float] = None,
        energy: Optional[float] = None,
        input_size: Optional[Sequence[int]] = None,
        example_input: Optional[Tensor] = None,
        allocation: str = "energy",
        rank_multiple: int = 8,
        keep_stem: bool = True,
        keep_classifier: bool = True,
        exclude: Selector = None,
        min_saving: float = 0.0,
        measure: bool = False,
        batch_size: int = 1,
        repeats: int = 7,
        inplace: bool = False,
) -> tuple[nn.Module, CompressionReport]:
    """Factorize a trained model's layers by SVD of their weights, at a target or an energy threshold.

    Exactly one of ``target_ratio`` / ``target_macs`` / ``energy``.

    Args:
        model: a trained model (any ``nn.Module``); exact ``nn.Conv2d`` (groups 1, zero padding) and
            ``nn.Linear`` layers are candidates.
        target_ratio: whole-model parameter ratio compressed / original (all parameters count).
        target_macs: multiply-add ratio of the Conv2d / Linear layers, compressed / original.
        energy: per-layer fraction of spectral energy to keep, in (0, 1].
        input_size: one sample's input shape, e.g. (3, 224, 224) (or give ``example_input``).
        example_input: a batch of one sample, used instead of zeros of ``input_size``.
        allocation: ``'energy'`` (equal kept-energy fraction in every layer) or ``'uniform'`` (one
            global rank_scale, the paper's rule); ignored with ``energy``.
        rank_multiple: round ranks up to a multiple of this (1 = no rounding).
        keep_stem: keep the first layer run dense.
        keep_classifier: keep the last layer run dense.
        exclude: fnmatch patterns over module names (or a predicate) of layers to keep dense.
        min_saving: a layer is factorized only if its multiply-adds drop by at least this fraction.
        measure: also time each factorized layer against its dense version at ``batch_size`` on
            the model's device, keep dense those that are not faster, and solve again.
        batch_size: the batch size of the timing (``measure``).
        repeats: timed rounds per layer (``measure``).
        inplace: modify ``model`` itself instead of a copy.

    Returns:
        The compressed model (eval mode kept as the input's) and the report.
    """
    given = {k: v for k, v in (("target_ratio", target_ratio), ("target_macs", target_macs), ("energy", energy))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of target_ratio, target_macs or energy; got {given or 'none'}")
    (mode, target), = given.items()
    if mode == "target_ratio":
        if check_target_ratio(target) > 1:
            raise ValueError(f"target_ratio={target:g} cannot be reached: compression keeps at most the dense "
                             "model's parameters (ratio 1)")
    else:
        _check_fraction(mode, target)
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"allocation must be one of {_ALLOCATIONS}, got {allocation!r}")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(min_saving, (int, float)) or not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be a float in [0, 1), got {min_saving!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_selector("exclude", exclude)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is a TorchScript module: its graph is frozen and its layers cannot be replaced; "
                        "load the eager model (or its state_dict into the model's class) and compress that")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model has no parameters to compress")
    if example_input is None:
        if input_size is None:
            raise ValueError("compress needs input_size (one sample's shape, e.g. (3, 224, 224)) or example_input")
        dtype = param.dtype if param.is_floating_point() else torch.float32
        example_input = torch.zeros((1, *input_size), device=param.device, dtype=dtype)
    shapes, order = _trace(model, example_input)
    like = example_input if example_input.is_floating_point() else torch.zeros((), device=param.device)

    # every Conv2d / Linear gets a row; candidates are those that may be factorized
    inside_mha: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.update(f"{name}.{c}" if name else c for c, _ in module.named_modules() if c)
    stem = order[0] if keep_stem and order else None
    head = order[-1] if keep_classifier and order else None
    rows: dict[str, LayerDecision] = {}
    cands: list[_Candidate] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or isinstance(module, FactorizedLayer):
            continue
        if id(module) in seen:
            continue  # a shared layer: decided once, under its first name
        seen.add(id(module))
        shape = shapes.get(name)
        reason = None
        if type(module) not in (nn.Conv2d, nn.Linear):
            reason = f"type {type(module).__name__} is not exactly nn.Conv2d / nn.Linear"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            reason = f"grouped conv (groups={module.groups})"
        elif isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            reason = f"padding_mode={module.padding_mode!r}"
        elif name in inside_mha:
            reason = "inside nn.MultiheadAttention"
        elif shape is None:
            reason = "not run by the forward pass"
        elif name == stem:
            reason = "stem (first layer run)"
        elif name == head:
            reason = "classifier (last layer run)"
        elif exclude is not None and _selects(exclude, name, module):
            reason = "excluded"
        if reason is None:
            cand = _Candidate(name, module, shape, float(min_saving))
            if cand.break_even < round_rank(1, rank_multiple, cand.full_rank):
                reason = (f"no saving at any rank >= {round_rank(1, rank_multiple, cand.full_rank)} "
                          f"(break-even rank {max(cand.break_even, 0)})")
            else:
                cands.append(cand)
        if reason is not None:
            rows[name] = _dense_row(name, module, shape, reason)
    if not cands:
        raise ValueError("the model has no layer that factorization would make cheaper (see the reasons with "
                         "energy=1.0); nothing to compress")

    dense_params = sum(p.numel() for p in model.parameters())
    counted_macs = sum(r.dense_macs or 0 for r in rows.values())
    dense_macs = counted_macs + sum(c.dense_macs for c in cands)
    fixed_params = dense_params - sum(c.dense_params for c in cands)
    solver = _Solver(cands, fixed_params, dense_params, counted_macs, dense_macs, allocation, rank_multiple)

    timings: dict[tuple[str, int], tuple[float, float]] = {}  # (layer, rank) -> (factored ms, dense ms)
    bracket = None
    for _ in range(8):  # measurement may exclude layers; solve again until stable
        if mode == "energy":
            t = float(target)
        else:
            try:
                t, bracket = solver.solve(float(target), mode == "target_macs", mode)
            except ValueError as e:
                slower = sorted({n for (n, _), (f_ms, d_ms) in timings.items() if f_ms >= d_ms})
                if not slower:
                    raise
                raise ValueError(f"{e}. With measure=True at batch {batch_size}, these layers were measured not "
                                 f"faster factorized and are kept dense: {', '.join(slower)}") from None
        ranks = solver.ranks(t)
        if not measure:
            break
        changed = False
        for c, r in zip(cands, ranks):
            if r is None or (c.name, r) in timings:
                continue
            f_ms, d_ms = _time_layer(c, r, batch_size, like, repeats)
            timings[(c.name, r)] = (f_ms, d_ms)
            if f_ms >= d_ms:
                c.max_rank = r - 1  # this rank (and larger ones) are not faster here
                changed = True
        if not changed:
            break

    report = CompressionReport(mode=mode, target=float(target), allocation="energy" if mode == "energy" else allocation,
                               rank_multiple=rank_multiple, t=t, bracket=bracket,
                               measured_batch_size=batch_size if measure else None, device=str(param.device))
    decided: dict[str, LayerDecision] = {}
    for c, r in zip(cands, ranks):
        want = c.rank_at(t, solver.allocation, rank_multiple)
        timed = [v for (n, rr), v in timings.items() if n == c.name and rr == (r if r is not None else want)]
        f_ms, d_ms = timed[0] if timed else (None, None)
        energy_kept = c.energy_at(r if r is not None else want) if report.allocation == "energy" else None
        if r is None:
            if want > c.break_even:
                reason = (f"rank {want} would not save compute (break-even rank {c.break_even} of "
                          f"{c.full_rank})")
            else:
                reason = f"rank {want} measured not faster at batch {batch_size}"
            decided[c.name] = LayerDecision(c.name, type(c.module).__name__, "x".join(map(str, c.module.weight.shape)),
                                            c.input_shape, "dense", reason, None, c.full_rank, energy_kept,
                                            c.dense_params, c.dense_params, c.dense_macs, c.dense_macs, f_ms, d_ms)
        else:
            decided[c.name] = LayerDecision(c.name, type(c.module).__name__, "x".join(map(str, c.module.weight.shape)),
                                            c.input_shape, "factorized", f"rank {r} of {c.full_rank}", r, c.full_rank,
                                            energy_kept, c.params(r), c.dense_params, c.macs(r), c.dense_macs,
                                            f_ms, d_ms)
    rows.update(decided)
    order_index = {n: i for i, (n, _) in enumerate(model.named_modules())}
    report.layers = sorted(rows.values(), key=lambda d: order_index[d.name])

    out = model if inplace else copy.deepcopy(model)
    apply_ranks(out, report.ranks)
    report.params = sum(p.numel() for p in out.parameters())
    report.dense_params = dense_params
    report.macs = sum(d.macs or 0 for d in report.layers)
    report.dense_macs = dense_macs
    return out, report


def _time_layer(c: _Candidate, rank: int, batch_size: int, like: Tensor, repeats: int) -> tuple[float, float]:
    """Measured ms of the factorized layer at ``rank`` and of the dense one, at the layer's input shape."""
    layer = _factorized(c.module, rank)
    layer.eval()
    x = _timing_input(c.input_shape, batch_size, like)
    dense = c.module
    f_ms, d_ms = measure_latency([lambda: layer(x), lambda: dense(x)], x.device, repeats=repeats)
    return f_ms, d_ms


def _factorized(module: nn.Module, rank: int) -> FactorizedLayer:
    if isinstance(module, nn.Conv2d):
        return FactorizedConv2d.from_dense(module, rank=rank, path="factored")
    return FactorizedLinear.from_dense(module, rank=rank)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Factorize the named dense layers at the given ranks by SVD of their weights (in place).

    Also rebuilds a compressed model's structure from a report's ``ranks`` before loading its
    state dict. Convs get ``path='factored'`` (the ranks were chosen to be cheaper that way).
    """
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"ranks names layer {name!r}, which the model does not have") from None
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"ranks names layer {name!r} of type {type(module).__name__}; only nn.Conv2d / "
                             "nn.Linear can be factorized")
        _replace(model, module, _factorized(module, int(rank)).train(module.training))
    return model
