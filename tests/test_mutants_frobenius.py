"""Tests that kill the mutants of `fnl/frobenius.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour of the FD wrapper and its helpers: the parameter groups (frozen and
skipped parameters), what the wrapper passes on to the wrapped optimizer, the state it saves and
restores, its repr and the messages of rejected arguments.
"""
import pytest
import torch
from torch import nn

import fnl


def _model():
    torch.manual_seed(0)
    return nn.Sequential(fnl.FactorizedLinear(4, 3, rank=2), nn.ReLU(), nn.Linear(3, 2))


def test_param_groups_leave_out_frozen_and_skip_named():
    model = _model()
    model[0].bias.requires_grad_(False)  # a frozen parameter before others: those still get their groups
    groups = fnl.param_groups(model, 0.1, skip=["2.weight"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 1, 2]
    assert groups[0]["params"][0] is model[2].bias
    assert groups[1]["params"][0] is model[2].weight
    assert groups[2]["params"] == [model[0].U, model[0].V] and groups[2]["factors"] is True
    assert "factors" not in groups[0] and "factors" not in groups[1]
    # without wd2fd the factors are plain decayed parameters, and no factor group is made
    groups = fnl.param_groups(model, 0.1, wd2fd=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1 and len(groups[0]["params"]) == 4
    assert fnl.param_groups(model, 0.0)[0]["weight_decay"] == 0.0  # zero is allowed
    with pytest.raises(ValueError, match=r"^weight_decay must be >= 0, got -0\.5$"):
        fnl.param_groups(model, -0.5)


def test_norm_and_penalty():
    model = _model()
    layer = model[0]
    w = layer.dense_weight().detach().double()
    assert torch.allclose(fnl.frobenius_norm(layer).double(), w.norm(), rtol=1e-6)
    assert torch.allclose(fnl.frobenius_penalty(model, 0.4).double(), 0.2 * w.square().sum(), rtol=1e-6)
    assert fnl.factorized_layers(model) == [layer]
    assert fnl.factorized_layers(layer) == [layer]
    with pytest.raises(TypeError, match=r"^layer must be a FactorizedLayer, got Linear$"):
        fnl.frobenius_norm(model[2])
    with pytest.raises(ValueError, match=r"^module has no factorized layers; nothing to penalise$"):
        fnl.frobenius_penalty(nn.Linear(2, 2), 0.1)


def test_wrapper_passes_calls_on_and_saves_its_settings():
    model = _model()
    inner = torch.optim.SGD(fnl.param_groups(model, 0.0), lr=0.1)
    opt = fnl.FrobeniusDecay(inner, model, 0.25)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    assert repr(opt).startswith("FrobeniusDecay(coef=0.25, decoupled=False, layers=1, terms=1, optimizer=SGD (")
    state = opt.state_dict()
    assert state["frobenius_decay"] == {"coef": 0.25, "decoupled": False}
    model(torch.randn(2, 4)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"] == [extra] and inner.param_groups[-1]["lr"] == 0.5
    other = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 0.0), lr=0.1), model, 3.0)
    other.optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.5})
    other.load_state_dict(opt.state_dict())
    assert other.coef == 0.25 and isinstance(other.coef, float)


def test_zero_coefficient_adds_nothing():
    model = _model()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0)
    assert opt.coef == 0.0 and isinstance(opt.coef, float)
    model(torch.randn(2, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.apply_frobenius_decay()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_extra_callables_get_the_coefficient():
    model = _model()
    seen = []
    opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.5, extra=[seen.append])
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert seen == [0.5]
    only_extra = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), nn.Linear(2, 2), 0.5,
                                    extra=[seen.append])
    assert only_extra.layers == [] and len(only_extra.engine) == 0


def test_wrapper_messages():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^optimizer must be a torch\.optim\.Optimizer, got object$"):
        fnl.FrobeniusDecay(object(), model, 0.1)
    with pytest.raises(TypeError, match=r"^optimizer is already wrapped in FrobeniusDecay$"):
        fnl.FrobeniusDecay(fnl.FrobeniusDecay(sgd, model, 0.1), model, 0.1)
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got list$"):
        fnl.FrobeniusDecay(sgd, [], 0.1)
    with pytest.raises(ValueError, match=r"^coef must be a float >= 0, got nan$"):
        fnl.FrobeniusDecay(sgd, model, float("nan"))
    with pytest.raises(TypeError, match=r"^decoupled must be None, True or False, got 'yes'$"):
        fnl.FrobeniusDecay(sgd, model, 0.1, decoupled="yes")
    with pytest.raises(ValueError, match=r"^model has no factorized layers and no extra FD terms were given; "
                                         r"FrobeniusDecay would do nothing$"):
        fnl.FrobeniusDecay(sgd, nn.Linear(2, 2), 0.1)
    with pytest.raises(ValueError, match=r"^state_dict must be a FrobeniusDecay\.state_dict\(\) \(keys 'optimizer' "
                                         r"and 'frobenius_decay'\); for the wrapped optimizer's own state use "
                                         r"\.optimizer\.load_state_dict$"):
        fnl.FrobeniusDecay(sgd, model, 0.1).load_state_dict([])


def test_decoupled_learning_rates_are_cached_until_the_groups_change():
    model = _model()
    layer = model[0]
    inner = torch.optim.AdamW(fnl.param_groups(model, 0.0), lr=0.1, weight_decay=0.0)
    opt = fnl.FrobeniusDecay(inner, model, 0.5)
    assert opt.decoupled is True
    assert opt._groups_per_term() is opt._groups_per_term()  # not rebuilt between steps
    # new group dicts (same number): the next step must use their learning rate
    inner.param_groups = [dict(g, lr=0.3) for g in inner.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam moves nothing: only FD moves the factors
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    opt.step()
    torch.testing.assert_close(layer.U.detach(), u - 0.3 * 0.5 * u @ (v.T @ v), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.V.detach(), v - 0.3 * 0.5 * v @ (u.T @ u), rtol=1e-5, atol=1e-7)


def test_decoupled_refusal_message():
    model = _model()
    outside = [model[0].V, model[0].bias, model[2].weight, model[2].bias]  # U is in no group
    with pytest.raises(ValueError, match=r"^decoupled Frobenius decay: a .+ tensor is not in the optimizer's "
                                         r"param_groups, so it has no learning rate; optimize it or use "
                                         r"decoupled=False$"):
        fnl.FrobeniusDecay(torch.optim.AdamW(outside, lr=0.1, weight_decay=0.0), model, 0.1)


def test_decoupled_extra_refusal_message():
    model = _model()
    with pytest.raises(ValueError, match=r"^decoupled=True applies FD through the optimizer's learning rates; extra "
                                         r"callables can only add gradients \(coupled\): pass FDTerm objects as "
                                         r"terms= instead$"):
        fnl.FrobeniusDecay(torch.optim.AdamW(model.parameters(), lr=0.1), model, 0.1, extra=[lambda c: None])


def test_optimizer_hooks_can_be_registered_and_step_hooks_run():
    model = _model()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for register in (opt.register_state_dict_pre_hook, opt.register_load_state_dict_pre_hook):
        register(lambda *a: None)
    for register in (opt.register_state_dict_post_hook, opt.register_load_state_dict_post_hook):
        register(lambda *a: None)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]
    assert [len(getattr(opt, f"_optimizer_{n}_hooks")) for n in
            ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
             "load_state_dict_post")] == [1, 1, 1, 1, 1, 1]
