"""Tensor-format convs (docs/method.md#tensor-formats): TT / Tucker layers, TT-SVD / HOSVD, Frobenius
decay, WRN counts."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl
from fnl import TTConv2d, TuckerConv2d, hosvd, tt_svd
from fnl.tensor_conv import _tt_full, _tucker_full

CLASSES = [TTConv2d, TuckerConv2d]
IDS = ['tt', 'tucker']


def _matrix_with_spectrum(out_c, in_c, seed=0):
    """A random matrix with decaying singular values, so truncations discard something measurable."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(out_c, out_c, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(in_c, in_c, generator=g, dtype=torch.float64))
    k = min(out_c, in_c)
    return (q1[:, :k] * torch.logspace(0, -2, k, dtype=torch.float64)) @ q2[:, :k].T + \
        1e-2 * torch.randn(out_c, in_c, generator=g, dtype=torch.float64)


def _full_rank(cls, out_c, in_c):
    o, i = fnl.tensor_modes(out_c, in_c)
    n = [a * b for a, b in zip(o, i)]
    if cls is TTConv2d:
        return (min(n[0], n[1] * n[2]), min(n[0] * n[1], n[2]))
    return tuple(n)


# --- modes and ranks -------------------------------------------------------------------------
def test_modes_and_ranks_of_spec6():
    assert fnl.tensor_modes(640, 640) == ((10, 8, 8), (8, 10, 8))  # n = 80 x 80 x 64
    tt = TTConv2d(640, 640, 3, rank_scale=0.234)
    assert tt.modes == (80, 80, 64)
    assert tt.ranks == (round(0.234 * 80), round(0.234 * 64)) == (19, 15)
    assert [tuple(p.shape) for p in tt.factor_parameters()] == [(1, 10, 8, 19), (19, 8, 10, 15), (15, 8, 8, 1)]
    assert tt.num_parameters() == 640 * 9 + 80 * 19 + 19 * 80 * 15 + 15 * 64 + 640  # depthwise, cores, bias
    tucker = TuckerConv2d(640, 640, 3, rank_scale=0.211, bias=False)
    assert tucker.ranks == (17, 17, 14)
    assert tucker.num_parameters() == 640 * 9 + 17 * 17 * 14 + 80 * 17 * 2 + 64 * 14
    assert tucker.dense_num_parameters() == 640 * 640 * 9
    assert fnl.tensor_modes(160, 16) == ((8, 4, 5), (2, 4, 2))
    assert fnl.tensor_modes(7, 1) == ((7, 1, 1), (1, 1, 1))  # primes work (modes of size 1)


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(rank_scale=0.0), ValueError, 'rank_scale'),
    (dict(rank_scale=1.5), ValueError, r'rank_scale must be a finite float in \(0, 1\]'),
    (dict(rank_scale='0.5'), TypeError, 'rank_scale'),
    (dict(), ValueError, 'exactly one'),
    (dict(rank=2, rank_scale=0.5), ValueError, 'exactly one'),
    (dict(rank=(2, 2, 2, 2)), TypeError, 'rank'),
    (dict(rank=0), ValueError, 'rank'),
    (dict(rank=3, out_modes=(2, 2, 2), in_modes=(2, 2, 4)), ValueError, 'out_modes'),
    (dict(rank=3, out_modes=(4, 6)), TypeError, 'out_modes'),
    (dict(rank=3, out_modes=(2, 3, 4)), ValueError, 'in_modes'),
    (dict(rank=3, groups=2), ValueError, 'groups'),
    (dict(rank=3, path='fast'), ValueError, 'path'),
    (dict(rank=3, padding='same'), ValueError, 'padding'),
])
@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_bad_arguments(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(16, 24, 3, **kwargs)


def test_rank_bounds():
    with pytest.raises(ValueError, match='TT rank r_1=99'):
        TTConv2d(16, 24, 3, rank=(99, 2))
    with pytest.raises(ValueError, match='Tucker rank R_3=99'):
        TuckerConv2d(16, 24, 3, rank=(2, 2, 99))
    with pytest.raises(TypeError, match='abstract'):
        fnl.TensorConv2d(16, 24, 3, rank=2)


# --- exactness at full ranks -----------------------------------------------------------------
@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
@pytest.mark.parametrize('out_c,in_c', [(24, 16), (30, 12), (640, 640)])
def test_full_ranks_reproduce_the_dense_1x1_matrix(cls, out_c, in_c):
    m = _matrix_with_spectrum(out_c, in_c)
    layer = cls(in_c, out_c, 1, rank=_full_rank(cls, out_c, in_c), dtype=torch.float64)
    layer.set_matrix_(m)
    assert torch.allclose(layer.matrix(), m, atol=1e-12), f'{(layer.matrix() - m).abs().max()}'
    x = torch.randn(2, in_c, 3, 3, dtype=torch.float64)
    ref = F.conv2d(x, m[:, :, None, None], layer.bias)
    for path in ('factored', 'dense'):
        layer.path = path
        assert torch.allclose(layer(x), ref, atol=1e-10), f'{path}: {(layer(x) - ref).abs().max()}'


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_spec_scale_one_is_full_rank_for_the_wrn_modes(cls):
    """At s = 1 the rank rules give the full ranks for 640 x 640 (modes 80 x 80 x 64)."""
    layer = cls(640, 640, 3, rank_scale=1.0)
    assert layer.ranks == _full_rank(cls, 640, 640)


# --- spectral init: TT-SVD / HOSVD truncation errors ----------------------------------------
def _unfolding_discarded(t, ranks_tt=None, ranks_tucker=None):
    n = t.shape
    if ranks_tt is not None:  # sequential unfoldings T_<k> (n_1..n_k x n_k+1..n_d)
        out = []
        for k, r in enumerate(ranks_tt):
            s = torch.linalg.svdvals(t.reshape(math.prod(n[:k + 1]), -1))
            out.append(float(s[r:].square().sum()))
        return out
    return [float(torch.linalg.svdvals(t.movedim(k, 0).reshape(n[k], -1))[r:].square().sum())
            for k, r in enumerate(ranks_tucker)]


@pytest.mark.parametrize('scale', [0.2, 0.5])
def test_tt_svd_error_is_the_discarded_energy(scale):
    m = _matrix_with_spectrum(48, 40)
    layer = TTConv2d(40, 48, 1, rank_scale=scale, dtype=torch.float64)
    t = layer.matrix_to_tensor(m)
    cores, discarded = tt_svd(t, layer.ranks)
    err = float((t - _tt_full(cores)).square().sum())
    assert err > 1e-6  # something was truncated
    assert math.isclose(err, float(sum(discarded)), rel_tol=1e-9), (err, discarded)  # exact identity
    bound = _unfolding_discarded(t, ranks_tt=layer.ranks)
    assert all(float(d) <= b * (1 + 1e-9) for d, b in zip(discarded, bound)), (discarded, bound)
    assert math.isclose(float(discarded[0]), bound[0], rel_tol=1e-9)  # step 1 is the first unfolding itself
    assert err <= sum(bound) * (1 + 1e-9)
    # the layer's spectral init gives exactly that approximation (the balancing is a gauge)
    layer.set_matrix_(m)
    assert math.isclose(float((layer.matrix().detach() - m).square().sum()), err, rel_tol=1e-7)


@pytest.mark.parametrize('scale', [0.2, 0.5])
def test_hosvd_error_bounds(scale):
    m = _matrix_with_spectrum(48, 40)
    layer = TuckerConv2d(40, 48, 1, rank_scale=scale, dtype=torch.float64)
    t = layer.matrix_to_tensor(m)
    core, factors, discarded = hosvd(t, layer.ranks)
    err = float((t - _tucker_full(core, factors)).square().sum())
    assert err > 1e-6
    assert math.isclose(err, float(t.square().sum() - core.square().sum()), rel_tol=1e-7)  # orthogonal projection
    assert torch.allclose(torch.tensor([float(d) for d in discarded]),
                          torch.tensor(_unfolding_discarded(t, ranks_tucker=layer.ranks), dtype=torch.float32),
                          rtol=1e-6)
    assert max(map(float, discarded)) <= err * (1 + 1e-9) <= sum(map(float, discarded)) * (1 + 1e-9)
    for a in factors:
        assert torch.allclose(a.T @ a, torch.eye(a.shape[1], dtype=a.dtype), atol=1e-10)
    layer.set_matrix_(m)
    assert math.isclose(float((layer.matrix().detach() - m).square().sum()), err, rel_tol=1e-7)


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_spectral_init_decomposes_the_dense_init(cls):
    """spectral=True: the 1x1 matrix gets ``init``, then its truncated decomposition; cores balanced."""
    drawn = []

    def init(w):
        nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')
        drawn.append(w[:, :, 0, 0].clone())

    torch.manual_seed(0)
    layer = cls(40, 48, 3, rank_scale=0.5, spectral=True, init=init, dtype=torch.float64)
    assert len(drawn) == 1
    t = layer.matrix_to_tensor(drawn[0])
    if cls is TTConv2d:
        expected = float(sum(tt_svd(t, layer.ranks)[1]))
    else:
        core, _, _ = hosvd(t, layer.ranks)
        expected = float(t.square().sum() - core.square().sum())
    err = float((layer.matrix().detach() - drawn[0]).square().sum())
    assert math.isclose(err, expected, rel_tol=1e-7), (err, expected)
    norms = [float(p.detach().norm()) for p in layer.factor_parameters()]
    assert max(norms) / min(norms) == pytest.approx(1.0, abs=1e-9)  # norm spread evenly


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_default_init_matches_the_dense_variance(cls):
    torch.manual_seed(0)
    layer = cls(640, 640, 3, rank_scale=0.5, init=lambda w: nn.init.normal_(w, std=0.05))
    std = float(layer.matrix().detach().std())
    assert std == pytest.approx(0.05, rel=0.1), std


def test_tt_svd_matches_tensorly():
    tl = pytest.importorskip('tensorly')
    from tensorly.decomposition import tensor_train
    t = TTConv2d(40, 48, 1, rank=1).matrix_to_tensor(_matrix_with_spectrum(48, 40))
    ranks = (5, 7)
    ours = _tt_full(tt_svd(t, ranks)[0])
    theirs = torch.as_tensor(tl.tt_to_tensor(tensor_train(tl.tensor(t.numpy()), rank=[1, *ranks, 1])))
    assert torch.allclose(ours, theirs.to(ours), atol=1e-10), f'{(ours - theirs).abs().max()}'


# --- forward paths ---------------------------------------------------------------------------
@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
@pytest.mark.parametrize('conv', [
    dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=2), dict(kernel_size=1, stride=2),
    dict(kernel_size=1, stride=2, padding=1),
])
def test_paths_agree_and_to_dense_is_exact(cls, conv):
    torch.manual_seed(0)
    layer = cls(24, 20, rank_scale=0.4, dtype=torch.float64, **conv)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    x = torch.randn(3, 24, 9, 8, dtype=torch.float64)
    dense = layer.to_dense()
    ref = dense(x)
    outs = {}
    for path, direction in (('dense', None), ('factored', 'rtl'), ('factored', 'ltr')):
        layer.path = path
        if direction:  # force the direction through the plan
            layer._plan = lambda pixels, d=direction: (False, d)
        outs[(path, direction)] = layer(x)
        if direction:
            del layer._plan  # back to the class method
    for k, y in outs.items():
        assert y.shape == ref.shape
        assert torch.allclose(y, ref, atol=1e-10), f'{k}: {(y - ref).abs().max()}'
    # depthwise then pointwise = one conv with kernel W[o, i] D[i]
    assert isinstance(dense, nn.Conv2d) and dense.weight.shape == (20, 24, *layer.kernel_size)


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_auto_path_picks_the_cheaper(cls):
    layer = cls(640, 640, 3, padding=1, rank_scale=0.234)
    contract = min(layer._contract_macs('rtl'), layer._contract_macs('ltr'))
    assert layer._plan(128 * 64)[0] == (128 * 64 * contract >= layer.rebuild_macs() + 128 * 64 * 640 * 640)
    small = cls(640, 640, 3, padding=1, rank=2)
    assert not small._plan(128 * 64)[0]  # rank 2: contracting the cores is cheaper
    assert small.macs((640, 8, 8)) == 640 * 9 * 64 + 64 * min(small._contract_macs('rtl'),
                                                              small._contract_macs('ltr'))
    assert small.dense_macs((640, 8, 8)) == 640 * 640 * 9 * 64


