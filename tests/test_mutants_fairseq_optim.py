"""Tests that kill the mutants of `fnl_fairseq/optim.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour of the fairseq FD optimizers (paper section 3; docs/method.md):
``--adam-betas`` read as a literal pair in [0, 1) with the exact refusal; how the fp32 master copies of
``--fp16`` / ``--bf16`` are matched to the model's parameters (order, shape, dtype, values) and the flat
copy refused with the exact count; the split into a plain-weight-decay group and an FD group, which
``load_state_dict`` / ``--optimizer-overrides`` never give weight decay; the unscale under ``--amp`` on
every step; gradient clipping with fairseq's norm aggregation; coupled and decoupled ``fd_adam``.

The closed form, with a zero task gradient: one SGD step moves a factor by ``-lr * coef * dFD/dp``
(``dFD/dU = U Vᵀ V``, ``dFD/dV = V Uᵀ U``) and a plain weight by ``-lr * wd * p``; one decoupled Adam
step moves a factor by ``-lr * coef * dFD/dp`` only (Adam's own update of a zero gradient is zero).
"""
import dataclasses
import logging

import pytest
import torch
from torch import nn

fairseq = pytest.importorskip("fairseq")

import fnl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fnl_fairseq import optim as fdo  # noqa: E402
from fnl_fairseq.fd import FDTerms, register_model  # noqa: E402
from fnl_fairseq.optim import (FDAdamConfig, FairseqFDAdam, FairseqFDNAG, FairseqFDSGD,  # noqa: E402
                               literal_betas, match_fp32_copies)
from test_fairseq_plugin import ALL_FD, _amp_optimizer, _build, _optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WD = 0.5, 0.1

# --- --adam-betas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("(0.9, 0.98)", [0.9, 0.98]),
    ("[0, 0.999]", [0.0, 0.999]),  # 0 is allowed
    ((0.5, 0.25), [0.5, 0.25]),
    ([0, 0], [0.0, 0.0]),
    (OmegaConf.create([0.8, 0.9]), [0.8, 0.9]),  # what fairseq's config holds after its own parsing
])
def test_literal_betas_reads_a_pair(value, expected):
    out = literal_betas(value)
    assert out == expected and type(out) is list and all(type(b) is float for b in out)


PARSE = "--adam-betas must be a pair of numbers such as '(0.9, 0.98)', got {!r}"
SHAPE = "--adam-betas must be a pair of numbers in [0, 1) such as '(0.9, 0.98)', got {!r}"


@pytest.mark.parametrize("value,message", [
    ("__import__('os').getcwd()", PARSE),  # never run as code
    ("(0.9, ", PARSE),
    ("", PARSE),
    ("(0.9, 0.98, 0.5)", SHAPE),
    ((0.9,), SHAPE),
    ("(0.9, 1.0)", SHAPE),  # 1 is excluded
    ("(0.9, 1.5)", SHAPE),
    ([2, 0.9], SHAPE),
    ((0.9, -0.1), SHAPE),
    ((True, 0.9), SHAPE),
    ((False, 0.9), SHAPE),  # a bool is not a number here, even False == 0
    (("0.9", 0.9), SHAPE),
    ("0.9", SHAPE),
    (0.9, SHAPE),
    (None, SHAPE),
])
def test_literal_betas_refusals(value, message):
    with pytest.raises(ValueError) as err:
        literal_betas(value)
    assert str(err.value) == message.format(value)


def _adam_cfg(**changes):
    fields = dataclasses.asdict(FDAdamConfig())
    fields.update(lr=[0.01], tpu=False, weight_decay=WD, adam_eps=1e-3)
    fields.pop("_name")
    fields.update(changes)
    return OmegaConf.create({k: v for k, v in fields.items() if v is not dataclasses.MISSING})


# --- a tiny model that asks for FD on one factorized layer -------------------------------------------


class _Owner(nn.Module):
    """One factorized layer (FD on U, V) and ``extra`` plain parameters (weight decay)."""

    def __init__(self, extra=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = fnl.FactorizedLinear(4, 3, rank=2, bias=False)
        self.plain = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(extra)])
        register_model(self)

    def frobenius_decay_terms(self):
        return FDTerms(layers=[self.fc])


