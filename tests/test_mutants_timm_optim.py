"""Tests that kill the mutants of `fnl_timm/optim.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour of the timm FD optimizers (paper section 3; docs/method.md): what
``register_fd_optimizers`` puts in timm's registry, the constructors' defaults and the arguments they
pass on, how the parameter groups are split (plain weight decay never stays on a factor or an
attention-form group), the argument checks and their messages, the cached FD terms (rebuilt when the
groups change, coefficients and learning rates read at every step), decoupled FD's one learning rate
per layer, the FD flags kept by a copy, and one step against the closed form.

The closed form: every parameter gets a zero task gradient, so one step moves a parameter only by its
regulariser: ``-lr * coef * dFD/dp`` (SGD; AdamW / Adam decoupled), ``-lr * g / (|g| + eps)`` with
``g = coef * dFD/dp`` (Adam's first step, coupled), ``-lr * wd * p`` (SGD's weight decay) or nothing.
``dFD/dp`` is autograd of ``(1/2) sum ||W||_F²`` in float64 on a copy of the model (the factorized
layers' products, and with ``quekey`` / ``outval`` every head's ``W_Q^hᵀ W_K^h`` / ``W_O^h W_V^h``).
"""
import copy

import pytest
import torch

timm = pytest.importorskip('timm')
from timm.optim import _optim_factory as factory  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl_timm.optim import (FDAdam, FDAdamW, FDSGD, _split_factor_groups, mark_factors,  # noqa: E402
                            register_fd_optimizers)

pytestmark = pytest.mark.usefixtures('one_thread')

LR, WD, COEF = 0.1, 1e-2, 0.5


def _resnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('fnl_test_resnet', rank_scale=0.3, spectral=True)


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('fnl', base='vit_tiny_patch16_224', img_size=16, patch_size=8, depth=2, num_classes=3,
                             rank_scale=0.5, attention='heads')


def _factor_names(model):
    ids = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _form_names(model, outval):
    ends = ('.attn.qkv.weight', '.attn.proj.weight') if outval else ('.attn.qkv.weight',)
    return {n for n, _ in model.named_parameters() if n.endswith(ends)}


def _fd(model, coef, quekey=False, outval=False):
    """``{name: coef * dFD/dp}`` for every parameter FD reaches (zero elsewhere), float64 autograd."""
    twin = copy.deepcopy(model).double()
    total = sum(layer.matrix().pow(2).sum() for layer in fnl.factorized_layers(twin))
    from fnl_timm.models import timm_attentions
    for _, a in timm_attentions(twin):
        h, dh = a.num_heads, a.head_dim
        q, k, v = a.qkv.weight.view(3, h, dh, -1).unbind(0)
        o = a.proj.weight.T.reshape(h, dh, -1)
        if quekey:
            total = total + (q.transpose(1, 2) @ k).pow(2).sum()
        if outval:
            total = total + (o.transpose(1, 2) @ v).pow(2).sum()
    names, params = zip(*twin.named_parameters())
    grads = torch.autograd.grad(0.5 * coef * total, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g).float() for n, p, g in zip(names, params, grads)}