def test_tt_macs_closed_form():
    tt = TTConv2d(640, 640, 3, padding=1, rank_scale=0.234)  # o = (10, 8, 8), i = (8, 10, 8), r = (19, 15)
    assert tt._contract_macs('ltr') == 10 * 19 * 8 * 80 + 10 * 8 * 15 * 19 * 10 * 8 + 80 * 8 * 15 * 8
    assert tt._contract_macs('rtl') == 80 * 15 * 8 * 8 + 8 * 19 * 8 * 10 * 15 * 8 + 10 * 8 * 19 * 64
    assert tt.rebuild_macs() == 80 * 19 * 80 * 15 + 80 * 80 * 15 * 64
    assert tt.macs((640, 8, 8)) == 640 * 9 * 64 + 640 * 640 * 64  # the rebuilt matrix is cheaper here


# --- dense conversions -----------------------------------------------------------------------
@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_from_dense(cls):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1).double()
    full = _full_rank(cls, 24, 16)
    layer = cls.from_dense(conv, rank=full)
    # an arbitrary kernel: the best depthwise-separable one (per-input-channel rank 1), exactly
    err = float((layer.dense_weight() - conv.weight).detach().square().sum())
    assert math.isclose(err, float(cls.separable_error_sq(conv.weight)), rel_tol=1e-9)
    assert err > 0
    assert torch.equal(layer.bias, conv.bias)
    # a kernel this layer represents (to_dense of one) comes back exactly
    src = cls(16, 24, 3, padding=1, rank_scale=0.5, dtype=torch.float64)
    back = cls.from_dense(src.to_dense(), rank=full)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    assert torch.allclose(back(x), src(x), atol=1e-10), f'{(back(x) - src(x)).abs().max()}'
    # 1x1 convs: from_dense is the TT-SVD / HOSVD of the matrix itself
    c1 = nn.Conv2d(16, 24, 1, bias=False).double()
    assert torch.allclose(cls.from_dense(c1, rank=full)(x), c1(x), atol=1e-10)
    with pytest.raises(TypeError, match='layer'):
        cls.from_dense(nn.Linear(3, 4), rank=2)
    with pytest.raises(ValueError, match='groups'):
        cls.from_dense(nn.Conv2d(16, 16, 3, groups=4), rank=2)


