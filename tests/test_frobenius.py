"""Frobenius decay: closed-form gradients, the optimizer wrapper, parameter groups (docs/method.md#frobenius-decay)."""
import copy

import pytest
import torch
from torch import nn

import fnl
from fnl.base import gram_frobenius_sq


def _layer(kind, square, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "linear":
        return fnl.FactorizedLinear(7, 5, rank=3, square=square, dtype=dtype)
    if kind == "conv":
        return fnl.FactorizedConv2d(3, 4, (3, 2), rank=5, square=square, dtype=dtype)
    return fnl.FactorizedEmbedding(9, 4, rank=3, square=square, dtype=dtype)


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
@pytest.mark.parametrize("square", [False, True])
def test_gram_norm_equals_direct(kind, square):
    layer = _layer(kind, square)
    if square:
        with torch.no_grad():
            layer.S.add_(0.3 * torch.randn_like(layer.S))
    direct = layer.matrix().pow(2).sum()
    assert torch.isclose(layer.frobenius_norm_sq(), direct, rtol=1e-12), f"{layer.frobenius_norm_sq()} vs {direct}"
    assert torch.isclose(fnl.frobenius_norm(layer), direct.sqrt(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("square", [False, True])
def test_fd_grad_equals_autograd(kind, square):
    layer = _layer(kind, square)
    if square:
        with torch.no_grad():
            layer.S.add_(0.3 * torch.randn_like(layer.S))
    coef = 0.37
    penalty = 0.5 * coef * layer.matrix().pow(2).sum()  # the definition, W formed
    expected = torch.autograd.grad(penalty, layer.factor_parameters())
    layer.zero_grad()
    layer.add_frobenius_grad_(coef)
    for p, g in zip(layer.factor_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12), f"max abs diff {(p.grad - g).abs().max():.3e}"


@pytest.mark.parametrize("square", [False, True])
def test_fd_grad_matches_numerical_gradient(square):
    """float64 gradcheck of the Gram-matrix penalty, then the closed-form FD gradient against it."""
    layer = fnl.FactorizedLinear(5, 6, rank=3, square=square, dtype=torch.float64)
    names = [n for n in ("U", "S", "V") if getattr(layer, n) is not None]

    def penalty(*factors):
        params = dict(zip(names, factors))
        return gram_frobenius_sq(params["U"], params["V"], params.get("S"))

    factors = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(penalty, factors)
    numeric = torch.autograd.functional.jacobian(penalty, factors)
    layer.add_frobenius_grad_(2.0)  # gradient of (2/2) ||W||^2
    for n, g in zip(names, numeric):
        assert torch.allclose(getattr(layer, n).grad, g, rtol=1e-10), n


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        fnl.FactorizedConv2d(4, 6, 3, padding=1, rank=3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        fnl.FactorizedLinear(24, 5, rank=2, square=True), nn.Linear(5, 3),
    ).double()


def test_fd_sgd_momentum_equals_sgd_on_penalised_loss():
    model_a = _tiny_model()
    model_b = copy.deepcopy(model_a)
    lam, wd = 1e-2, 5e-3
    opt_a = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model_a, wd), lr=0.1, momentum=0.9), model_a, lam)
    opt_b = torch.optim.SGD(fnl.param_groups(model_b, wd), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    data = [(torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(4)]
    for x, y in data:
        opt_a.zero_grad()
        nn.functional.cross_entropy(model_a(x), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        loss = nn.functional.cross_entropy(model_b(x), y) + fnl.frobenius_penalty(model_b, lam)
        loss.backward()
        opt_b.step()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"{name}: {(a - b).abs().max():.3e}"


def test_param_groups_split():
    model = _tiny_model()
    factors = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    assert len(factors) == 2 + 3  # conv U, V; linear U, S, V
    groups = fnl.param_groups(model, 1e-4)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_wd[0.0] == factors
    others = {id(p) for p in model.parameters()} - factors
    assert by_wd[1e-4] == others  # stem, BN, biases, classifier keep plain weight decay
    groups = fnl.param_groups(model, 1e-4, wd2fd=False)
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}
    groups = fnl.param_groups(model, 1e-4, no_weight_decay_1d=True)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0 and not g.get("factors")][0]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.ndim == 1}
    assert fnl.factor_parameter_names(model) == {"3.U", "3.V", "7.U", "7.S", "7.V"}
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        fnl.param_groups(model, -1.0)