def _zero_grads(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def _step_from_zero_grads(model, opt):
    """Snapshot the parameters, give every one a zero task gradient, step; returns (before, after)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _zero_grads(model)
    opt.step()
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


def _check(after, expected, atol=1e-7):
    bad = [f'{n}: {(after[n] - e).abs().max():.3e}' for n, e in expected.items()
           if not torch.allclose(after[n], e, atol=atol, rtol=0)]
    assert not bad, '; '.join(bad[:6])


def _sgd_expected(before, fd, fd_names, decayed, lr=LR, wd=WD):
    """One plain SGD step (momentum 0) from a zero task gradient: FD on ``fd_names``, weight decay on
    ``decayed``; the rest does not move."""
    out = {}
    for n, p in before.items():
        g = torch.zeros_like(p)
        if n in fd_names:
            g = g + fd[n]
        if n in decayed:
            g = g + wd * p
        out[n] = p - lr * g
    return out


# --- register_fd_optimizers ------------------------------------------------------------------------
EXPECTED_INFOS = {
    'fdsgd': factory.OptimInfo(name='fdsgd', opt_class=FDSGD, has_eps=False, has_momentum=True,
                               description='SGD with Nesterov momentum, Frobenius decay on factorized layers',
                               defaults={'nesterov': True}),
    'fdmomentum': factory.OptimInfo(name='fdmomentum', opt_class=FDSGD, has_eps=False, has_momentum=True,
                                    description='SGD with classical momentum, Frobenius decay on factorized layers',
                                    defaults={'nesterov': False}),
    'fdadam': factory.OptimInfo(name='fdadam', opt_class=FDAdam, has_betas=True,
                                description='Adam, Frobenius decay on factorized layers'),
    'fdadamw': factory.OptimInfo(name='fdadamw', opt_class=FDAdamW, has_betas=True,
                                 description='AdamW, Frobenius decay on factorized layers'),
}


def test_register_fills_a_fresh_registry_exactly(monkeypatch):
    """Into an empty registry standing in for timm's default one: the four entries, every field exact
    (name, class, eps / momentum / betas flags, description, defaults); a second call changes nothing."""
    registry = factory.OptimizerRegistry()
    monkeypatch.setattr(factory, 'default_registry', registry)
    register_fd_optimizers()
    assert registry.list_optimizers() == ['fdadam', 'fdadamw', 'fdmomentum', 'fdsgd']
    for name, info in EXPECTED_INFOS.items():
        got = registry.get_optimizer_info(name)
        assert got == info, (name, got)
    assert dict(registry.list_optimizers(with_description=True)) == {
        n: i.description for n, i in EXPECTED_INFOS.items()}
    first = {n: registry.get_optimizer_info(n) for n in EXPECTED_INFOS}
    register_fd_optimizers()
    assert all(registry.get_optimizer_info(n) is first[n] for n in EXPECTED_INFOS)


def test_register_keeps_a_name_already_taken(monkeypatch):
    """A name someone registered before is left as it is; the others are added."""
    registry = factory.OptimizerRegistry()
    own = factory.OptimInfo(name='fdsgd', opt_class=torch.optim.SGD, description='mine')
    registry.register(own)
    monkeypatch.setattr(factory, 'default_registry', registry)
    register_fd_optimizers()
    assert registry.get_optimizer_info('fdsgd') is own
    assert registry.list_optimizers() == ['fdadam', 'fdadamw', 'fdmomentum', 'fdsgd']
    assert registry.get_optimizer_info('fdmomentum') == EXPECTED_INFOS['fdmomentum']


def test_registered_kinds_take_their_hyper_parameters(monkeypatch):
    """Through a fresh registry: fdsgd is Nesterov, fdmomentum classical momentum (timm's momentum
    default 0.9 reaches both, eps is dropped); fdadam / fdadamw get eps and betas."""
    registry = factory.OptimizerRegistry()
    monkeypatch.setattr(factory, 'default_registry', registry)
    register_fd_optimizers()
    model = _resnet()
    for name, cls, nesterov in (('fdsgd', FDSGD, True), ('fdmomentum', FDSGD, False)):
        opt = registry.create_optimizer(model, name, lr=LR, weight_decay=WD, eps=1e-3, betas=(0.5, 0.6))
        assert type(opt) is cls
        assert (opt.defaults['nesterov'], opt.defaults['momentum'], 'eps' in opt.defaults) == (nesterov, 0.9, False)
    for name, cls in (('fdadam', FDAdam), ('fdadamw', FDAdamW)):
        opt = registry.create_optimizer(model, name, lr=LR, weight_decay=WD, eps=1e-3, betas=(0.5, 0.6))
        assert type(opt) is cls
        assert (opt.defaults['eps'], opt.defaults['betas'], 'momentum' in opt.defaults) == (1e-3, (0.5, 0.6), False)


# --- constructors: defaults and the arguments they pass on --------------------------------------------
@pytest.mark.parametrize('cls,lr,wd,extra', [
    (FDSGD, 0.1, 0.0, dict(momentum=0.0, nesterov=False, dampening=0)),
    (FDAdamW, 1e-3, 1e-2, dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)),
    (FDAdam, 1e-3, 0.0, dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)),
])
def test_constructor_defaults(cls, lr, wd, extra):
    """The documented defaults reach the torch optimizer; FD is coupled for FDSGD, decoupled for the
    Adam family; with a default weight decay of 0 (FDSGD, FDAdam) the FD coefficient must be given."""
    model = _resnet()
    opt = cls(model.parameters(), fd_coef=COEF)
    assert opt.defaults['lr'] == lr and opt.defaults['weight_decay'] == wd
    assert {k: opt.defaults[k] for k in extra} == extra
    factors = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    fd_groups = [g for g in opt.param_groups if any(id(p) in factors for p in g['params'])]
    assert [(g['fd_coef'], g['weight_decay'], g['fd_decoupled']) for g in fd_groups] == [
        (COEF, 0.0, cls is not FDSGD)]
    if wd == 0.0:
        with pytest.raises(ValueError, match=r'FD coefficient \(default: the weight decay\) is 0'):
            cls(model.parameters())
    else:  # FDAdamW: the default weight decay is the FD coefficient
        opt = cls(model.parameters())
        assert [g['fd_coef'] for g in opt.param_groups if g['fd_coef']] == [wd]


@pytest.mark.parametrize('cls,kwargs', [
    (FDSGD, dict(momentum=0.7, nesterov=True, dampening=0.0, foreach=False)),
    (FDSGD, dict(momentum=0.7, maximize=True, fd_decoupled=True)),  # maximize: only with decoupled FD
    (FDAdamW, dict(betas=(0.5, 0.6), eps=1e-4, amsgrad=True, maximize=True)),
    (FDAdam, dict(betas=(0.5, 0.6), eps=1e-4, amsgrad=True, maximize=True)),
])
def test_constructor_passes_every_argument_on(cls, kwargs):
    """fd_coef, weight_decay, lr, the optimizer's own hyper-parameters and any extra keyword reach the
    groups / the torch optimizer."""
    model = _resnet()
    opt = cls(model.parameters(), lr=0.03, weight_decay=0.02, fd_coef=COEF, **kwargs)
    fd_decoupled = kwargs.pop('fd_decoupled', None)
    if fd_decoupled is not None:
        assert {g['fd_decoupled'] for g in opt.param_groups if g['fd_coef']} == {fd_decoupled}
    assert {k: opt.defaults[k] for k in kwargs} == kwargs
    assert (opt.defaults['lr'], opt.defaults['weight_decay']) == (0.03, 0.02)
    assert sorted({(g['fd_coef'], g['weight_decay']) for g in opt.param_groups}) == [(0.0, 0.02), (COEF, 0.0)]


@pytest.mark.parametrize('cls', [FDSGD, FDAdamW, FDAdam])
@pytest.mark.parametrize('quekey,outval', [(True, False), (False, True)])
def test_constructor_passes_the_attention_forms_on(cls, quekey, outval):
    """wd2fd_quekey and wd2fd_outval each reach the optimizer as given (not swapped, not dropped)."""
    model = _vit()
    opt = cls(model.parameters(), lr=LR, weight_decay=WD, wd2fd_quekey=quekey, wd2fd_outval=outval)
    assert (opt.wd2fd_quekey, opt.wd2fd_outval) == (quekey, outval)
    engine, _ = opt._fd_terms()
    assert sorted(t.name for t in engine.terms) == sorted(
        ['FactorizedLinear'] * 4 + ['quekey'] * (2 * quekey) + ['outval'] * (2 * outval))
    groups = {id(p): g for g in opt.param_groups for p in g['params']}
    proj = groups[id(model.blocks[0].attn.proj.weight)]
    assert (proj['weight_decay'], proj['fd_coef']) == ((0.0, WD) if outval else (WD, 0.0))


# --- argument checks -----------------------------------------------------------------------------
def test_params_must_be_an_iterable_and_not_empty():
    model = _resnet()
    with pytest.raises(TypeError, match='^params must be an iterable of tensors or of dicts, got a single tensor$'):
        FDSGD(next(model.parameters()), lr=LR, weight_decay=WD)
    for empty in ([], iter(())):
        with pytest.raises(ValueError, match='^params is empty: the optimizer got no parameters$'):
            FDSGD(empty, lr=LR, weight_decay=WD)


@pytest.mark.parametrize('bad', [float('inf'), -float('inf'), float('nan'), -1e-9])
def test_fd_coef_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match=r'^fd_coef must be a finite float >= 0, got '):
        FDSGD(_resnet().parameters(), lr=LR, weight_decay=WD, fd_coef=bad)


def test_fd_coef_with_wd2fd_false():
    """fd_coef > 0 with wd2fd=False (and no attention form) is refused with a message that says what to
    do; fd_coef=0 agrees with wd2fd=False and is accepted (the factors keep their weight decay)."""
    model = _resnet()
    with pytest.raises(ValueError, match=r'^fd_coef=0\.1 with wd2fd=False: the factors get weight decay, not '
                                         r'Frobenius decay; drop fd_coef or set wd2fd=True$'):
        FDSGD(model.parameters(), lr=LR, weight_decay=WD, fd_coef=0.1, wd2fd=False)
    opt = FDSGD(model.parameters(), lr=LR, weight_decay=WD, fd_coef=0.0, wd2fd=False)
    assert [(g['weight_decay'], g['fd_coef']) for g in opt.param_groups] == [(WD, 0.0), (WD, 0.0)]
    assert len(opt._fd_terms()[0]) == 0


def test_forms_only_with_wd2fd_false():
    """wd2fd=False with one attention form: fd_coef is the forms' coefficient, the factors keep weight
    decay. One SGD step is the closed form (FD on qkv.weight only, weight decay everywhere else)."""
    model = _vit()
    opt = FDSGD(model.parameters(), lr=LR, weight_decay=WD, fd_coef=COEF, wd2fd=False, wd2fd_quekey=True)
    before, after = _step_from_zero_grads(model, opt)
    forms = _form_names(model, outval=False)
    fd = _fd(_snapshot_model(model, before), COEF, quekey=True)
    # the factors have no FD: compare with the FD of the forms alone
    fd_forms_only = {n: g if n in forms else torch.zeros_like(g) for n, g in fd.items()}
    decayed = set(before) - forms
    _check(after, _sgd_expected(before, fd_forms_only, forms, decayed))


# --- the groups ------------------------------------------------------------------------------------
def test_plain_iterable_one_step_is_the_closed_form():
    """A generator of tensors (one implicit group with the constructor's weight decay): factors get FD
    and no weight decay, every other parameter (biases too) the weight decay."""
    model = _resnet()
    opt = FDSGD(model.parameters(), lr=LR, weight_decay=WD)
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), WD)
    _check(after, _sgd_expected(before, fd, factors, set(before) - factors))


def _snapshot_model(model, state):
    """A copy of ``model`` holding the parameters ``state`` (the values before a step)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(state[n])
    return twin


def test_a_group_holding_a_single_tensor():
    """torch accepts ``{'params': tensor}``: a factor alone in its group is still a factor (FD, no weight
    decay), and a group's own settings (lr) stay with its parameters."""
    model = _resnet()
    layer = fnl.factorized_layers(model)[0]
    names = {id(p): n for n, p in model.named_parameters()}
    rest = [p for p in model.parameters() if p is not layer.U and p is not layer.V]
    opt = FDSGD([{'params': layer.U, 'lr': 0.2}, {'params': layer.V, 'lr': 0.2}, {'params': rest}],
                lr=LR, weight_decay=WD)
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), WD)
    expected = _sgd_expected(before, fd, factors, set(before) - factors)
    for p in (layer.U, layer.V):
        n = names[id(p)]
        expected[n] = before[n] - 0.2 * fd[n]
    _check(after, expected)


