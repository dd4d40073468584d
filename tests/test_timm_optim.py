"""Frobenius-decay optimizers in timm's registry (docs/method.md#frobenius-decay)."""
import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip('timm')
from timm.optim import create_optimizer_v2, list_optimizers  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl_timm.optim import FDSGD, factor_owner, mark_factors  # noqa: E402

LR, WD = 0.1, 1e-2


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model('fnl_test_resnet', rank_scale=0.3, spectral=True, **kwargs)


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def _factor_ids(model):
    return {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}


def test_registered():
    assert {'fdsgd', 'fdmomentum', 'fdadam', 'fdadamw'} <= set(list_optimizers())


def test_groups_follow_wd2fd():
    model = _model()
    opt = create_optimizer_v2(model, 'fdsgd', lr=LR, momentum=0.9, weight_decay=WD)
    assert isinstance(opt, FDSGD) and opt.defaults['nesterov'] is True
    factors = _factor_ids(model)
    seen = set()
    for g in opt.param_groups:
        for p in g['params']:
            seen.add(id(p))
            if id(p) in factors:
                assert g['weight_decay'] == 0.0 and g['fd_coef'] == WD
            else:
                assert g['fd_coef'] == 0.0
                assert g['weight_decay'] == (0.0 if p.ndim <= 1 else WD)
    assert seen == {id(p) for p in model.parameters()}
    assert create_optimizer_v2(model, 'fdmomentum', lr=LR, weight_decay=WD).defaults['nesterov'] is False


def _manual_sgd_step(model, coef, wd_factors):
    """One plain SGD step by hand: grad + coupled wd on >1-d non-factors (+ factors when wd_factors)
    + the closed-form FD gradient coef * (U VᵀV, V UᵀU)."""
    model.zero_grad()
    _loss(model).backward()
    factors = _factor_ids(model)
    fd = {}
    for layer in fnl.factorized_layers(model):
        u, v = layer.U.detach(), layer.V.detach()
        fd[id(layer.U)] = coef * u @ (v.T @ v)
        fd[id(layer.V)] = coef * v @ (u.T @ u)
    with torch.no_grad():
        for p in model.parameters():
            g = p.grad.clone()
            if id(p) in factors:
                g += fd[id(p)] if coef else 0
                if wd_factors:
                    g += WD * p
            elif p.ndim > 1:
                g += WD * p
            p -= LR * g


@pytest.mark.parametrize('kwargs,coef,wd_factors', [
    (dict(), WD, False),                       # --wd2fd
    (dict(fd_coef=0.0), 0.0, False),           # --wd2fd --no-frob
    (dict(wd2fd=False), 0.0, True),            # the baseline: weight decay on the factors
    (dict(fd_coef=0.5), 0.5, False),
])
def test_one_step_matches_closed_form(kwargs, coef, wd_factors):
    model = _model()
    ref = copy.deepcopy(model)
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.0, weight_decay=WD, **kwargs)
    opt.zero_grad()
    _loss(model).backward()
    opt.step()
    _manual_sgd_step(ref, coef, wd_factors)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), f'{n}: {(a - b).abs().max()}'


def test_fd_gradient_equals_autograd_of_penalty():
    """The FD term added by the optimizer is the gradient of (coef/2) sum ||U Vᵀ||²."""
    model = _model()
    opt = create_optimizer_v2(model, 'fdsgd', lr=LR, weight_decay=WD)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.add_frobenius_grads_()
    added = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fnl.frobenius_penalty(model, WD).backward()
    for n, p in model.named_parameters():
        expect = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(added[n], expect, atol=1e-7), f'{n}: {(added[n] - expect).abs().max()}'