def test_frobenius_decay_state_dict_roundtrip():
    model = _tiny_model()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-4), lr=0.1, momentum=0.9), model, 0.01)
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model2, 1e-4), lr=0.5, momentum=0.9), model2, 0.5)
    opt2.load_state_dict(state)
    assert opt2.coef == 0.01 and opt2.param_groups[0]["lr"] == 0.1
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    bufs2 = [opt2.state[p]["momentum_buffer"] for p in model2.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs2))
    with pytest.raises(ValueError, match="FrobeniusDecay.state_dict"):
        opt2.load_state_dict(opt.optimizer.state_dict())


def test_frobenius_decay_with_scheduler_and_grad_scaler():
    model = _tiny_model().float()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-4), lr=0.1, momentum=0.9), model, 0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref = copy.deepcopy(model)
    ref_opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(ref, 1e-4), lr=0.1, momentum=0.9), ref, 0.01)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)  # unscales, then FD is added to the unscaled gradients
    scaler.update()
    sched.step()
    nn.functional.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), f"{(a - b).abs().max():.3e}"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_frobenius_decay_closure():
    model = _tiny_model()
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    opt = fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.1)
    ref = copy.deepcopy(model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    ref_loss = nn.functional.cross_entropy(ref(x), y) + fnl.frobenius_penalty(ref, 0.1)
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.sub_(0.1 * p.grad)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-12)


def test_frobenius_decay_bad_input():
    model = _tiny_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fnl.FrobeniusDecay(object(), model, 0.1)
    with pytest.raises(ValueError, match="coef must be a float >= 0"):
        fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, -1)
    with pytest.raises(ValueError, match="no factorized layers"):
        fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), nn.Linear(2, 2), 0.1)