def test_split_factor_groups_defaults():
    """Called with the required arguments only: coupled FD, no attention form (qkv / proj weights keep
    the weight decay)."""
    model = _vit()
    groups, wd, coef = _split_factor_groups(list(model.parameters()), WD, None, True)
    assert (wd, coef) == (WD, WD)
    factors = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    assert [(len(g['params']), g['fd_coef'], g.get('fd_decoupled'), 'weight_decay' in g) for g in groups] == [
        (sum(1 for _ in model.parameters()) - len(factors), 0.0, None, False), (len(factors), WD, False, True)]
    assert groups[1]['weight_decay'] == 0.0


@pytest.mark.parametrize('decoupled', [True, False])
def test_adamw_forms_decoupled_or_coupled_closed_form(decoupled):
    """fdadamw with both attention forms and a zero task gradient: decoupled, each FD parameter moves by
    ``-lr * coef * dFD/dp``; coupled, by Adam's first step on ``g = coef * dFD/dp``: ``-lr * g / (|g| + eps)``
    (with |g| <~ eps, about 1 / eps times larger). The factor and form groups keep the user's group
    settings (here a group lr); every other parameter moves by AdamW's decoupled weight decay alone."""
    lr, eps = 0.1, 1e-3
    model = _vit()
    groups = [{'params': [p for n, p in model.named_parameters() if n.startswith('blocks.0.')], 'lr': 2 * lr},
              {'params': [p for n, p in model.named_parameters() if not n.startswith('blocks.0.')]}]
    opt = FDAdamW(groups, lr=lr, weight_decay=WD, eps=eps, fd_coef=COEF, wd2fd_quekey=True, wd2fd_outval=True,
                  fd_decoupled=decoupled)
    assert {g['fd_decoupled'] for g in opt.param_groups if 'fd_decoupled' in g} == {decoupled}
    before, after = _step_from_zero_grads(model, opt)
    fd_names = _factor_names(model) | _form_names(model, outval=True)
    fd = _fd(_snapshot_model(model, before), COEF, quekey=True, outval=True)
    expected = {}
    for n, p in before.items():
        step = 2 * lr if n.startswith('blocks.0.') else lr
        if n not in fd_names:
            expected[n] = p * (1 - step * WD)
        elif decoupled:
            expected[n] = p - step * fd[n]
        else:
            expected[n] = p - step * fd[n] / (fd[n].abs() + eps)
    assert min(float(fd[n].abs().max()) for n in fd_names) > 1e-3  # FD moves every one of them by > 1e-4
    _check(after, expected, atol=1e-7 if decoupled else 1e-5)  # coupled: float32 Adam, steps ~lr