def _sgd_cfg(wd=WD):
    return OmegaConf.create({"lr": [LR], "momentum": 0.0, "weight_decay": wd})


def _fd_step(u, v, coef, lr):
    """One coupled SGD step (or decoupled step) of FD with no task gradient, in float64."""
    u64, v64 = u.double(), v.double()
    return (u64 - lr * coef * u64 @ (v64.T @ v64)).float(), (v64 - lr * coef * v64 @ (u64.T @ u64)).float()


def _zero_grads(params):
    for p in params:
        p.grad = torch.zeros_like(p)


def test_groups_split_and_one_step_is_the_closed_form():
    m = _Owner(extra=2)
    params = list(m.parameters())
    opt = FairseqFDSGD(_sgd_cfg(), params)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in m.plain],
                                                                       [id(m.fc.U), id(m.fc.V)]]
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    assert opt.coef == WD and opt._fd_ids == {id(m.fc.U), id(m.fc.V)}
    cfg = _sgd_cfg()
    assert FairseqFDSGD(cfg, params).cfg is cfg  # fairseq's FairseqOptimizer.cfg
    u, v = _fd_step(m.fc.U.detach(), m.fc.V.detach(), WD, LR)
    plain = [p.detach() * (1 - LR * WD) for p in m.plain]
    _zero_grads(params)
    opt.step()
    assert torch.allclose(m.fc.U.detach(), u, atol=1e-7) and torch.allclose(m.fc.V.detach(), v, atol=1e-7)
    assert all(torch.allclose(p.detach(), e, atol=1e-7) for p, e in zip(m.plain, plain))


def test_only_fd_parameters_form_one_group():
    m = _Owner(extra=0)
    opt = FairseqFDSGD(_sgd_cfg(), list(m.parameters()))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_start_up_log_line(caplog):
    m = _Owner(extra=2)
    with caplog.at_level(logging.INFO, logger="fnl_fairseq.optim"):
        FairseqFDSGD(_sgd_cfg(0.25), list(m.parameters()))
        FairseqFDAdam(_adam_cfg(weight_decay=0.5), list(m.parameters()))
        m.half()
        FairseqFDAdam(_adam_cfg(fd_coupled=True), _copies(m))
    assert [r.getMessage() for r in caplog.records if r.name == "fnl_fairseq.optim"] == [
        "coupled Frobenius decay (coef 0.25) on 1 factorized layers, 0 query-key and 0 output-value forms "
        "(14 parameters without plain weight decay)",
        "decoupled Frobenius decay (coef 0.5) on 1 factorized layers, 0 query-key and 0 output-value forms "
        "(14 parameters without plain weight decay)",
        "coupled Frobenius decay (coef 0.1) on 1 factorized layers, 0 query-key and 0 output-value forms "
        "(14 parameters without plain weight decay, on their fp32 copies)"]


def test_no_model_asks_for_fd(monkeypatch):
    """Parameters of no registered model, and no model asking for FD: the fd_* optimizer would do nothing."""
    import weakref

    import fnl_fairseq.fd
    monkeypatch.setattr(fnl_fairseq.fd, "_LIVE", weakref.WeakSet())
    with pytest.raises(ValueError) as err:
        FairseqFDSGD(_sgd_cfg(), [nn.Parameter(torch.ones(3))])
    assert str(err.value) == ("--optimizer fd_sgd: the model asks for no Frobenius decay (no --wd2fd, --wd2fd-quekey "
                              "or --wd2fd-outval), so it would do nothing; add the flags, or use --optimizer sgd")


def test_step_runs_the_closure_once():
    """``step(closure)``: the closure's gradients (here 1 everywhere) get FD and weight decay, then the step."""
    m = _Owner(extra=1)
    params = list(m.parameters())
    opt = FairseqFDSGD(_sgd_cfg(), params)
    calls = []

    def closure():
        calls.append(1)
        for p in params:
            p.grad = torch.ones_like(p)
        return 0.0

    u, v = _fd_step(m.fc.U.detach(), m.fc.V.detach(), WD, LR)
    b = m.plain[0].detach() * (1 - LR * WD) - LR
    opt.step(closure)
    assert calls == [1]
    assert torch.allclose(m.fc.U.detach(), u - LR, atol=1e-6) and torch.allclose(m.fc.V.detach(), v - LR, atol=1e-6)
    assert torch.allclose(m.plain[0].detach(), b, atol=1e-7)