def _within_half_ulp_bf16(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Max of |got - exact| in units of half a bf16 ulp of ``exact``: <= 1 when ``got`` is ``exact`` rounded
    once to bf16 (8 significant bits)."""
    _, exp = torch.frexp(exact)
    half_ulp = torch.ldexp(torch.ones_like(exact), exp - 9)  # exact in [2^(e-1), 2^e): ulp 2^(e-8)
    return ((got.double() - exact).abs() / half_ulp).max()


@pytest.mark.parametrize("path", ["layer", "engine"])
def test_fd_computed_in_float32_for_bf16_factors(path):
    """bf16 factors: the FD gradient is computed in float32 and rounded once to bf16, so every entry is
    within half a bf16 ulp (plus float32 rounding) of the float64 value; computing it in bf16 (Grams and
    products rounded) misses that by several ulps."""
    torch.manual_seed(2)
    layer = fnl.FactorizedLinear(64, 64, rank=16, dtype=torch.bfloat16)
    for p in layer.factor_parameters():
        p.grad = torch.zeros_like(p)
    if path == "layer":
        layer.add_frobenius_grad_(0.1)
    else:
        fnl.FDEngine([fnl.layer_term(layer)]).apply_(0.1)
    u, v = layer.U.detach().double(), layer.V.detach().double()
    for got, exact in ((layer.U.grad, 0.1 * u @ (v.T @ v)), (layer.V.grad, 0.1 * v @ (u.T @ u))):
        assert got.dtype == torch.bfloat16
        err = _within_half_ulp_bf16(got, exact)
        assert err <= 1.01, f"{err:.3f} half-ulps"
    assert layer.frobenius_norm_sq().dtype == torch.float32


def test_fd_gradient_carries_no_autograd_graph():
    """With autograd on (a training loop's step), the FD gradient written to .grad is a plain tensor: no
    graph back to the factors (it would keep every step's graph alive and make .grad differentiable)."""
    torch.manual_seed(0)
    layers = [fnl.FactorizedLinear(6, 5, rank=2), fnl.FactorizedLinear(6, 5, rank=2, square=True),
              fnl.FactorizedConv2d(3, 4, 3, rank=2)]
    model = nn.ModuleList(layers)
    with torch.enable_grad():
        layers[0].add_frobenius_grad_(0.1)
        fnl.add_factor_fd_grad_(layers[1].U, layers[1].V, 0.1, layers[1].S)
        for layer in layers[:2]:
            for p in layer.factor_parameters():
                assert p.grad.grad_fn is None and not p.grad.requires_grad
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        fnl.FrobeniusDecay(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.1).step()
        fnl.add_quekey_fd_grad_(layers[0].U, layers[1].U, 1, 0.1)
    for layer in layers:
        for p in layer.factor_parameters():
            assert p.grad.grad_fn is None and not p.grad.requires_grad


def _mixed_model() -> nn.Module:
    """Same-shaped layers (grouped), a square one, a conv, and a TT conv (its own FD gradient)."""
    torch.manual_seed(3)
    return nn.ModuleList([fnl.FactorizedLinear(8, 6, rank=3), fnl.FactorizedLinear(8, 6, rank=3),
                          fnl.FactorizedLinear(8, 6, rank=3), fnl.FactorizedLinear(6, 6, rank=2, square=True),
                          fnl.FactorizedLinear(6, 6, rank=2, square=True), fnl.FactorizedConv2d(3, 4, 3, rank=4),
                          fnl.TTConv2d(8, 8, 1, rank_scale=0.5)]).double()


@pytest.mark.parametrize("grad_scale", [None, 64.0])
def test_engine_grouped_equals_autograd_of_the_penalty(grad_scale):
    """The grouped engine (same-shaped factors batched) adds exactly ``coef * d/dp (1/2)||W||²`` per
    layer, times the loss scale still in the gradients; a layer without gradients is left alone."""
    model = _mixed_model()
    with torch.no_grad():
        model[3].S.add_(0.3 * torch.randn_like(model[3].S))
    coefs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    engine = fnl.FDEngine([fnl.layer_term(layer) for layer in model])
    assert len(engine._groups) == 3 and len(engine._layer_terms) == 1  # 3 linears, 2 square, 1 conv; TT alone
    base = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = None if n.startswith("1.") else base[n].clone()
    engine.apply_(coefs, grad_scale=None if grad_scale is None else torch.tensor(grad_scale))
    twin = copy.deepcopy(model)
    total = sum(0.5 * c * layer.matrix().pow(2).sum() for c, layer in zip(coefs, twin))
    names = [n for n, _ in twin.named_parameters()]
    exact = dict(zip(names, torch.autograd.grad(total, list(twin.parameters()), allow_unused=True)))
    for n, p in model.named_parameters():
        if n.startswith("1."):
            assert p.grad is None
            continue
        fd = torch.zeros_like(p) if exact[n] is None else exact[n]
        expect = base[n] + fd * (1.0 if grad_scale is None else grad_scale)
        assert torch.allclose(p.grad, expect, atol=1e-12, rtol=1e-10), f"{n}: {(p.grad - expect).abs().max()}"


def test_engine_attention_forms_on_fused_slices():
    """Query-key / output-value terms on slices of one fused (3*heads*d_h, d) weight: the FD gradient of
    ``sum_h (coef/2)||W_Q^hᵀ W_K^h||² + ||W_O^h W_V^h||²`` lands in the fused gradient, no copies."""
    torch.manual_seed(4)
    heads, dh, d = 3, 2, 5
    w = heads * dh
    qkv = torch.randn(3 * w, d, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(d, w, dtype=torch.float64, requires_grad=True)
    qkv.grad, proj.grad = torch.zeros_like(qkv), torch.zeros_like(proj)
    fused_grad = qkv.grad
    terms = [fnl.form_term("quekey", qkv, qkv, heads, slice(0, w), slice(w, 2 * w)),
             fnl.form_term("outval", proj, qkv, heads, right_rows=slice(2 * w, 3 * w))]
    fnl.FDEngine(terms).apply_(0.3)
    q, k, v = qkv.view(3, heads, dh, d).unbind(0)
    o = proj.T.reshape(heads, dh, d)
    penalty = 0.15 * ((q.transpose(1, 2) @ k).pow(2).sum() + (o.transpose(1, 2) @ v).pow(2).sum())
    gq, gp = torch.autograd.grad(penalty, [qkv, proj])
    assert qkv.grad is fused_grad
    assert torch.allclose(qkv.grad, gq, atol=1e-12), f"{(qkv.grad - gq).abs().max()}"
    assert torch.allclose(proj.grad, gp, atol=1e-12), f"{(proj.grad - gp).abs().max()}"
    with pytest.raises(ValueError, match="heads=4 must divide"):
        fnl.form_term("quekey", qkv, qkv, 4, slice(0, w), slice(w, 2 * w))
    with pytest.raises(ValueError, match="kind must be"):
        fnl.form_term("keyval", qkv, qkv, heads)


def test_decoupled_step_and_found_inf():
    """Decoupled: the parameters move by ``-lr * coef * dFD/dp`` (gradients untouched); a set inf flag
    (GradScaler with a fused optimizer) skips that move, as the fused kernel skips its update."""
    layer = fnl.FactorizedLinear(6, 5, rank=2, dtype=torch.float64)
    for p in layer.factor_parameters():
        p.grad = torch.ones_like(p)
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    engine = fnl.FDEngine([fnl.layer_term(layer)])
    engine.apply_(0.3, lr=[0.5], found_inf=torch.tensor([1.0]))
    assert torch.equal(layer.U, u) and torch.equal(layer.V, v)
    engine.apply_(0.3, lr=[0.5], found_inf=torch.tensor([0.0]))
    assert torch.allclose(layer.U, u - 0.15 * u @ (v.T @ v), atol=1e-14)
    assert torch.allclose(layer.V, v - 0.15 * v @ (u.T @ u), atol=1e-14)
    assert torch.equal(layer.U.grad, torch.ones_like(u))


def test_frobenius_decay_default_coupling_and_refusals():
    model = _tiny_model()
    params = fnl.param_groups(model, 1e-3)
    assert fnl.FrobeniusDecay(torch.optim.AdamW(params, lr=0.1), model, 0.1).decoupled is True
    assert fnl.FrobeniusDecay(torch.optim.Adam(params, lr=0.1), model, 0.1).decoupled is True
    assert fnl.FrobeniusDecay(torch.optim.SGD(params, lr=0.1), model, 0.1).decoupled is False
    assert fnl.FrobeniusDecay(torch.optim.AdamW(params, lr=0.1), model, 0.1, decoupled=False).decoupled is False
    outside = [p for n, p in model.named_parameters() if not n.endswith(".U")]
    with pytest.raises(ValueError, match="not in the optimizer's param_groups"):
        fnl.FrobeniusDecay(torch.optim.AdamW(outside, lr=0.1, weight_decay=0.0), model, 0.1)
    with pytest.raises(ValueError, match="extra callables can only add gradients"):
        fnl.FrobeniusDecay(torch.optim.AdamW(params, lr=0.1), model, 0.1, extra=[lambda c: None])
    with pytest.raises(TypeError, match="decoupled must be"):
        fnl.FrobeniusDecay(torch.optim.SGD(params, lr=0.1), model, 0.1, decoupled="yes")


@pytest.mark.slow
@pytest.mark.parametrize("decoupled", [False, True])
def test_frobenius_decay_under_torch_compile(decoupled):
    """``torch.compile`` of a step that calls ``FrobeniusDecay.step`` gives the eager step, also after the
    learning rate changes between steps (decoupled FD reads it on the host: the compiled step must follow)."""
    model = _tiny_model()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    opts = [fnl.FrobeniusDecay(torch.optim.AdamW(fnl.param_groups(m, 1e-3), lr=0.01), m, 0.3, decoupled=decoupled)
            for m in (model, ref)]
    compiled = torch.compile(opts[0].step, backend="aot_eager")
    for m, step, opt in ((model, compiled, opts[0]), (ref, opts[1].step, opts[1])):
        for lr in (0.01, 0.003):
            for group in opt.param_groups:
                group["lr"] = lr
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()
    # the compiled AdamW computes its bias corrections differently: agreement to 1e-6, while FD moves the
    # factors by about 1e-3 here
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), f"{n}: {(a - b).abs().max()}"


def test_frobenius_decay_deepcopy_steps_the_copy():
    """copy.deepcopy copies the wrapped optimizer (state included) and the layers together: stepping the
    copy moves the copied model exactly as stepping the original moves the original."""
    model = _tiny_model()
    opt = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 1e-3), lr=0.1, momentum=0.9), model, 0.05)
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.coef == 0.05 and len(opt2.layers) == 2
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in model2.parameters()}
    assert {id(p) for layer in opt2.layers for p in layer.factor_parameters()} <= {id(p) for p in model2.parameters()}
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())