# --- the FD terms: cached per set of groups, rebuilt when the groups change ----------------------------
def test_terms_cached_until_the_groups_change():
    model = _resnet()
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.0, weight_decay=WD)
    engine, groups = opt._fd_terms()
    assert opt._fd_terms()[0] is engine and len(engine) == 8
    assert all(g['fd_coef'] == WD for g in groups)
    _zero_grads(model)
    opt.step()
    assert opt._fd_terms()[0] is engine
    opt.load_state_dict(opt.state_dict())  # new group dicts: the terms are rebuilt on them
    engine2, groups2 = opt._fd_terms()
    assert engine2 is not engine and all(any(g is h for h in opt.param_groups) for g in groups2)


def test_loaded_state_sets_the_fd_coefficient_after_steps():
    """load_state_dict after the optimizer has stepped: the next step uses the loaded groups' FD
    coefficient, not the one the terms were first built with."""
    model = _resnet()
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.0, weight_decay=WD, fd_coef=0.3)
    _step_from_zero_grads(model, opt)
    state = copy.deepcopy(opt.state_dict())
    for g in state['param_groups']:
        if g['fd_coef']:
            g['fd_coef'] = COEF
    opt.load_state_dict(state)
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), COEF)
    decayed = {n for n, p in before.items() if p.ndim > 1} - factors
    _check(after, _sgd_expected(before, fd, factors, decayed))