def test_closure_and_momentum_state_roundtrip():
    model = _model()
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.9, weight_decay=WD)
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: _loss(model).backward())
    state = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    mark_factors(model2)  # a deepcopy has new parameters: register them
    opt2 = create_optimizer_v2(model2, 'fdmomentum', lr=LR, momentum=0.9, weight_decay=WD, fd_coef=0.3)
    opt2.load_state_dict(state)
    assert [g['fd_coef'] for g in opt2.param_groups] == [g['fd_coef'] for g in opt.param_groups]
    for o in (opt, opt2):
        m = model if o is opt else model2
        o.zero_grad()
        _loss(m, seed=5).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def _fd_closed_form(model, coef):
    """{id(factor): coef * (U VᵀV, V UᵀU)}: the FD gradient in closed form."""
    fd = {}
    for layer in fnl.factorized_layers(model):
        u, v = layer.U.detach(), layer.V.detach()
        fd[id(layer.U)] = coef * u @ (v.T @ v)
        fd[id(layer.V)] = coef * v @ (u.T @ u)
    return fd


def test_grad_scaler_and_clipping():
    """Under timm's NativeScaler the FD gradient is added after unscaling and clipping: one plain SGD
    step by hand with the clipped task gradient, the closed-form FD and weight decay on >1-d non-factors."""
    from timm.utils import NativeScaler
    model = _model()
    ref = copy.deepcopy(model)
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, momentum=0.0, weight_decay=WD)
    scaler = NativeScaler(device='cpu')
    scaler._scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 12)
    scaler(_loss(model), opt, clip_grad=0.5, parameters=model.parameters())
    _loss(ref).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm > 1.0, 'the task gradient must be long enough for clipping to act'
    fd = _fd_closed_form(ref, WD)
    factors = _factor_ids(ref)
    with torch.no_grad():
        for p in ref.parameters():
            g = p.grad + (fd[id(p)] if id(p) in factors else (WD * p if p.ndim > 1 else 0))
            p -= LR * g
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), f'{n}: {(a - b).abs().max()}'
    # the FD term is large enough here for a missing or unscaled one to show
    assert min(float(LR * fd[i].abs().max()) for i in factors) > 1e-4


@pytest.mark.parametrize('name', ['fdadam', 'fdadamw'])
@pytest.mark.parametrize('decoupled', [True, False])
def test_adam_family_fd_decoupled_by_default_or_coupled(name, decoupled):
    """fdadam / fdadamw: FD decoupled by default (each factor moves by -lr * dFD/dp at its pre-step value,
    where AdamW applies its decay; Adam sees the task gradient alone), coupled with fd_decoupled=False
    (the FD gradient goes through Adam's normalisation); the non-factors keep the stock optimizer's own
    weight decay (Adam: coupled L2, AdamW: decoupled). Checked against torch's Adam / AdamW on clones."""
    lr, eps = 1e-2, 1e-3  # a large eps keeps Adam's first step proportional to the gradient
    model = _model()
    ref = copy.deepcopy(model)
    kwargs = {} if decoupled else dict(fd_decoupled=False)
    opt = create_optimizer_v2(model, name, lr=lr, weight_decay=WD, eps=eps, **kwargs)
    factors = _factor_ids(model)
    groups = {id(p): g for g in opt.param_groups for p in g['params']}
    assert all(groups[i]['fd_coef'] == WD and groups[i]['weight_decay'] == 0.0
               and groups[i]['fd_decoupled'] is decoupled for i in factors)
    opt.zero_grad()
    _loss(model).backward()
    opt.step()

    _loss(ref).backward()
    fd = _fd_closed_form(ref, WD)
    ref_factors = _factor_ids(ref)
    with torch.no_grad():
        for p in ref.parameters():
            if id(p) in ref_factors:
                if decoupled:
                    p -= lr * fd[id(p)]
                else:
                    p.grad += fd[id(p)]
    cls = torch.optim.AdamW if name == 'fdadamw' else torch.optim.Adam
    decayed = [p for p in ref.parameters() if id(p) not in ref_factors and p.ndim > 1]
    rest = [p for p in ref.parameters() if id(p) not in ref_factors and p.ndim <= 1]
    cls([{'params': decayed, 'weight_decay': WD}, {'params': rest, 'weight_decay': 0.0},
         {'params': [p for p in ref.parameters() if id(p) in ref_factors], 'weight_decay': 0.0}],
        lr=lr, eps=eps, foreach=False).step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7), f'{n}: {(a - b).abs().max()}'
    # coupled and decoupled differ by far more than the tolerance on the factors
    other = _model()
    other_opt = create_optimizer_v2(other, name, lr=lr, weight_decay=WD, eps=eps, fd_decoupled=not decoupled)
    _loss(other).backward()
    other_opt.step()
    diff = min(float((a - b).abs().max()) for (n, a), b in zip(model.named_parameters(), other.parameters())
               if n.endswith(('.U', '.V')))
    assert diff > 1e-5, diff