# --- Frobenius decay -------------------------------------------------------------------------
@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_frobenius_gradient_equals_autograd(cls, dtype):
    torch.manual_seed(0)
    layer = cls(40, 48, 3, rank_scale=0.5, dtype=dtype)
    coef = 0.3
    (0.5 * coef * layer.matrix().double().square().sum()).backward()
    auto = [p.grad.clone() for p in layer.factor_parameters()]
    assert layer.depthwise.grad is None  # FD is on the 1x1 matrix only
    layer.zero_grad(set_to_none=True)
    layer.add_frobenius_grad_(coef)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, p in zip(auto, layer.factor_parameters()):
        assert torch.allclose(p.grad, a.to(dtype), atol=tol * float(a.abs().max()), rtol=tol * 10), \
            f'{(p.grad - a).abs().max()}'
    norm_sq = float(layer.matrix().detach().double().square().sum())
    assert math.isclose(float(layer.frobenius_norm_sq().detach()), norm_sq, rel_tol=1e-10 if dtype == torch.float64 else 1e-5)
    assert math.isclose(float(fnl.frobenius_norm(layer).detach()) ** 2, norm_sq, rel_tol=1e-5)
    # fnl.frobenius_penalty (the loss-term form) has the same gradient
    layer.zero_grad(set_to_none=True)
    fnl.frobenius_penalty(layer, coef).backward()
    for a, p in zip(auto, layer.factor_parameters()):
        assert torch.allclose(p.grad, a.to(dtype), atol=tol * float(a.abs().max()), rtol=tol * 10)


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_frobenius_decay_moves_the_cores(cls):
    """The paper's code added the tensor penalty after backward(): no effect. Here FD acts on the cores."""
    torch.manual_seed(0)
    model = nn.Sequential(cls(16, 24, 3, padding=1, rank_scale=0.5, dtype=torch.float64))
    layer = model[0]
    groups = fnl.param_groups(model, weight_decay=5e-4)
    factor_group = [g for g in groups if g.get('factors')][0]
    assert {id(p) for p in factor_group['params']} == {id(p) for p in layer.factor_parameters()}
    assert factor_group['weight_decay'] == 0.0
    assert fnl.factor_parameter_names(model) == {f'0.{n}' for n, _ in layer.named_parameters()
                                                 if n not in ('depthwise', 'bias')}
    lr, coef = 0.1, 0.05
    opt = fnl.FrobeniusDecay(torch.optim.SGD(groups, lr=lr), model, coef=coef)
    before = [p.detach().clone() for p in layer.factor_parameters()]
    norm_before = float(layer.frobenius_norm_sq().detach())
    expected = layer._frobenius_grads([p.detach() for p in layer.factor_parameters()])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the loss contributes nothing: only FD moves the cores
    opt.step()
    for b, p, g in zip(before, layer.factor_parameters(), expected):
        assert torch.allclose(p.detach(), b - lr * coef * g, atol=1e-14)
        assert float((p.detach() - b).abs().max()) > 1e-6
    assert float(layer.frobenius_norm_sq().detach()) < norm_before
    # coef 0: nothing moves
    still = [p.detach().clone() for p in layer.factor_parameters()]
    opt0 = fnl.FrobeniusDecay(torch.optim.SGD(fnl.param_groups(model, 5e-4), lr=lr), model, coef=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt0.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(still, layer.factor_parameters()))


