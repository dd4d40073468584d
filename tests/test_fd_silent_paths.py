"""Paths by which a requested Frobenius decay could silently differ from the closed form
(docs/method.md#frobenius-decay): each is either the closed form or refused with a clear error, before
any parameter changes.

- one engine batch mixing a layer's whole factors with an attention's per-head views of equal shapes;
- ``maximize=True``: with coupled FD the optimizer negates the FD gradient (growth, not decay);
- decoupled FD with one term's tensors at different learning rates;
- FD twice (``FrobeniusDecay`` around an ``fd*`` optimizer) or FD plus plain weight decay on a factor;
- an attention form asked for with a zero coefficient and ``wd2fd=False``;
- a resumed ``FrobeniusDecay`` that would switch between coupled and decoupled.

The closed form: ``dFD/dp`` of ``(1/2) sum ||U S Vᵀ||_F²`` (and of every head's ``W_Q^hᵀ W_K^h``) by
float64 autograd on the products.
"""
import pytest
import torch
from torch import nn

import fnl

LR, COEF = 0.1, 0.5


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(fnl.FactorizedLinear(6, 5, rank=2), nn.ReLU(), nn.Linear(5, 3))
    return model


def _zero_grads(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def _layer_fd(u, v):
    return u @ (v.T @ v), v @ (u.T @ u)


# --- one engine batch: whole factors and per-head views of the same shapes ---------------------------
@pytest.mark.parametrize("d,heads,d_h,rank", [(16, 2, 4, 4), (8, 1, 8, 8), (16, 2, 4, 3)])
@pytest.mark.parametrize("forms_first", [False, True])
def test_layer_and_attention_form_of_equal_shapes_each_get_their_closed_form(d, heads, d_h, rank, forms_first):
    """A FactorizedLinear (d x d, rank r) and a query-key form with d_h = r have the same batched shapes
    (d, r); the layer's factors are used whole and the form's weights through per-head views, so they must
    not share a batch (it crashed with several heads and was silently wrong with one)."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(fc=fnl.FactorizedLinear(d, d, rank=rank, bias=False),
                               q=nn.Linear(d, heads * d_h, bias=False), k=nn.Linear(d, heads * d_h, bias=False)))
    form = fnl.form_term("quekey", model.q.weight, model.k.weight, heads)
    layer = fnl.layer_term(model.fc)
    engine = fnl.FDEngine([form, layer] if forms_first else [layer, form])
    twin = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    q, k = twin["q.weight"].view(heads, d_h, d), twin["k.weight"].view(heads, d_h, d)
    penalty = 0.5 * (twin["fc.U"] @ twin["fc.V"].T).pow(2).sum() + 0.5 * (q.transpose(1, 2) @ k).pow(2).sum()
    expected = dict(zip(twin, torch.autograd.grad(penalty, list(twin.values()))))
    _zero_grads(model)
    engine.apply_(1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


# --- maximize -------------------------------------------------------------------------------------------
def test_core_coupled_fd_refuses_maximize_at_construction_and_at_the_step():
    model = _tiny()
    with pytest.raises(ValueError, match=r"^maximize=True with coupled Frobenius decay: the optimizer would negate"):
        fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 0.0), lr=LR, maximize=True), model, COEF)
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 0.0), lr=LR, momentum=0.9), model, COEF)
    for g in opt.param_groups:
        g["maximize"] = True  # set after construction: the step refuses, before anything moves
    _zero_grads(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^maximize=True with coupled Frobenius decay"):
        opt.step()
    _unchanged(model, before)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_core_decoupled_fd_under_maximize_still_decays():
    """Decoupled FD moves the factors itself, before the update: maximize does not flip it."""
    model = _tiny()
    layer = model[0]
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    opt = fnl.FrobeniusDecay(torch.optim.AdamW(fnl.param_groups(model, 0.0), lr=LR, maximize=True), model, COEF)
    assert opt.decoupled
    _zero_grads(model)  # Adam moves nothing with a zero gradient: only FD moves the factors
    opt.step()
    du, dv = _layer_fd(u, v)
    torch.testing.assert_close(layer.U.detach(), u - LR * COEF * du)
    torch.testing.assert_close(layer.V.detach(), v - LR * COEF * dv)
    assert (layer.U @ layer.V.T).norm() < (u @ v.T).norm()


# --- decoupled FD: one learning rate per term ------------------------------------------------------------
def test_core_decoupled_fd_refuses_one_layer_at_two_learning_rates():
    model = _tiny()
    layer = model[0]
    rest = [p for n, p in model.named_parameters() if n not in ("0.U", "0.V")]
    groups = [{"params": [layer.U], "lr": 0.1, "weight_decay": 0.0},
              {"params": [layer.V], "lr": 0.001, "weight_decay": 0.0}, {"params": rest}]
    with pytest.raises(ValueError, match=r"^decoupled Frobenius decay moves the tensors of one FactorizedLinear by "
                                         r"one learning rate, but they are in param groups with lr \[0\.001, 0\.1\]"):
        fnl.FrobeniusDecay(torch.optim.AdamW(groups, lr=0.1), model, COEF)
    groups[1]["lr"] = 0.1
    opt = fnl.FrobeniusDecay(torch.optim.AdamW(groups, lr=0.1), model, COEF)
    opt.param_groups[1]["lr"] = 0.01  # a scheduler moving one group only: refused at the step
    _zero_grads(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"one learning rate"):
        opt.step()
    _unchanged(model, before)
    # coupled FD reads no learning rate: the same groups are fine
    fnl.FrobeniusDecay(torch.optim.AdamW(groups, lr=0.1), model, COEF, decoupled=False).step()


# --- FD twice, or FD and weight decay --------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.parameters(), lr=LR, weight_decay=1e-3),
    lambda m: torch.optim.AdamW(m.parameters(), lr=LR),  # AdamW's default weight_decay=0.01
    lambda m: torch.optim.Adam(fnl.param_groups(m, 1e-3, wd2fd=False), lr=LR),
], ids=["sgd-wd", "adamw-default-wd", "param_groups-wd2fd-false"])
def test_core_refuses_plain_weight_decay_on_a_factor(make):
    model = _tiny()
    with pytest.raises(ValueError, match=r"^a FactorizedLinear tensor is in a param group with weight_decay=.*: it "
                                         r"would get plain weight decay and Frobenius decay\. Build the optimizer "
                                         r"with fnl\.param_groups"):
        fnl.FrobeniusDecay(make(model), model, COEF)


def test_core_refuses_weight_decay_set_on_a_factor_group_later():
    model = _tiny()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-3), lr=LR), model, COEF)
    opt.param_groups[-1]["weight_decay"] = 1e-3  # the factors' group
    _zero_grads(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"weight_decay=0\.001: it would get plain weight decay and Frobenius"):
        opt.step()
    _unchanged(model, before)


def test_core_weight_decay_on_other_parameters_is_kept():
    """Only the regularised tensors must be free of plain weight decay: the rest keeps it, and one SGD step
    is weight decay there and FD on the factors."""
    model = _tiny()
    layer = model[0]
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-2), lr=LR), model, COEF)
    before = _snapshot(model)
    _zero_grads(model)
    opt.step()
    du, dv = _layer_fd(before["0.U"], before["0.V"])
    torch.testing.assert_close(layer.U.detach(), before["0.U"] - LR * COEF * du)
    torch.testing.assert_close(layer.V.detach(), before["0.V"] - LR * COEF * dv)
    torch.testing.assert_close(model[2].weight.detach(), before["2.weight"] * (1 - LR * 1e-2))


def test_core_refuses_to_wrap_an_optimizer_that_applies_fd_itself():
    pytest.importorskip("timm")
    import fnl_timm  # noqa: F401  (registers the fd* optimizers)
    from timm.optim import create_optimizer_v2
    model = _tiny()
    fnl.mark_factors(model)
    inner = create_optimizer_v2(model, "fdmomentum", lr=LR, momentum=0.9, weight_decay=COEF)
    with pytest.raises(ValueError, match=r"^the optimizer applies Frobenius decay itself \(a param group has "
                                         r"fd_coef=0\.5\); wrapping it in FrobeniusDecay would apply it twice$"):
        fnl.FrobeniusDecay(inner, model, COEF)


# --- a resumed wrapper keeps its mode -----------------------------------------------------------------
def test_load_state_dict_restores_coupled_or_decoupled():
    model = _tiny()
    coupled = fnl.FrobeniusDecay(torch.optim.AdamW(fnl.param_groups(model, 0.0), lr=LR), model, 0.3,
                                 decoupled=False)
    state = coupled.state_dict()
    assert state["frobenius_decay"] == {"coef": 0.3, "decoupled": False}
    resumed = fnl.FrobeniusDecay(torch.optim.AdamW(fnl.param_groups(model, 0.0), lr=LR), model, 0.1)
    assert resumed.decoupled
    resumed.load_state_dict(state)
    assert (resumed.coef, resumed.decoupled) == (0.3, False)
    state["frobenius_decay"]["decoupled"] = "no"
    with pytest.raises(ValueError, match=r"\['decoupled'\] must be True or False, got 'no'"):
        resumed.load_state_dict(state)
    # a decoupled state into a wrapper with extra callables (coupled only) is refused
    extra = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 0.0), lr=LR), model, 0.3,
                               extra=[lambda c: None])
    state["frobenius_decay"]["decoupled"] = True
    with pytest.raises(ValueError, match=r"^the state_dict is of decoupled Frobenius decay, .* this wrapper's extra "
                                         r"callables can only add gradients \(coupled\)$"):
        extra.load_state_dict(state)
    assert extra.decoupled is False and extra.coef == 0.3  # nothing changed


# --- the timm fd* optimizers ---------------------------------------------------------------------------
@pytest.fixture
def timm_fd():
    pytest.importorskip("timm")
    import fnl_timm  # noqa: F401
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2


@pytest.mark.parametrize("name,kwargs", [("fdmomentum", {}), ("fdsgd", {}),
                                         ("fdadamw", {"fd_decoupled": False}), ("fdadam", {"fd_decoupled": False})])
def test_timm_coupled_fd_refuses_maximize(timm_fd, name, kwargs):
    model = _tiny()
    fnl.mark_factors(model)
    with pytest.raises(ValueError, match=r"^maximize=True with coupled Frobenius decay"):
        timm_fd(model, name, lr=LR, weight_decay=COEF, maximize=True, **kwargs)
    opt = timm_fd(model, name, lr=LR, weight_decay=COEF, **kwargs)
    for g in opt.param_groups:
        g["maximize"] = True
    _zero_grads(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^maximize=True with coupled Frobenius decay"):
        opt.step()
    _unchanged(model, before)


def test_timm_decoupled_fd_under_maximize_still_decays(timm_fd):
    model = _tiny()
    fnl.mark_factors(model)
    layer = model[0]
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    opt = timm_fd(model, "fdadamw", lr=LR, weight_decay=COEF, maximize=True)
    _zero_grads(model)
    opt.step()
    du, dv = _layer_fd(u, v)
    torch.testing.assert_close(layer.U.detach(), u - LR * COEF * du)
    torch.testing.assert_close(layer.V.detach(), v - LR * COEF * dv)


def test_timm_attention_form_with_zero_coefficient_is_refused_without_wd2fd(timm_fd):
    """``fnl-train --wd2fd-quekey --weight-decay 0`` (wd2fd off): FD on the forms was asked for, with a
    coefficient of 0 nobody chose; refused as it is with wd2fd on."""
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("fnl", base="vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=3,
                            rank_scale=0.5, attention="heads")
    for wd2fd in (True, False):
        with pytest.raises(ValueError, match=r"the FD coefficient \(default: the weight decay\) is 0, so Frobenius "
                                             r"decay would do nothing"):
            timm_fd(vit, "fdmomentum", lr=LR, weight_decay=0.0, wd2fd=wd2fd, wd2fd_quekey=True)
    # an explicit fd_coef=0 is the user's choice (the paper's --no-frob)
    timm_fd(vit, "fdmomentum", lr=LR, weight_decay=0.0, wd2fd=False, wd2fd_quekey=True, fd_coef=0.0)