def test_factor_groups_never_keep_plain_weight_decay():
    """Parameter groups the factory did not build (one group, weight decay on everything): the factors
    still get FD and no plain weight decay; every other parameter keeps the group's weight decay."""
    model = _model()
    ref = copy.deepcopy(model)
    opt = FDSGD([{'params': list(model.parameters()), 'weight_decay': WD}], lr=LR, weight_decay=WD)
    factors = _factor_ids(model)
    assert all(g['weight_decay'] == 0.0 for g in opt.param_groups for p in g['params'] if id(p) in factors)
    _loss(model).backward()
    opt.step()
    _loss(ref).backward()
    fd = _fd_closed_form(ref, WD)
    ref_factors = _factor_ids(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * (p.grad + (fd[id(p)] if id(p) in ref_factors else WD * p))
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), f'{n}: {(a - b).abs().max()}'


def test_factorize_any_model_then_mark():
    """A model factorized with fnl.factorize works once mark_factors registers its factors."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fnl.factorize(mlp, rank_scale=0.5, include=['2'])
    assert factor_owner(mlp[2].U) is None
    assert mark_factors(mlp) == 1
    assert factor_owner(mlp[2].U) is mlp[2] and factor_owner(mlp[0].weight) is None
    opt = create_optimizer_v2(mlp, 'fdsgd', lr=LR, weight_decay=WD)
    assert sum(len(g['params']) for g in opt.param_groups if g['fd_coef'] == WD) == 2


@pytest.mark.parametrize('kwargs,match', [
    (dict(fd_coef=-1.0), 'fd_coef'),
    (dict(fd_coef=float('nan')), 'fd_coef'),
    (dict(lr=-0.1), 'lr'),
    (dict(weight_decay=-1.0), 'weight_decay'),
    (dict(fd_coef=0.1, wd2fd=False), 'wd2fd'),
])
def test_bad_arguments(kwargs, match):
    model = _model()
    args = dict(lr=LR, weight_decay=WD)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FDSGD(model.parameters(), **args)
    with pytest.raises(TypeError, match='model'):
        mark_factors('not a model')


def test_stock_timm_train_py_path():
    """What timm's train.py does with ``--device-modules fnl_timm --model fnl_resnet20 --model-kwargs
    rank_scale=0.111 spectral=True --opt fdsgd``: import the module, parse the kwargs with timm's
    ParseKwargs, create_model, create_optimizer_v2(**optimizer_kwargs(args)), NativeScaler steps."""
    import argparse
    import importlib
    from timm.optim import optimizer_kwargs
    from timm.utils import NativeScaler, ParseKwargs

    importlib.import_module('fnl_timm')
    p = argparse.ArgumentParser()
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('--opt', default='sgd')
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--weight-decay', type=float, default=2e-5)
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--opt-eps', type=float, default=None)
    p.add_argument('--layer-decay', type=float, default=None)
    args = p.parse_args(['--model-kwargs', 'rank_scale=0.111', 'spectral=True', '--opt', 'fdsgd',
                         '--weight-decay', '1e-4', '--opt-eps', '1e-8'])
    assert args.model_kwargs == {'rank_scale': 0.111, 'spectral': True}
    torch.manual_seed(0)
    model = timm.create_model('fnl_resnet20', num_classes=10, **args.model_kwargs)
    assert fnl.count_parameters(model) == 63_850
    opt = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    assert isinstance(opt, FDSGD)
    assert sum(len(g['params']) for g in opt.param_groups if g['fd_coef'] == 1e-4) == 36  # 18 convs x (U, V)
    scaler = NativeScaler(device='cpu')
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler(loss, opt, clip_grad=1.0, parameters=model.parameters())
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses
    # timm's layer-decay grouping keeps the factors with FD as well
    args = p.parse_args(['--opt', 'fdsgd', '--weight-decay', '1e-4', '--layer-decay', '0.9'])
    opt = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    assert sum(len(g['params']) for g in opt.param_groups if g['fd_coef'] == 1e-4) == 36
    assert all(g['weight_decay'] == 0.0 for g in opt.param_groups if g['fd_coef'] > 0)


def test_regulariser_that_would_do_nothing_is_refused():
    """wd2fd=True on a model without registered factors, or with an FD coefficient of 0 nobody asked
    for (weight_decay 0, no fd_coef), is an error; an explicit fd_coef=0 (--no-frob) and wd2fd=False
    on a dense model are not."""
    dense = timm.create_model('fnl_test_resnet')
    with pytest.raises(ValueError, match='no registered factor among the parameters.*mark_factors'):
        create_optimizer_v2(dense, 'fdsgd', lr=LR, weight_decay=WD)
    opt = create_optimizer_v2(dense, 'fdsgd', lr=LR, weight_decay=WD, wd2fd=False)
    assert all(g['fd_coef'] == 0.0 for g in opt.param_groups)
    model = _model()
    for name in ('fdsgd', 'fdmomentum', 'fdadam', 'fdadamw'):
        with pytest.raises(ValueError, match=r"FD coefficient \(default: the weight decay\) is 0.*fd_coef=0\.0"):
            create_optimizer_v2(model, name, lr=LR, weight_decay=0.0)
    opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, weight_decay=0.0, fd_coef=0.0)  # --no-frob
    assert all(g['fd_coef'] == 0.0 for g in opt.param_groups)


def test_stock_optimizers_keep_weight_decay_on_the_factors():
    """The fnl_* models' no_weight_decay() does not name the factors: timm's sgd / adamw decay them
    like every other weight (the paper's baseline)."""
    model = _model()
    assert model.no_weight_decay() == set()
    factors = _factor_ids(model)
    for name in ('sgd', 'momentum', 'adamw'):
        opt = create_optimizer_v2(model, name, lr=LR, weight_decay=WD)
        decayed = {id(p) for g in opt.param_groups if g['weight_decay'] == WD for p in g['params']}
        assert factors and factors <= decayed, name


def test_fused_under_grad_scaler_adds_fd_to_unscaled_gradients():
    """fused=True under torch.amp.GradScaler: the scaler hands the optimizer still-scaled gradients and
    the scale; the step equals the unscaled for-loop step."""
    models = [_model(), _model()]
    for m in models:
        mark_factors(m)
    opts = [create_optimizer_v2(m, 'fdmomentum', lr=LR, momentum=0.9, weight_decay=WD, fused=fused)
            for m, fused in zip(models, (True, False))]
    scaler = torch.amp.GradScaler('cpu', init_scale=1000.0)
    scaler.scale(_loss(models[0])).backward()
    assert opts[0]._step_supports_amp_scaling
    scaler.step(opts[0])
    _loss(models[1]).backward()
    opts[1].step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), f'{n}: {(a - b).abs().max()}'
    assert not hasattr(opts[0], 'grad_scale')  # GradScaler removed what it set


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('fnl', base='vit_tiny_patch16_224', img_size=16, patch_size=8, depth=2, num_classes=3,
                             rank_scale=0.5, attention='heads', **kwargs)