def test_fd_coefficient_changed_between_steps():
    """A group's fd_coef is read at every step, like its lr (a schedule): from --no-frob (0) to COEF,
    and the decoupled FD of the Adam family uses the group's current lr."""
    model = _resnet()
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.0, weight_decay=WD, fd_coef=0.0)
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    assert all(torch.equal(after[n], before[n]) for n in factors)
    for g in opt.param_groups:
        if 'fd_decoupled' in g:
            g['fd_coef'] = COEF
    before, after = _step_from_zero_grads(model, opt)
    fd = _fd(_snapshot_model(model, before), COEF)
    decayed = {n for n, p in before.items() if p.ndim > 1} - factors
    _check(after, _sgd_expected(before, fd, factors, decayed))

    model = _resnet()
    opt = create_optimizer_v2(model, 'fdadamw', lr=1e-3, weight_decay=WD)
    _step_from_zero_grads(model, opt)
    for g in opt.param_groups:
        g['lr'] = 0.05
    before, after = _step_from_zero_grads(model, opt)
    fd = _fd(_snapshot_model(model, before), WD)
    _check({n: after[n] for n in factors}, {n: before[n] - 0.05 * fd[n] for n in factors})


def test_added_group_gets_fd():
    """add_param_group with a new factorized layer (bias included) and an fd_coef, on an optimizer with
    the attention forms: the new layer's factors get coupled FD (no fd_decoupled in the group), its bias
    nothing; the model's own FD is unchanged."""
    model = _vit()
    opt = FDSGD(model.parameters(), lr=LR, weight_decay=WD, wd2fd_quekey=True)
    opt.step()  # no gradients yet: nothing moves, the terms are cached
    torch.manual_seed(3)
    extra = fnl.FactorizedLinear(6, 5, rank=2, bias=True)
    mark_factors(extra)
    opt.add_param_group({'params': list(extra.parameters()), 'fd_coef': COEF, 'weight_decay': 0.0})
    u, v, b = extra.U.detach().clone(), extra.V.detach().clone(), extra.bias.detach().clone()
    fd = _fd(extra, COEF)
    for p in extra.parameters():
        p.grad = torch.zeros_like(p)
    before, after = _step_from_zero_grads(model, opt)
    assert torch.allclose(extra.U, u - LR * fd['U'], atol=1e-7, rtol=0)
    assert torch.allclose(extra.V, v - LR * fd['V'], atol=1e-7, rtol=0)
    assert torch.equal(extra.bias, b)
    forms = _form_names(model, outval=False)
    fd_names = _factor_names(model) | forms
    fd = _fd(_snapshot_model(model, before), WD, quekey=True)
    _check(after, _sgd_expected(before, fd, fd_names, set(before) - fd_names))


