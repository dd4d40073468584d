"""``fnl.conv_bn``: BatchNorm folded into the conv before it in eager inference, and nowhere else.

The folded path must compute ``bn(conv(x))`` for every conv kind and setting it accepts, follow every
change of the parameters and running statistics, and must not run where it could differ or be
observed (autograd on, training mode, other layer types, hooks, traces, autocast). The CIFAR ResNets
use it for the stem and every block (``set_bn_folding``).
"""
import copy
import importlib
import pickle

import pytest
import torch
import timm
from torch import nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fnl
import fnl_timm  # noqa: F401  (registers the fnl_* models)

CL = torch.channels_last
FOLDED = importlib.import_module('fnl.conv_bn')._FOLDED  # conv -> its kept folded weights


def _bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=affine, eps=1e-3)
    with torch.no_grad():  # statistics and affine terms far from the identity map
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


CONVS = {
    'conv2d': lambda: nn.Conv2d(6, 8, 3, padding=1, bias=False),
    'conv2d bias stride 2': lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    'conv2d groups, reflect padding': lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2, padding_mode='reflect'),
    'conv2d 1x1': lambda: nn.Conv2d(6, 8, 1, bias=False),
    'factorized': lambda: fnl.FactorizedConv2d(6, 8, 3, padding=1, bias=False, rank=2),
    'factorized bias stride (2, 1)': lambda: fnl.FactorizedConv2d(6, 8, 3, stride=(2, 1), padding=1, rank=3),
    'factorized square': lambda: fnl.FactorizedConv2d(6, 8, (3, 1), padding=(1, 0), rank=2, square=True),
    'factorized dense path': lambda: fnl.FactorizedConv2d(6, 8, 3, padding=1, rank=2, path='dense'),
    'factorized dense path dilation 2': lambda: fnl.FactorizedConv2d(6, 8, 3, padding=2, dilation=2, rank=2,
                                                                     path='dense'),
    'factorized dilation 2x5 kernel': lambda: fnl.FactorizedConv2d(6, 8, (2, 5), padding=2, dilation=2, rank=4),
}


def _pair(kind: str, affine: bool = True, channels_last: bool = False):
    torch.manual_seed(0)
    conv = CONVS[kind]().eval()
    if isinstance(conv, fnl.FactorizedConv2d) and conv.S is not None:
        with torch.no_grad():
            conv.S.add_(0.3 * torch.randn_like(conv.S))  # S away from the identity
    bn = _bn(8, affine)
    x = torch.randn(4, 6, 9, 10)
    if channels_last:
        conv, bn, x = conv.to(memory_format=CL), bn, x.contiguous(memory_format=CL)
    return conv, bn, x


def _no_batchnorm(monkeypatch) -> list:
    """Count calls of F.batch_norm (what nn.BatchNorm2d runs), through the name the module uses."""
    calls = []
    real = F.batch_norm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn.modules.batchnorm.F, 'batch_norm', spy)
    return calls


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('affine', [True, False], ids=['affine', 'no_affine'])
@pytest.mark.parametrize('kind', list(CONVS))
def test_folded_equals_conv_then_batchnorm(kind, affine, channels_last, monkeypatch):
    conv, bn, x = _pair(kind, affine, channels_last)
    convs = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, 'conv2d', lambda *a, **k: convs.append(1) or real_conv2d(*a, **k))
    with torch.no_grad():
        want = bn(conv(x))
        n_convs = len(convs)  # the folded path takes the layer's own path: one conv, or the factored pair
        assert fnl.folds_batchnorm(conv, bn, x)
        calls = _no_batchnorm(monkeypatch)
        got = fnl.conv_bn(conv, bn, x)
    assert not calls, 'the folded path ran BatchNorm'
    assert len(convs) == 2 * n_convs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


@pytest.mark.parametrize('kind', ['factorized bias stride (2, 1)', 'conv2d bias stride 2'])
def test_folded_path_follows_every_change(kind):
    """No stale weights: a parameter step, new running statistics (a train-mode forward), eps,
    load_state_dict and the factorized layer's path all show in the next folded call."""
    conv, bn, x = _pair(kind)
    opt = torch.optim.SGD(list(conv.parameters()) + list(bn.parameters()), lr=0.1)

    def check():
        with torch.no_grad():
            assert fnl.folds_batchnorm(conv, bn, x)
            torch.testing.assert_close(fnl.conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-4, atol=1e-4)
    check()
    with torch.no_grad():
        before = fnl.conv_bn(conv, bn, x)
    bn(conv(x)).square().mean().backward()
    opt.step()
    check()
    bn.train()
    bn(conv(x) * 3 + 1)  # updates running_mean / running_var in place (no version bump)
    bn.eval()
    check()
    bn.eps = 0.5
    check()
    other_conv, other_bn, _ = _pair(kind)
    with torch.no_grad():
        for p in list(other_conv.parameters()) + list(other_bn.parameters()):
            p.mul_(-2.0)
    conv.load_state_dict(other_conv.state_dict())
    bn.load_state_dict(other_bn.state_dict())
    check()
    with torch.no_grad():
        conv.bias.add_(1.0)  # the conv's bias alone
    check()
    with torch.no_grad():
        (conv.U if isinstance(conv, fnl.FactorizedConv2d) else conv.weight).mul_(-1.5)  # its weight alone
    check()
    if isinstance(conv, fnl.FactorizedConv2d):
        conv.path = 'dense'
        check()
    with torch.no_grad():
        assert not torch.allclose(fnl.conv_bn(conv, bn, x), before)