def test_attention_forms_get_fd_and_no_weight_decay():
    """wd2fd_quekey / wd2fd_outval: qkv.weight (and with outval proj.weight) move to an FD group without
    weight decay; the patch embedding's proj keeps its decay; a model without timm attention is refused.
    (One step of each is a cell of tests/test_regularizer_matrix.py.)"""
    model = _vit()
    attn = model.blocks[0].attn
    for quekey, outval in ((True, False), (False, True), (True, True)):
        opt = create_optimizer_v2(model, 'fdmomentum', lr=LR, weight_decay=WD, wd2fd_quekey=quekey,
                                  wd2fd_outval=outval)
        groups = {id(p): g for g in opt.param_groups for p in g['params']}
        assert groups[id(attn.qkv.weight)]['weight_decay'] == 0.0 and groups[id(attn.qkv.weight)]['fd_coef'] == WD
        proj = groups[id(attn.proj.weight)]
        assert (proj['weight_decay'], proj['fd_coef']) == ((0.0, WD) if outval else (WD, 0.0))
        assert groups[id(model.patch_embed.proj.weight)]['weight_decay'] == WD
        engine, _ = opt._fd_terms()
        assert sum(t.name == 'quekey' for t in engine.terms) == (2 if quekey else 0)
        assert sum(t.name == 'outval' for t in engine.terms) == (2 if outval else 0)
    with pytest.raises(ValueError, match='wd2fd_quekey: no registered timm attention among the parameters'):
        create_optimizer_v2(_model(), 'fdsgd', lr=LR, weight_decay=WD, wd2fd_quekey=True)