def test_timm_fd_optimizer_moves_the_cores():
    timm = pytest.importorskip('timm')
    import fnl_timm  # noqa: F401
    from timm.optim import create_optimizer_v2
    torch.manual_seed(0)
    model = timm.create_model('fnl_wrn28_10', depth=10, width=1, conv='tt', rank_scale=0.5, num_classes=3)
    layers = fnl.factorized_layers(model)
    assert len(layers) == 6 and all(isinstance(m, TTConv2d) for m in layers)
    opt = create_optimizer_v2(model, 'fdmomentum', lr=0.1, weight_decay=0.01, momentum=0.9, wd2fd=True)  # step 1: no history
    layer = layers[-1]
    before = [p.detach().clone() for p in layer.factor_parameters()]
    expected = layer._frobenius_grads([p.detach() for p in layer.factor_parameters()])
    model(torch.randn(2, 3, 8, 8)).sum().mul(0).backward()  # zero gradients through the real graph
    opt.step()
    for b, p, g in zip(before, layer.factor_parameters(), expected):
        assert torch.allclose(p.detach(), b - 0.1 * 0.01 * g, atol=1e-8)
        assert float((p.detach() - b).abs().max()) > 1e-7


# --- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', ['tt', 'tucker'])
def test_tensorize_collapse_and_summary(fmt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(24, 8, 1))
    fnl.tensorize(model, tensor_format=fmt, rank_scale=0.5, include=['2', '4'])
    cls = {'tt': TTConv2d, 'tucker': TuckerConv2d}[fmt]
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, cls, nn.ReLU, cls]
    assert not model[4].has_depthwise and model[2].depthwise.shape == (16, 1, 3, 3)
    s = fnl.summary(model, (3, 8, 8))
    assert s.total_params == fnl.count_parameters(model)
    assert s.dense_params == 3 * 16 * 9 + 16 + 16 * 24 * 9 + 24 + 24 * 8 + 8
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    fnl.collapse(model)
    assert all(type(m) in (nn.Conv2d, nn.ReLU) for m in model)
    assert torch.allclose(model(x), y, atol=1e-5), f'{(model(x) - y).abs().max()}'
    with pytest.raises(ValueError, match='tensor_format'):
        fnl.tensorize(model, tensor_format='cp', rank_scale=0.5)