class _Ops(TorchDispatchMode):
    """The names of the aten operations that compute (views excluded) run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(func.__name__.split('.')[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('kind', ['conv2d bias stride 2', 'factorized bias stride (2, 1)', 'factorized dense path'])
def test_folded_weights_are_kept_until_something_changes(kind):
    """The folded weight and bias are made once and reused: a later call runs the conv(s) alone, until a
    parameter or statistic changes (the next call then makes them again: the check above)."""
    conv, bn, x = _pair(kind)
    with torch.no_grad():
        first = fnl.conv_bn(conv, bn, x)
        with _Ops() as ops:
            again = fnl.conv_bn(conv, bn, x)
    assert set(ops.names) == {'convolution'}, ops.names
    assert torch.equal(again, first)
    with torch.no_grad():
        bn.running_var.mul_(4.0)
        with _Ops() as ops:
            changed = fnl.conv_bn(conv, bn, x)
        torch.testing.assert_close(changed, bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert 'rsqrt_' in ops.names


def test_kept_weights_follow_the_input_layout():
    """A factorized conv's folded weights are laid out as its input (channels-last for a channels-last
    input, docs/speed.md): switching the input's layout makes them again."""
    conv, bn, x = _pair('factorized bias stride (2, 1)')
    with torch.no_grad():
        for fmt in (torch.contiguous_format, CL, torch.contiguous_format):
            xi = x.contiguous(memory_format=fmt)
            torch.testing.assert_close(fnl.conv_bn(conv, bn, xi), bn(conv(xi)), rtol=1e-5, atol=1e-5)
            weights = FOLDED[conv][1][0]
            assert all(w.is_contiguous(memory_format=fmt) for w in weights)


def test_kept_weights_stay_out_of_pickles_and_copies():
    """The kept weights are not part of the conv: a pickled or copied layer does not carry them (a dense
    conv's would double its size), and they go when the conv goes."""
    conv, bn, x = nn.Conv2d(64, 64, 3, bias=False).eval(), _bn(64), torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        fnl.conv_bn(conv, bn, x)
    assert conv in FOLDED
    assert len(pickle.dumps(conv)) < 1.1 * len(pickle.dumps(conv.weight))  # the weight alone: 147 kB
    assert copy.deepcopy(conv) not in FOLDED
    n = len(FOLDED)
    del conv
    assert len(FOLDED) == n - 1