def test_refusals_name_the_argument():
    m = _Owner()
    with pytest.raises(ValueError) as err:
        FairseqFDSGD(_sgd_cfg(-0.1), list(m.parameters()))
    assert str(err.value) == "--weight-decay (the FD coefficient) must be >= 0, got -0.1"
    with pytest.raises(ValueError) as err:
        FairseqFDNAG(OmegaConf.create({"lr": [LR], "momentum": 0.0, "weight_decay": 0.0}), list(m.parameters()))
    assert str(err.value).startswith("--optimizer fd_nag with --weight-decay 0: ")
    assert str(err.value).endswith("or drop the --wd2fd* flags and use --optimizer nag")
    m.fc.V.requires_grad_(False)
    with pytest.raises(ValueError) as err:
        FairseqFDSGD(_sgd_cfg(), [p for p in m.parameters() if p.requires_grad])
    assert str(err.value) == ("1 parameter(s) that Frobenius decay regularises are not being optimized "
                              "(requires_grad=False?); unfreeze them or drop the --wd2fd* flag")


# --- fp32 master copies (--fp16 --fp16-no-flatten-grads, --bf16) -------------------------------------


def _module(*shapes, dtype=torch.float16):
    m = nn.Module()
    m.ps = nn.ParameterList([nn.Parameter(torch.randn(*s).to(dtype)) for s in shapes])
    return m


def _copies(m):
    return [p.detach().float().clone().requires_grad_(True) for p in m.parameters()]


FLAT = ("--fp16 hands the optimizer one flat fp32 copy of all {} parameters, which cannot keep plain weight decay "
        "off the parameters that Frobenius decay regularises: add --fp16-no-flatten-grads (or use "
        "--memory-efficient-fp16 or --amp) with the fd_* optimizers")
UNMATCHED = ("the FD optimizers were given {} tensor(s) that are neither the parameters of the model asking for "
             "Frobenius decay nor fp32 copies of them in the model's order; build the optimizer over "
             "[p for p in model.parameters() if p.requires_grad] (fairseq's trainer does)")


@pytest.mark.parametrize("shapes", [[(3, 2), (2,)], [(5,)], [(2, 2)], [(4,), (4,), (1,)]])
def test_match_fp32_copies_in_order(shapes):
    torch.manual_seed(0)
    m = _module(*shapes)
    copies = _copies(m)
    criterion = torch.zeros(2, requires_grad=True)  # fairseq: the criterion's parameters come after the model's
    owner, mapping = match_fp32_copies(copies + [criterion], [m])
    assert owner is m
    assert {k: id(c) for k, c in mapping.items()} == {id(p): id(c) for p, c in zip(m.parameters(), copies)}


def test_match_fp32_copies_skips_models_that_do_not_match():
    torch.manual_seed(0)
    big, small = _module((3,), (3,), (3,)), _module((3,), (2,))
    copies = _copies(small)
    owner, mapping = match_fp32_copies(copies, [big, small])
    assert owner is small and set(mapping) == {id(p) for p in small.parameters()}
    owner, _ = match_fp32_copies(_copies(big), [small, big])
    assert owner is big


def test_match_fp32_copies_ignores_frozen_parameters():
    torch.manual_seed(0)
    m = _module((3, 2), (2,), (4,))
    m.ps[1].requires_grad_(False)
    copies = [c for c, p in zip(_copies(m), m.parameters()) if p.requires_grad]
    owner, mapping = match_fp32_copies(copies, [m])
    assert owner is m and set(mapping) == {id(m.ps[0]), id(m.ps[2])}


@pytest.mark.parametrize("shapes", [[(3, 2), (2,)], [(2,), (2,), (2,)], [(4, 4), (1,)]])
def test_flat_copy_is_refused_with_the_count(shapes):
    torch.manual_seed(0)
    m = _module(*shapes)
    flat = torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])
    for given in ([flat], [torch.cat([flat, torch.zeros(3)])]):  # fairseq pads the flat buffer
        with pytest.raises(RuntimeError) as err:
            match_fp32_copies(given, [m])
        assert str(err.value) == FLAT.format(len(shapes))