def test_fnl_train_attention_flags(tmp_path):
    """fnl-train --wd2fd-quekey --wd2fd-outval hands the forms to the FD optimizer; with a stock optimizer
    they are refused, and on a model without timm attention the optimizer refuses them."""
    from fnl_timm import train as fnl_train
    base = ['--dataset', 'digits', '--img-size', '16', '--batch-size', '16', '--workers', '0', '--epochs', '1',
            '--limit-train-batches', '2', '--limit-val-batches', '1', '--no-progress', '--no-tensorboard',
            '--output', str(tmp_path), '--device', 'cpu']
    vit = ['--model', 'fnl', '--model-kwargs', 'base=vit_tiny_patch16_224', 'img_size=16', 'patch_size=8', 'depth=2',
           'attention=heads', 'rank_scale=0.5', '--wd2fd', '--wd2fd-quekey', '--wd2fd-outval']
    seen = {}
    real = create_optimizer_v2

    class Built(Exception):
        pass

    def spy(*args, **kwargs):  # the optimizer fnl-train builds; the run stops there
        opt = real(*args, **kwargs)
        seen['terms'] = sorted(t.name for t in opt._fd_terms()[0].terms)
        raise Built

    import unittest.mock
    with unittest.mock.patch('fnl_timm.train.create_optimizer_v2', spy), pytest.raises(Built):
        fnl_train.run(base + vit + ['--experiment', 'vit'])
    assert seen['terms'].count('quekey') == 2 and seen['terms'].count('outval') == 2
    args = fnl_train.build_parser().parse_args([a for a in vit if a != '--wd2fd'] + ['--opt', 'sgd'])
    with pytest.raises(ValueError, match='--wd2fd-quekey / --wd2fd-outval need a Frobenius-decay optimizer'):
        fnl_train.validate_args(args)
    with pytest.raises(ValueError, match='no registered timm attention'):
        fnl_train.run(base + ['--model', 'fnl_test_resnet', '--rank-scale', '0.3', '--wd2fd-quekey',
                              '--experiment', 'resnet'])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['fdmomentum', 'fdadamw'])
def test_fd_optimizers_under_torch_compile(name):
    """``torch.compile`` of the fd* optimizers' step (dynamo, aot_eager backend) gives the eager step."""
    models = [_model(), _model()]
    opts = [create_optimizer_v2(m, name, lr=1e-2, weight_decay=WD, momentum=0.9) for m in models]
    steps = [torch.compile(opts[0].step, backend='aot_eager'), opts[1].step]
    for m, step in zip(models, steps):
        for seed in (1, 2):
            m.zero_grad()
            _loss(m, seed).backward()
            step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), f'{n}: {(a - b).abs().max()}'