# --- more argument checks, exact messages ---------------------------------------------------------------
NO_FACTOR = ('Frobenius-decay optimizer with wd2fd=True: no registered factor among the parameters, so Frobenius '
             'decay would do nothing. Factorize the model (an fnl_* model with rank_scale > 0) or call '
             'fnl_timm.mark_factors(model) before creating the optimizer; for a dense model use a stock optimizer '
             '(sgd, momentum, adamw) or wd2fd=False')
NO_COEF = ("Frobenius-decay optimizer: the FD coefficient (default: the weight decay) is 0, so Frobenius decay would "
           "do nothing. Give weight_decay > 0 (or fd_coef > 0); for factors without any regulariser (the paper's "
           "--no-frob) pass fd_coef=0.0 explicitly")
NO_ATTENTION = (": no registered timm attention among the parameters, so Frobenius decay on the attention forms "
                "would do nothing; use a ViT-style model built by fnl (timm.create_model('fnl', base=..., "
                "attention='heads'), which calls fnl_timm.models.mark_attention) or drop the flag")


def _message(fn, error=ValueError):
    with pytest.raises(error) as info:
        fn()
    return str(info.value)


def test_regularisers_that_would_do_nothing_exact_messages():
    dense = timm.create_model('fnl_test_resnet')
    assert _message(lambda: FDSGD(dense.parameters(), lr=LR, weight_decay=WD)) == NO_FACTOR
    model = _resnet()
    for cls in (FDSGD, FDAdam, FDAdamW):
        assert _message(lambda: cls(model.parameters(), lr=LR, weight_decay=0.0)) == NO_COEF
    for flags, asked in ((dict(wd2fd_quekey=True), 'wd2fd_quekey'), (dict(wd2fd_outval=True), 'wd2fd_outval'),
                         (dict(wd2fd_quekey=True, wd2fd_outval=True), 'wd2fd_quekey and wd2fd_outval')):
        assert _message(lambda: FDSGD(model.parameters(), lr=LR, weight_decay=WD, **flags)) == asked + NO_ATTENTION


@pytest.mark.parametrize('kwargs,message', [
    (dict(lr=-0.1), 'lr must be a float >= 0, got -0.1'),
    (dict(lr='0.1'), "lr must be a float >= 0, got '0.1'"),
    (dict(lr=None), 'lr must be a float >= 0, got None'),
    (dict(weight_decay=-1.0), 'weight_decay must be a float >= 0, got -1.0'),
    (dict(weight_decay='0.1'), "weight_decay must be a float >= 0, got '0.1'"),
    (dict(weight_decay=None), 'weight_decay must be a float >= 0, got None'),
])
def test_lr_and_weight_decay_checks(kwargs, message):
    args = dict(lr=LR, weight_decay=WD)
    args.update(kwargs)
    assert _message(lambda: FDSGD(_resnet().parameters(), **args)) == message