def _unmatched(given, models):
    with pytest.raises(RuntimeError) as err:
        match_fp32_copies(given, models)
    assert str(err.value) == UNMATCHED.format(len(given))


def test_tensors_that_are_not_copies_are_refused():
    torch.manual_seed(0)
    m = _module((3, 2), (2,))
    copies = _copies(m)
    flat = torch.cat([c.detach().reshape(-1) for c in copies])
    _unmatched([flat, flat.clone()], [m])  # a long 1-d tensor among others is not a flat copy
    _unmatched([flat, copies[1]], [m])
    _unmatched([copies[0]], [m])  # fewer tensors than the model's parameters
    _unmatched(copies[::-1], [m])  # another order
    _unmatched([c.detach().double() for c in copies], [m])  # equal values, not float32
    _unmatched([c.detach().to(torch.float16) for c in copies], [m])
    _unmatched([copies[0] + 1e-3, copies[1]], [m])  # same shapes and dtype, other values
    _unmatched([copies[0].reshape(2, 3), copies[1]], [m])
    one = _module((5,))
    _unmatched([c.detach().double() for c in _copies(one)], [one])  # one 1-d parameter: not flat, not a copy


def test_fd_acts_on_the_copies_and_a_frozen_factor_is_named():
    m = _Owner(extra=1)
    m.half()
    copies = _copies(m)
    opt = FairseqFDSGD(_sgd_cfg(), copies)
    c_u, c_v, c_b = copies
    assert opt._fd_ids == {id(c_u), id(c_v)}
    u, v = _fd_step(c_u.detach(), c_v.detach(), WD, LR)
    b = c_b.detach() * (1 - LR * WD)
    before = [p.detach().clone() for p in m.parameters()]
    _zero_grads(copies)
    opt.step()
    assert torch.allclose(c_u.detach(), u, atol=1e-6) and torch.allclose(c_v.detach(), v, atol=1e-6)
    assert torch.allclose(c_b.detach(), b, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))  # fairseq copies them back itself
    m.fc.U.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^1 parameter\(s\) that Frobenius decay regularises are not being "):
        FairseqFDSGD(_sgd_cfg(), [c for c, p in zip(_copies(m), m.parameters()) if p.requires_grad])


# --- clipping, --amp, state, overrides ------------------------------------------------------------


def test_clip_grad_norm_uses_the_aggregated_norm():
    m = _Owner(extra=1)
    params = list(m.parameters())
    opt = FairseqFDSGD(_sgd_cfg(), params)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    grads = [p.grad.clone() for p in params]
    norm = torch.stack([g.norm() for g in grads]).norm()
    total = opt.clip_grad_norm(1.0, aggregate_norm_fn=lambda n: 4 * n)  # e.g. the sum over workers
    assert torch.allclose(total, 4 * norm)
    assert all(torch.allclose(p.grad, g / (4 * norm + 1e-6)) for p, g in zip(params, grads))
    assert opt._unscaled is True
    opt.step()
    assert opt._unscaled is False


@pytest.mark.parametrize("clips", [(False, False), (True, False), (False, True)])
def test_amp_unscales_on_every_step(clips):
    """Two --amp steps, clipping (which unscales) on some of them: a task gradient of 1 (lr 1, plain weight
    decay 0.1) moves the weight by exactly 1 + 0.1 w each time."""
    model, opt = _amp_optimizer()
    w = model.encoder.layers[0].final_layer_norm.weight
    expected = w.detach().clone()
    for clip in clips:
        opt.zero_grad()
        opt.backward(w.sum())
        if clip:
            opt.clip_grad_norm(0.0)
        opt.step()
        expected = expected - (1.0 + 0.1 * expected)
        assert torch.allclose(w.detach(), expected, atol=1e-6), f"{(w.detach() - expected).abs().max()}"
    assert opt.scaler.get_scale() == 128.0