@pytest.mark.parametrize('kwargs', [{}, {'rank_scale': 0.111}], ids=['dense', 'fnl@0.111'])
def test_model_made_under_inference_mode(kwargs):
    """Parameters made under ``torch.inference_mode`` have no version counter to key kept weights on:
    the folded (and factor) weights are then made on every call, and the output is the usual one."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    with torch.inference_mode():
        inf = timm.create_model('fnl_resnet20', **kwargs).eval()
        got = [inf(x) for _ in range(2)]
    torch.manual_seed(0)
    ref = timm.create_model('fnl_resnet20', **kwargs).eval()
    with torch.no_grad():
        want = ref(x)
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_nothing_kept_without_a_batch_counter():
    """A BatchNorm without ``num_batches_tracked`` (set to None) updates its statistics in training without
    any version bump to show it: the folded weights are then made on every call, never kept."""
    conv, bn, x = _pair('factorized bias stride (2, 1)')
    bn.num_batches_tracked = None
    for _ in range(2):
        bn.train()
        with torch.no_grad():
            bn(conv(x) * 2 - 1)  # new running statistics, updated inside the kernel
        bn.eval()
        with torch.no_grad():
            torch.testing.assert_close(fnl.conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert conv not in FOLDED


class _SubBN(nn.BatchNorm2d):
    pass


class _SubConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _tt(conv, bn, x):
    return fnl.TTConv2d(6, 8, 3, padding=1, rank_scale=0.5).eval(), bn, x


def _hook_conv(conv, bn, x):
    conv.register_forward_hook(lambda *a: None)
    return conv, bn, x


def _hook_bn(conv, bn, x):
    bn.register_forward_pre_hook(lambda *a: None)
    return conv, bn, x


NOT_FOLDED = {
    'training mode': lambda c, b, x: (c, b.train(), x),
    'no running statistics': lambda c, b, x: (c, nn.BatchNorm2d(8, track_running_stats=False).eval(), x),
    'BatchNorm subclass': lambda c, b, x: (c, _SubBN(8).eval(), x),
    'conv subclass': lambda c, b, x: (_SubConv(6, 8, 3, padding=1).eval(), b, x),
    'tensor-train conv': _tt,
    'hook on the conv': _hook_conv,
    'hook on the BatchNorm': _hook_bn,
}


@pytest.mark.parametrize('case', list(NOT_FOLDED))
def test_not_folded_where_it_could_differ_or_be_seen(case, monkeypatch):
    conv, bn, x = NOT_FOLDED[case](*_pair('factorized'))
    with torch.no_grad():
        assert not fnl.folds_batchnorm(conv, bn, x)
        want = bn(conv(x)) if case != 'training mode' else None  # training: each call moves the statistics
        calls = _no_batchnorm(monkeypatch)
        got = fnl.conv_bn(conv, bn, x)
    assert calls, 'BatchNorm did not run'
    assert want is None or torch.equal(got, want)


def test_not_folded_with_autograd_a_global_hook_autocast_or_a_trace(monkeypatch):
    conv, bn, x = _pair('factorized')
    assert not fnl.folds_batchnorm(conv, bn, x)  # autograd on
    with torch.no_grad():
        assert fnl.folds_batchnorm(conv, bn, x)
        handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            assert not fnl.folds_batchnorm(conv, bn, x)
        finally:
            handle.remove()
        handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
        try:
            assert not fnl.folds_batchnorm(conv, bn, x)
        finally:
            handle.remove()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not fnl.folds_batchnorm(conv, bn, x)
        assert not fnl.folds_batchnorm(conv, bn, x[0])  # 3-d
        assert not fnl.folds_batchnorm(conv, _bn(7), x)  # wrong width: BatchNorm raises as it would
        with pytest.raises(RuntimeError):
            fnl.conv_bn(conv, _bn(7), x)
        monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
        assert not fnl.folds_batchnorm(conv, bn, x)
        monkeypatch.undo()
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        assert not fnl.folds_batchnorm(conv, bn, x)
        monkeypatch.undo()
        assert fnl.folds_batchnorm(conv, bn, x)
    with torch.inference_mode():
        assert fnl.folds_batchnorm(conv, bn, x)
        assert fnl.folds_batchnorm(conv.double(), bn.double(), x.double())  # any floating-point dtype


class _Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.conv, self.bn = _pair(kind)[:2]

    def forward(self, x):
        return fnl.conv_bn(self.conv, self.bn, x)


def test_traces_keep_the_batchnorm():
    """torch.jit.trace and torch.fx see the two layers (fold_batchnorm and exporters work on them)."""
    x = torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        block = _Block('factorized').eval()
        traced = torch.jit.trace(block, x)
        assert 'aten::batch_norm' in str(traced.inlined_graph)
        torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-5)
        block = _Block('conv2d').eval()  # torch.fx traces plain layers (FactorizedConv2d branches on its input)
        gm = torch.fx.symbolic_trace(block)
        assert [n.target for n in gm.graph.nodes if n.op == 'call_module'] == ['conv', 'bn']
        torch.testing.assert_close(gm(x), block(x), rtol=1e-5, atol=1e-5)


ZOO = [('fnl_resnet20', dict(rank_scale=0.111)), ('fnl_resnet20', dict()),
       ('fnl_test_resnet', dict(rank_scale=0.5, square=True)),  # conv + BatchNorm shortcuts
       ('fnl_vgg19', dict(target_ratio=0.05))]


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


@pytest.mark.parametrize('name,kwargs', ZOO, ids=['fnl_resnet20@0.111', 'fnl_resnet20 dense', 'test_resnet square', 'vgg19'])
def test_zoo_resnets_fold_in_eager_inference_only(name, kwargs, monkeypatch):
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model(name, **kwargs)).eval()
    x = torch.randn(3, 3, 32, 32) if 'vgg' in name else torch.randn(3, 3, 16, 16)  # VGG pools 5 times
    plain = copy.deepcopy(model)
    plain.set_bn_folding(False)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        calls = _no_batchnorm(monkeypatch)
        got = model(x)
        assert not calls, 'a BatchNorm was not folded'
        want = plain(x)
        assert len(calls) == n_bn
    # float rounding over up to 19 layers: relative to the largest logit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    calls.clear()
    out = model(x)  # autograd on: exactly the unfolded model
    assert len(calls) == n_bn and torch.equal(out, plain(x))
    with torch.no_grad():  # the deployment copy traces the layers, not the folded path
        torch.testing.assert_close(fnl.fold_batchnorm(fnl.to_inference_form(model))(x), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize('grad', [True, False], ids=['autograd', 'no_grad'])
@pytest.mark.parametrize('name,kwargs', ZOO, ids=['fnl_resnet20@0.111', 'fnl_resnet20 dense', 'test_resnet square', 'vgg19'])
def test_zoo_models_trace_with_their_batchnorms(name, kwargs, grad):
    """torch.jit.trace (which runs the model again to check the graph, with autograd off) records every
    BatchNorm, as the same graph each time."""
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model(name, **kwargs)).eval()
    x = torch.randn(2, 3, 32, 32) if 'vgg' in name else torch.randn(2, 3, 16, 16)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x)  # check_trace: raises if the two runs' graphs differ
        assert str(traced.inlined_graph).count('aten::batch_norm') == n_bn
        want = model(x)  # with autograd off, folded: float rounding relative to the largest logit
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_zoo_block_training_step_unchanged():
    """The in-place residual add gives the same forward and gradients as the out-of-place sum."""
    torch.manual_seed(0)
    model = timm.create_model('fnl_test_resnet', rank_scale=0.5).train()
    block = model.layer2[0]
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    ref = copy.deepcopy(block)
    out = block(x)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    want = ref.act2(ref.bn2(ref.conv2(ref.act1(ref.bn1(ref.conv1(x_ref))))) + ref.downsample(x_ref))
    want.square().sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (n, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


class _Seq(nn.Sequential):
    pass


def _stack(cls=nn.Sequential):
    torch.manual_seed(0)
    return cls(nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3, padding=1), _bn(8), nn.ReLU(),
               fnl.FactorizedConv2d(8, 8, 3, padding=1, rank=2), _bn(8), nn.MaxPool2d(2), _bn(8)).eval()


def test_sequential_folds_each_conv_batchnorm_pair(monkeypatch):
    seq = _stack()
    with torch.no_grad():
        seq[0].running_var.fill_(2.0)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        want = seq(x)
        calls = _no_batchnorm(monkeypatch)
        got = fnl.sequential_conv_bn(seq, x)
        # the leading BatchNorm (no conv before it) and the one after the pool run; the two after convs fold
        assert len(calls) == 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    assert torch.equal(fnl.sequential_conv_bn(seq, x), seq(x)) and len(calls) == 8  # autograd on: seq(x)


@pytest.mark.parametrize('case', ['subclass', 'hook', 'global hook', 'module hook inside'])
def test_sequential_runs_whole_when_layer_by_layer_would_skip_something(case, monkeypatch):
    seq = _stack(_Seq if case == 'subclass' else nn.Sequential)
    seen = []
    if case == 'hook':
        seq.register_forward_hook(lambda *a: seen.append(1))
    if case == 'global hook':  # called for every module, the Sequential included
        handle = nn.modules.module.register_module_forward_hook(lambda m, *a: seen.append(m) if m is seq else None)
    if case == 'module hook inside':
        seq[2].register_forward_hook(lambda *a: seen.append(1))
    x = torch.randn(2, 6, 8, 8)
    try:
        with torch.no_grad():
            want = seq(x)
            n_seen = len(seen)
            calls = _no_batchnorm(monkeypatch)
            got = fnl.sequential_conv_bn(seq, x)
    finally:
        if case == 'global hook':
            handle.remove()
    assert torch.equal(got, want) if case != 'module hook inside' else torch.allclose(got, want, atol=1e-5)
    assert n_seen == (case != 'subclass') and len(seen) == 2 * n_seen
    assert len(calls) == (4 if case != 'module hook inside' else 3)  # the hooked pair is not folded


@pytest.mark.parametrize('trace', ['jit', 'compile'])
def test_sequential_runs_whole_in_a_trace(trace, monkeypatch):
    """A trace records the Sequential as the module it is (the same graph with and without autograd)."""
    seq = _stack()
    x = torch.randn(2, 6, 8, 8)
    whole = []
    real = nn.Sequential.forward
    monkeypatch.setattr(nn.Sequential, 'forward', lambda self, x: whole.append(1) or real(self, x))
    if trace == 'jit':
        monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with torch.no_grad():
        want = real(seq, x)
        assert torch.equal(fnl.sequential_conv_bn(seq, x), want)
    assert whole == [1]