def test_lr_zero_and_tensor_lr_are_accepted():
    """lr = 0 (a warm-up's first value) is a valid learning rate; a tensor lr (what torch accepts for
    fused / capturable steps) gives the step of the same float lr."""
    model = _resnet()
    before, after = _step_from_zero_grads(model, FDSGD(model.parameters(), lr=0.0, weight_decay=WD))
    assert all(torch.equal(after[n], before[n]) for n in before)
    models = [_resnet(), _resnet()]
    opts = [FDAdamW(models[0].parameters(), lr=torch.tensor(0.05), weight_decay=WD, foreach=False),
            FDAdamW(models[1].parameters(), lr=0.05, weight_decay=WD, foreach=False)]
    (before, after), (_, after_float) = [_step_from_zero_grads(m, o) for m, o in zip(models, opts)]
    assert any(not torch.equal(after[n], before[n]) for n in _factor_names(models[0]))
    _check(after, after_float, atol=0.0)


@pytest.mark.parametrize('name,value', [('fd_decoupled', 1), ('wd2fd_quekey', 'yes'), ('wd2fd_outval', None)])
def test_flags_must_be_bools(name, value):
    assert _message(lambda: FDSGD(_resnet().parameters(), lr=LR, weight_decay=WD, **{name: value}),
                    TypeError) == f'{name} must be True or False, got {value!r}'


def test_wd2fd_attribute():
    model = _resnet()
    assert FDSGD(model.parameters(), lr=LR, weight_decay=WD).wd2fd is True
    assert FDSGD(model.parameters(), lr=LR, weight_decay=WD, wd2fd=False).wd2fd is False
    assert FDAdamW(model.parameters(), lr=LR, weight_decay=WD, wd2fd=0).wd2fd is False


@pytest.mark.parametrize('factor_wd', [WD, 0.0, WD / 2])
def test_wd2fd_false_factors_keep_their_group_and_its_weight_decay(factor_wd):
    """The baseline (wd2fd=False): the factors keep their group's settings, its weight decay included, as a
    stock optimizer given the same groups does (timm's factory passes weight_decay=0 to the constructor and
    the decay in the groups); no FD. One SGD step is the closed form."""
    model = _resnet()
    factors = _factor_names(model)
    params = dict(model.named_parameters())
    opt = FDSGD([{'params': [params[n] for n in sorted(factors)], 'weight_decay': factor_wd, 'lr': 0.2},
                 {'params': [p for n, p in params.items() if n not in factors], 'weight_decay': WD}],
                lr=LR, weight_decay=0.0, wd2fd=False)
    assert [(len(g['params']), g['weight_decay'], g['fd_coef'], g['lr']) for g in opt.param_groups] == [
        (len(factors), factor_wd, 0.0, 0.2), (len(params) - len(factors), WD, 0.0, LR)]
    before, after = _step_from_zero_grads(model, opt)
    expected = {n: p * (1 - (0.2 * factor_wd if n in factors else LR * WD)) for n, p in before.items()}
    _check(after, expected)


def test_mixin_defaults_have_no_attention_form():
    """An optimizer built on the mixin with the required arguments only: no attention form, so a ViT's
    qkv / proj weights keep the weight decay and only the factors get FD."""
    from fnl_timm.optim import _FrobeniusDecayMixin

    class Mine(_FrobeniusDecayMixin, torch.optim.SGD):
        def __init__(self, params):
            self._init_fd(params, LR, WD, None, True, False)

    model = _vit()
    opt = Mine(model.parameters())
    assert (opt.wd2fd, opt.wd2fd_quekey, opt.wd2fd_outval) == (True, False, False)
    assert sorted(t.name for t in opt._fd_terms()[0].terms) == ['FactorizedLinear'] * 4
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), WD)
    _check(after, _sgd_expected(before, fd, factors, set(before) - factors))


# --- one FD term, one learning rate ------------------------------------------------------------------------
def _split_layer_groups(model, lr_u, lr_v):
    layer = fnl.factorized_layers(model)[0]
    rest = [p for p in model.parameters() if p is not layer.U and p is not layer.V]
    return layer, [{'params': [layer.U], 'lr': lr_u}, {'params': [layer.V], 'lr': lr_v}, {'params': rest}]