@pytest.mark.parametrize("clip", [False, True])
def test_amp_overflow_skips_the_step(clip):
    """An inf gradient under --amp: no parameter moves (FD and weight decay included), the scale halves,
    and the next step is a normal one."""
    model, opt = _amp_optimizer()
    w = model.encoder.layers[0].final_layer_norm.weight
    before = [p.detach().clone() for p in model.parameters()]
    opt.backward(w.sum() * float("inf"))
    if clip:
        opt.clip_grad_norm(0.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.scaler.get_scale() == 64.0
    opt.zero_grad()
    opt.backward(w.sum())
    opt.step()
    expected = before[[id(p) for p in model.parameters()].index(id(w))]
    expected = expected - (1.0 + 0.1 * expected)
    assert torch.allclose(w.detach(), expected, atol=1e-6), f"{(w.detach() - expected).abs().max()}"


def test_state_without_fd_entry_keeps_the_coefficient():
    """A torch-optimizer state dict without the FD entry (a checkpoint of the wrapped optimizer) loads;
    the coefficient stays this run's."""
    m = _Owner(extra=2)
    params = list(m.parameters())
    opt = FairseqFDSGD(OmegaConf.create({"lr": [LR], "momentum": 0.9, "weight_decay": WD}), params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups", "fnl_frobenius_decay"}
    assert state["fnl_frobenius_decay"] == {"coef": WD, "layers": 1, "quekey": 0, "outval": 0}
    del state["fnl_frobenius_decay"]
    opt2 = FairseqFDSGD(OmegaConf.create({"lr": [LR], "momentum": 0.9, "weight_decay": 0.3}), params)
    opt2.load_state_dict(state)
    assert opt2.coef == 0.3
    assert all(torch.equal(opt2.optimizer.state[p]["momentum_buffer"], opt.optimizer.state[p]["momentum_buffer"])
               for p in params)


@pytest.mark.parametrize("extra", [1, 3])
def test_overrides_never_give_the_fd_group_weight_decay(extra):
    m = _Owner(extra=extra)
    params = list(m.parameters())
    opt = FairseqFDSGD(_sgd_cfg(), params)
    state = opt.state_dict()
    opt.load_state_dict(state, {"lr": 0.25})
    assert opt.coef == WD and [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.25, WD), (0.25, 0.0)]
    opt.load_state_dict(state, {"weight_decay": 0.2})
    assert opt.coef == 0.2 and [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    u, v = _fd_step(m.fc.U.detach(), m.fc.V.detach(), 0.2, LR)
    plain = [p.detach() * (1 - LR * 0.2) for p in m.plain]
    _zero_grads(params)
    opt.step()
    assert torch.allclose(m.fc.U.detach(), u, atol=1e-7) and torch.allclose(m.fc.V.detach(), v, atol=1e-7)
    assert all(torch.allclose(p.detach(), e, atol=1e-7) for p, e in zip(m.plain, plain))
    opt.load_state_dict(state, {})  # no overrides: the checkpoint's values
    assert opt.coef == WD and [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]


# --- fd_adam ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coupled", [None, False, True])
def test_fd_adam_step_decoupled_unless_asked(coupled):
    """A config without ``fd_coupled`` (an older one) is decoupled, the documented default."""
    m = _Owner(extra=1)
    params = list(m.parameters())
    changes = {} if coupled is None else {"fd_coupled": coupled}
    cfg = _adam_cfg(**changes)
    if coupled is None:
        del cfg["fd_coupled"]
    opt = FairseqFDAdam(cfg, params)
    assert opt._optimizer.decoupled is (not coupled)
    u0, v0 = m.fc.U.detach().clone(), m.fc.V.detach().clone()
    _zero_grads(params)
    opt.step()
    if coupled:  # fairseq Adam's first step on g = coef dFD/dp: lr g / (|g| + eps / sqrt(1 - beta2))
        g = WD * u0.double() @ (v0.double().T @ v0.double())
        u = (u0.double() - 0.01 * g / (g.abs() + 1e-3 / (1 - 0.999) ** 0.5)).float()
    else:
        u, _ = _fd_step(u0, v0, WD, 0.01)
    assert torch.allclose(m.fc.U.detach(), u, atol=1e-7), f"{(m.fc.U.detach() - u).abs().max()}"


def test_fd_adam_reads_betas_without_touching_the_config():
    m = _Owner(extra=1)
    cfg = _adam_cfg(adam_betas="(0.5, 0.75)")
    opt = FairseqFDAdam(cfg, list(m.parameters()))
    assert cfg.adam_betas == "(0.5, 0.75)"
    assert [tuple(g["betas"]) for g in opt.param_groups] == [(0.5, 0.75)] * 2
    assert opt.optimizer_config["betas"] == [0.5, 0.75]
    with pytest.raises(ValueError, match=r"^--adam-betas must be a pair of numbers in \[0, 1\)"):
        FairseqFDAdam(_adam_cfg(adam_betas="(0.5, 1)"), list(m.parameters()))
    code = "(0.5, 0.75) if True else 0"  # fairseq's adam would eval() it; never run as code here
    with pytest.raises(ValueError) as err:
        FairseqFDAdam(_adam_cfg(adam_betas=code), list(m.parameters()))
    assert str(err.value) == PARSE.format(code)


def test_fairseq_model_overrides_and_clip():
    """The plugin's Transformer under fd_nag: clipping goes through the wrapper and overrides keep the FD
    group (every factor and attention projection) free of weight decay."""
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.01"] + ALL_FD, optimizer="fd_nag")
    opt = _optimizer(model, args)
    opt.load_state_dict(opt.state_dict(), {"weight_decay": 0.05})
    fd = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert len(fd) == 1 and {id(p) for p in fd[0]["params"]} == opt._fd_ids == {id(p) for p in opt.terms.parameters()}
    assert isinstance(opt, fdo.FDOptimizer)


# --- what fairseq sees of the wrapper -------------------------------------------------------------


@pytest.mark.parametrize("name,cls,base,memory_efficient", [
    ("fd_nag", FairseqFDNAG, "nag", True), ("fd_adam", FairseqFDAdam, "adam", True),
    ("fd_sgd", FairseqFDSGD, "sgd", False)])
def test_registry_and_capabilities(name, cls, base, memory_efficient):
    from fairseq.optim import OPTIMIZER_REGISTRY
    assert OPTIMIZER_REGISTRY[name] is cls and cls.base == base
    m = _Owner(extra=1)
    cfg = _adam_cfg() if base == "adam" else OmegaConf.create({"lr": [LR], "momentum": 0.0, "weight_decay": WD})
    opt = cls(cfg, list(m.parameters()))
    assert type(opt.wrapped) is OPTIMIZER_REGISTRY[base] and opt.optimizer is opt._optimizer
    assert opt._optimizer.optimizer is opt.wrapped.optimizer
    assert opt._optimizer.decoupled is (base == "adam")
    assert (opt.supports_step_with_scale, opt.supports_groups, opt.supports_flat_params) == (False, False, False)
    assert opt.supports_memory_efficient_fp16 is memory_efficient
    assert opt.optimizer_config == opt.wrapped.optimizer_config and opt.optimizer_config["lr"] == cfg.lr[0]
    assert opt._step_supports_amp_scaling is True


def test_sgd_config_defaults():
    cfg = fdo.FDSGDConfig()
    assert (cfg.momentum, cfg.weight_decay) == (0.0, 0.0)
    assert FDAdamConfig().fd_coupled is False


@pytest.mark.parametrize("key", ["layers", "quekey", "outval"])
def test_state_of_other_fd_terms_is_refused_with_both_counts(key):
    m = _Owner(extra=1)
    state = FairseqFDSGD(_sgd_cfg(), list(m.parameters())).state_dict()
    state["fnl_frobenius_decay"] = dict(state["fnl_frobenius_decay"], **{key: 2})
    opt = FairseqFDSGD(_sgd_cfg(), list(m.parameters()))
    saved = dict({"layers": 1, "quekey": 0, "outval": 0}, **{key: 2})
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(state)
    assert str(err.value) == (f"the checkpoint's optimizer applied Frobenius decay to {saved} but this run asks for "
                              "{'layers': 1, 'quekey': 0, 'outval': 0} (different --wd2fd* flags or model); use "
                              "--reset-optimizer to start afresh")