def test_wrn28_10_tt_0234_is_about_one_sixtieth():
    """TensorTrain_0.234 is about 1/60 of the dense WRN-28-10, shortcuts staying dense
    (docs/experiments.md#reference-checks)."""
    timm = pytest.importorskip('timm')
    import fnl_timm  # noqa: F401
    model = timm.create_model('fnl_wrn28_10', conv='tt', rank_scale=0.234)
    params, dense = fnl.count_parameters(model), fnl.count_parameters(model, dense=True)
    assert dense == 36_479_194
    assert params == 592_992, params
    assert dense / params == pytest.approx(61.517, abs=1e-3)  # 1/61.5
    layers = fnl.factorized_layers(model)
    assert len(layers) == 24 and all(isinstance(m, TTConv2d) for m in layers)  # conv1 + conv2 of 12 blocks
    assert all(type(b.shortcut) is nn.Conv2d for b in (model.layer1[0], model.layer2[0], model.layer3[0]))
    assert model.layer3[1].conv2.ranks == (19, 15) and model.layer3[1].conv2.modes == (80, 80, 64)
    # the analytic solver agrees with the built model
    dense_model = timm.create_model('fnl_wrn28_10')
    s = fnl.solve_tensor_scale(dense_model, params / dense, 'tt', include=['layer*.conv1', 'layer*.conv2'])
    assert fnl.tensor_conv._tt_ranks_from_scale((80, 80, 64), s) == (19, 15)