def test_decoupled_fd_refuses_a_layer_split_over_two_learning_rates():
    """Decoupled FD moves a layer's factors by one learning rate (one term): U and V in groups with
    different lr are refused (before, V silently moved by U's lr); coupled FD, or fd_coef=0, accepts them,
    and each factor then steps with its own group's lr."""
    model = _resnet()
    layer, groups = _split_layer_groups(model, 0.1, 0.01)
    message = _message(lambda: FDAdamW(groups, lr=0.01, weight_decay=WD))
    assert message == ('decoupled Frobenius decay moves all the weights of one FactorizedConv2d by one learning '
                       'rate, but they are in parameter groups with lr 0.1 and 0.01: put them in groups with one '
                       'lr, or pass fd_decoupled=False')
    FDAdamW(groups, lr=0.01, weight_decay=WD, fd_coef=0.0)  # --no-frob: nothing to move
    opt = FDSGD(groups, lr=0.01, weight_decay=WD)  # coupled: each factor steps with its own lr
    names = {id(p): n for n, p in model.named_parameters()}
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), WD)
    expected = _sgd_expected(before, fd, factors, set(before) - factors, lr=0.01)
    for p, lr in ((layer.U, 0.1), (layer.V, 0.01)):
        expected[names[id(p)]] = before[names[id(p)]] - lr * fd[names[id(p)]]
    _check(after, expected)


def test_decoupled_fd_with_a_layer_split_over_groups_of_one_lr():
    """The same split with one lr in both groups: accepted, every FD weight moves by -lr * dFD/dp."""
    model = _resnet()
    _, groups = _split_layer_groups(model, 0.05, 0.05)
    opt = FDAdamW(groups, lr=0.05, weight_decay=WD)
    before, after = _step_from_zero_grads(model, opt)
    factors = _factor_names(model)
    fd = _fd(_snapshot_model(model, before), WD)
    _check(after, {n: p - 0.05 * fd[n] if n in factors else p * (1 - 0.05 * WD) for n, p in before.items()})


def test_decoupled_fd_refuses_an_attention_split_over_two_learning_rates():
    model = _vit()
    attn = model.blocks[0].attn
    rest = [p for p in model.parameters() if p is not attn.proj.weight]
    groups = [{'params': rest}, {'params': [attn.proj.weight], 'lr': 0.5}]
    assert _message(lambda: FDAdamW(groups, lr=0.1, weight_decay=WD, wd2fd_outval=True)).startswith(
        'decoupled Frobenius decay moves all the weights of one Attention by one learning rate, but they are in '
        'parameter groups with lr 0.1 and 0.5')
    FDAdamW(groups, lr=0.1, weight_decay=WD, wd2fd_quekey=True)  # quekey alone: proj is no FD weight
    FDAdamW(groups, lr=0.1, weight_decay=WD, wd2fd_outval=True, fd_decoupled=False)


# --- copies ------------------------------------------------------------------------------------------------
def test_a_deep_copy_keeps_the_fd_flags():
    """copy.deepcopy of a model with its optimizer (the copy's layers registered again) keeps wd2fd and the
    attention forms: the copy steps exactly like the original (torch's optimizer state alone would drop
    them: the forms' FD was silently lost). A pickled optimizer keeps them too."""
    import pickle
    from fnl_timm.models import mark_attention
    model = _vit()
    opt = FDSGD(model.parameters(), lr=LR, weight_decay=WD, wd2fd_quekey=True, wd2fd_outval=True)
    copied = copy.deepcopy({'model': model, 'opt': opt})
    model2, opt2 = copied['model'], copied['opt']
    mark_factors(model2)
    assert mark_attention(model2) == 2
    assert (opt2.wd2fd, opt2.wd2fd_quekey, opt2.wd2fd_outval) == (True, True, True)
    assert sorted(t.name for t in opt2._fd_terms()[0].terms) == ['FactorizedLinear'] * 4 + ['outval'] * 2 + [
        'quekey'] * 2
    _, after = _step_from_zero_grads(model, opt)
    _, after2 = _step_from_zero_grads(model2, opt2)
    _check(after2, after, atol=0.0)
    loaded = pickle.loads(pickle.dumps(FDAdamW(_resnet().parameters(), lr=LR, weight_decay=WD, wd2fd=False)))
    assert (loaded.wd2fd, loaded.wd2fd_quekey, loaded.wd2fd_outval) == (False, False, False)