@pytest.mark.parametrize('conv,scale,expected', [
    ('tt', 0.705, 2_296_564), ('tucker', 0.211, 440_706), ('tucker', 0.68, 1_759_816),
])
def test_wrn28_10_paper_points(conv, scale, expected):
    from fnl_timm.models import WideResNet
    assert fnl.count_parameters(WideResNet(conv=conv, rank_scale=scale)) == expected


def test_wrn_bad_tensor_kwargs():
    from fnl_timm.models import WideResNet
    with pytest.raises(ValueError, match="conv must be one of \\('lowrank', 'tt', 'tucker'\\)"):
        WideResNet(depth=10, width=1, conv='cp', rank_scale=0.2)
    with pytest.raises(ValueError, match="conv='tt' needs rank_scale"):
        WideResNet(depth=10, width=1, conv='tt')
    with pytest.raises(ValueError, match='square'):
        WideResNet(depth=10, width=1, conv='tucker', rank_scale=0.2, square=True)
    with pytest.raises(ValueError, match='rank_scale'):
        WideResNet(depth=10, width=1, conv='tt', rank_scale=1.5)


def test_recipe_smoke_trains(tmp_path):
    pytest.importorskip('timm')
    pytest.importorskip('matplotlib')
    import importlib
    import os
    import sys
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes')
    if recipes not in sys.path:
        sys.path.insert(0, recipes)
    wrn_tensor = importlib.import_module('wrn_tensor')
    assert len(wrn_tensor.RUNS) == 10  # 4 tensor points x 2 settings, low rank, dense
    rows = wrn_tensor.main(['--smoke', '--small', '--workers', '0', '--output', str(tmp_path), '--only',
                            'wrn28_10-tt-0.234-spectral-fd', 'wrn28_10-tucker-0.211'])
    by = {r['run']: r for r in rows}
    tt, tucker = by['wrn28_10-tt-0.234-spectral-fd'], by['wrn28_10-tucker-0.211']
    assert tt['spectral'] and tt['wd2fd'] and not tucker['spectral'] and not tucker['wd2fd']
    assert tt['rank_scale'] == 0.234 and tt['epochs_run'] == 1
    assert tt['dense_params'] == 303_706  # WRN-10-2
    assert 0 < tt['compression_ratio'] < 0.1 and 0 < tucker['compression_ratio'] < 0.1
    assert math.isfinite(tt['eval_loss']) and math.isfinite(tucker['eval_loss'])
    assert (tmp_path / 'wrn_tensor.png').stat().st_size > 10_000
    assert (tmp_path / 'wrn_tensor.json').exists()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    layer = TTConv2d(16, 24, 3, padding=1, rank_scale=0.5)
    x = torch.randn(2, 16, 6, 6)
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert torch.allclose(y, layer(x), atol=1e-6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize('cls', CLASSES, ids=IDS)
def test_scale_matrix_and_training_reduces_the_loss(cls):
    torch.manual_seed(0)
    layer = cls(8, 12, 3, padding=1, rank_scale=0.5, dtype=torch.float64)
    before = layer.matrix().detach()
    layer.scale_matrix_(2.5)
    assert torch.allclose(layer.matrix().detach(), 2.5 * before, atol=1e-12)
    # fit a depthwise-separable teacher of the same structure: the loss must fall by 10x in 200 Adam steps
    teacher = cls(8, 12, 3, padding=1, rank_scale=0.5, dtype=torch.float64)
    x = torch.randn(16, 8, 6, 6, dtype=torch.float64)
    target = teacher(x).detach()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = (layer(x) - target).square().mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first, (first, float(loss.detach()))
