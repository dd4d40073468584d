"""The speed paths compute what the plain model computes (bench/README.md): the channels-last memory
format (fnl-train's default for factorized convs on the CPU, and its opt-out) leaves outputs, Frobenius
decay steps, state dicts, checkpoints, the inference form and export unchanged."""
import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl.conv as conv_module  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl.export import export_model  # noqa: E402
from fnl_timm import train as fnl_train  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

CL = torch.channels_last
TRAIN = ['--model', 'fnl_test_resnet', '--img-size', '16', '--batch-size', '32', '--workers', '0',
         '--limit-train-batches', '1', '--limit-val-batches', '1', '--no-progress', '--no-tensorboard',
         '--lr', '0.05', '--epochs', '1']


def _resnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('fnl_test_resnet', **kwargs)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.allclose(a, b, atol=atol, rtol=0), f'{(a - b).abs().max()}'


def test_channels_last_rule():
    fact, dense = _resnet(rank_scale=0.3), _resnet()
    cpu, gpu = torch.device('cpu'), torch.device('cuda')
    assert fnl_train.use_channels_last(None, fact, cpu) is True
    assert fnl_train.use_channels_last(None, dense, cpu) is True  # dense convs: faster channels-last too
    assert fnl_train.use_channels_last(None, fact, gpu) is False  # not measured on GPUs: unchanged
    assert fnl_train.use_channels_last(False, fact, cpu) is False  # --no-channels-last
    assert fnl_train.use_channels_last(False, dense, cpu) is False
    mlp = nn.Sequential(nn.Flatten(), fnl.FactorizedLinear(4, 4, rank=2))
    assert fnl_train.use_channels_last(None, mlp, cpu) is False  # no conv: nothing to gain
    assert fnl_train.use_channels_last(True, mlp, cpu) is True  # --channels-last
    assert fnl_train.use_channels_last(None, nn.Sequential(nn.Conv2d(3, 4, 3), mlp), cpu) is True
    tt = timm.create_model('fnl_wrn28_10', depth=10, width=1, conv='tt', rank_scale=0.5)
    assert fnl_train.use_channels_last(None, tt, cpu) is False  # tensor formats: not measured channels-last


def test_channels_last_flag_help_and_parsing():
    parser = fnl_train.build_parser()
    text = ' '.join(parser.format_help().split())
    assert '--channels-last, --no-channels-last' in text
    assert 'unset: on for a model with 2-d convs on the CPU' in text
    assert parser.parse_args([]).channels_last is None
    assert parser.parse_args(['--channels-last']).channels_last is True
    assert parser.parse_args(['--no-channels-last']).channels_last is False


def test_fnl_train_default_channels_last_and_opt_out_train_the_same(tmp_path):
    """Factorized on the CPU: channels-last unless --no-channels-last; the two runs (Frobenius decay on)
    end at the same weights (one step: the rounding differences of the two formats grow with every step),
    and the channels-last checkpoint loads into a contiguous model."""
    args = TRAIN + ['--rank-scale', '0.3', '--spectral', '--wd2fd', '--output', str(tmp_path)]
    on = fnl_train.run(args + ['--experiment', 'on'])
    off = fnl_train.run(args + ['--experiment', 'off', '--no-channels-last'])
    assert (on['channels_last'], off['channels_last']) == (True, False)
    a = torch.load(tmp_path / 'on' / 'last.pth.tar', weights_only=False)
    b = torch.load(tmp_path / 'off' / 'last.pth.tar', weights_only=False)
    assert a['args'].channels_last is True and b['args'].channels_last is False  # the resolved value is recorded
    assert a['state_dict']['conv1.weight'].is_contiguous(memory_format=CL)
    assert b['state_dict']['conv1.weight'].is_contiguous()
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k, v in a['state_dict'].items():
        _close(v.float(), b['state_dict'][k].float(), atol=1e-4)
    model = _resnet(rank_scale=0.3)
    model.load_state_dict(a['state_dict'])
    assert all(p.is_contiguous() for p in model.parameters())  # loading keeps the model's own format
    dense = fnl_train.run(TRAIN + ['--output', str(tmp_path), '--experiment', 'dense'])
    assert dense['channels_last'] is True  # the dense baseline runs in the same format


def test_memory_format_keeps_outputs_fd_steps_state_dict_and_forms(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    ref = _resnet(rank_scale=0.3, spectral=True)
    fast = copy.deepcopy(ref).to(memory_format=CL)
    assert fast.conv1.weight.is_contiguous(memory_format=CL)
    xc = x.contiguous(memory_format=CL)
    _close(ref.eval()(x), fast.eval()(xc))
    # training steps with Frobenius decay (coupled, through momentum): same parameters and FD norms
    for model, inp in ((ref, x), (fast, xc)):
        model.train()
        opt = torch.optim.SGD(fnl.param_groups(model, 1e-3, wd2fd=True), lr=0.1, momentum=0.9)
        fd = fnl.FrobeniusDecay(opt, model, coef=1e-2)
        for _ in range(3):
            fd.zero_grad()
            nn.functional.cross_entropy(model(inp), y).backward()
            fd.step()
    for p, q in zip(ref.parameters(), fast.parameters()):
        _close(p.detach(), q.detach(), atol=1e-5)
    layers = list(zip(fnl.factorized_layers(ref), fnl.factorized_layers(fast)))
    assert len(layers) == 8
    for a, b in layers:
        _close(fnl.frobenius_norm(a), fnl.frobenius_norm(b), atol=1e-5)
    ref.eval(), fast.eval()
    out = ref(x)
    # state dict: the same values; it loads into a contiguous model, which gives the same outputs
    sd = fast.state_dict()
    for k, v in ref.state_dict().items():
        _close(v.float(), sd[k].float())
    fresh = _resnet(rank_scale=0.3)
    fresh.load_state_dict(sd)
    _close(fresh.eval()(x), out)
    # the plain-torch inference form and a TorchScript export of the channels-last model
    inf = fnl.to_inference_form(copy.deepcopy(fast)).eval()
    _close(inf(xc), out)
    rep = export_model(fast, xc, tmp_path / 'm.pt', 'torchscript')
    assert rep['max_abs_diff'] < 1e-5


@pytest.mark.parametrize('square', [False, True])
@pytest.mark.parametrize('geometry', [dict(kernel_size=3, padding=1), dict(kernel_size=(1, 5), stride=(2, 1), padding=(0, 2)),
                                      dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1))])
def test_conv_weights_follow_a_channels_last_input(geometry, square, monkeypatch):
    """A channels-last input gets channels-last conv weights (the second one a view of ``U`` without ``S``),
    with the same outputs and gradients as an NCHW input, in training and in cached inference."""
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(6, 7, rank=3, square=square, path='factored', **geometry)
    x = torch.randn(2, 6, 9, 10, requires_grad=True)
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    assert not xc.is_contiguous()
    seen = []
    real_conv = conv_module.F.conv2d

    def spy(inp, weight, *args):
        seen.append((inp.is_contiguous(memory_format=CL), weight.is_contiguous(memory_format=CL),
                     weight.is_contiguous(), weight.untyped_storage().data_ptr()))
        return real_conv(inp, weight, *args)
    g = torch.randn(2, 7, *conv_module.conv_output_hw(layer, x.shape))
    monkeypatch.setattr(conv_module.F, 'conv2d', spy)
    grads = []
    for inp in (x, xc):
        layer.zero_grad(set_to_none=True)
        out = layer(inp)
        out.backward(g)
        grads.append((out.detach(), inp.grad, [p.grad for p in layer.parameters()]))
    with torch.no_grad():
        cached = [layer(xc), layer(xc), layer(x)]
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    _close(o1, o2), _close(gx1, gx2)
    for a, b in zip(gp1, gp2):
        _close(a, b)
    assert o2.is_contiguous(memory_format=CL)
    for c in cached[:2]:
        _close(c, o1)
    _close(cached[2], o1)
    # NCHW input: contiguous weights; channels-last input: channels-last weights, the second one U itself
    nchw, cl = seen[0:2], seen[2:4]
    assert [s[2] for s in nchw] == [True, True] and [s[0] for s in nchw] == [False, False]
    assert all(s[1] for s in cl) and not cl[0][2]
    assert cl[1][2] == (layer.kernel_size[0] == 1)  # (out, r, kh, 1) is both formats when kh == 1
    assert (cl[1][3] == layer.U.untyped_storage().data_ptr()) is not square
    # cached inference: built once for channels-last (same tensors on the second call), then rebuilt for NCHW
    inf = seen[4:]
    assert len(inf) == 6 and inf[0][3] == inf[2][3] and inf[1][3] == inf[3][3]
    assert inf[4][2] and inf[5][2] and not inf[0][2]


@pytest.mark.parametrize('kernel_size', [3, (3, 1), (1, 3), (2, 5)])
def test_channels_last_weights_have_canonical_strides_and_train_under_float16_autocast(kernel_size):
    """The channels-last weights carry torch's own channels-last strides (a view with another stride on a
    size-1 dim also counts as channels-last, but float16 backward on the CPU then fails with 'slow_conv2d:
    grad_weight must be contiguous'); a float16-autocast step on a channels-last input gives the NCHW
    input's gradients."""
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(4, 6, kernel_size, rank=2, square=True, path='factored')
    for w in layer._factor_conv_weights(True):
        assert w.stride() == torch.empty(w.shape, memory_format=CL).stride()
    x = torch.randn(2, 4, 8, 8)
    grads = []
    for inp in (x, x.contiguous(memory_format=CL)):
        layer.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.float16):
            out = layer(inp)
        out.float().square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2), (a - b).abs().max()


def test_compile_for_inference_refusals_leave_the_model_unchanged():
    tensor_model = nn.Sequential(fnl.TTConv2d(4, 4, 3, padding=1, rank_scale=0.5))
    with pytest.raises(ValueError, match='no plain-torch form'):
        fnl.compile_for_inference(tensor_model)
    assert isinstance(tensor_model[0], fnl.TTConv2d)


@pytest.mark.slow
def test_compile_for_inference_matches_the_eager_model():
    torch.manual_seed(2)
    model = _resnet(rank_scale=0.3, spectral=True).train()
    with torch.no_grad():  # BatchNorm statistics away from the initial ones, so that folding does something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 16, 16)
    compiled = fnl.compile_for_inference(model)
    assert model.training and sum(isinstance(m, fnl.FactorizedConv2d) for m in model.modules()) == 8
    inner = compiled._orig_mod  # the compiled copy: plain convs, BatchNorm folded, channels-last weights
    assert not any(isinstance(m, (fnl.FactorizedLayer, nn.BatchNorm2d)) for m in inner.modules())
    convs = [m for m in inner.modules() if isinstance(m, nn.Conv2d)]
    form = fnl.to_inference_form(copy.deepcopy(model))
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in form.modules()) > 8
    assert all(c.weight.is_contiguous(memory_format=CL) for c in convs)
    with torch.no_grad():
        want = model.eval()(x)
        _close(compiled(x), want, atol=1e-4)
        _close(compiled(x.contiguous(memory_format=CL)), want, atol=1e-4)
    plain = fnl.compile_for_inference(model, fold_bn=False, channels_last=False)._orig_mod
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == n_bn > 0
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))


def _first_conv_input_format(model: nn.Module, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
    seen = []
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    hook = stem.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=CL)))
    with torch.no_grad():
        out = model.eval()(x)
    hook.remove()
    return seen[0], out


@pytest.mark.parametrize('name,kwargs', [('fnl_test_resnet', dict(rank_scale=0.3)),
                                         ('fnl_test_resnet', dict()),  # dense
                                         ('fnl_vgg19', dict(rank_scale=0.05)),
                                         ('fnl_wrn28_10', dict(depth=10, width=1, rank_scale=0.3))])
def test_zoo_models_take_cpu_inputs_channels_last(name, kwargs):
    """timm.create_model users get the channels-last speed-up with their own loop: a zoo model (dense or
    factorized) converts a 4-d CPU input itself (same outputs); ``channels_last_inputs = False`` turns it off."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    assert model.channels_last_inputs is True
    x = torch.randn(2, 3, 32, 32)
    fast, out = _first_conv_input_format(model, x)
    model.channels_last_inputs = False
    slow, ref = _first_conv_input_format(model, x)
    assert (fast, slow) == (True, False)
    _close(out, ref, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_zoo_input_format_default_follows_the_layers():
    assert timm.create_model('fnl_test_resnet').channels_last_inputs is True  # dense convs too
    tt = timm.create_model('fnl_wrn28_10', depth=10, width=1, conv='tt', rank_scale=0.5)
    assert tt.channels_last_inputs is False  # tensor formats: not measured channels-last
    # loading a checkpoint adopts its ranks; the input format stays
    fact = _resnet(rank_scale=0.3)
    dense = _resnet()
    dense.channels_last_inputs = False  # the user's choice survives loading (dense or factorized)
    dense.load_state_dict(fact.state_dict())
    assert dense.channels_last_inputs is False and fnl.factorized_layers(dense)
    fact.load_state_dict(_resnet().state_dict())
    assert fact.channels_last_inputs is True and not fnl.factorized_layers(fact)
    # fnl-train's flags set it
    model = _resnet(rank_scale=0.3)
    fnl_train._set_input_format(model, False)
    assert model.channels_last_inputs is False
    fnl_train._set_input_format(nn.Linear(2, 2), True)  # a model without the attribute is left alone


def test_zoo_channels_last_inputs_under_fx_torchscript_and_export(tmp_path):
    """The conversion stays out of a torch.fx trace (BatchNorm folding) and scripts; outputs unchanged."""
    model = _resnet(rank_scale=0.3, spectral=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        folded = fnl.fold_batchnorm(fnl.to_inference_form(copy.deepcopy(model)))
        _close(folded(x), ref, atol=1e-4)
        scripted = torch.jit.script(model)
        _close(scripted(x), ref, atol=1e-5)
    rep = export_model(model, x, tmp_path / 'm.pt2', 'export')
    assert rep['max_abs_diff'] < 1e-4


def test_torchcompile_flag_validation(capsys):
    for argv, msg in ((['--torchcompile-mode', 'reduce-overhead'], "--torchcompile-mode 'reduce-overhead' needs "
                       "--torchcompile"), (['--torchcompile', 'no-such-backend'], "--torchcompile 'no-such-backend' "
                                           "is not a torch.compile backend; choose from ")):
        with pytest.raises(SystemExit) as e:
            fnl_train.run(TRAIN + argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.slow
def test_torchcompile_trains_like_eager_and_saves_the_plain_model(tmp_path, monkeypatch):
    """--torchcompile: the compiled forward/backward with the eager FD optimizer step ends where the eager
    run ends (up to the compiler's rounding), and the checkpoint holds the plain model's keys."""
    import torch._dynamo.utils
    # one step: compiling draws from torch's random generator, so later batches' augmentations differ
    args = TRAIN + ['--rank-scale', '0.3', '--spectral', '--wd2fd', '--output', str(tmp_path)]
    fnl_train.run(args + ['--experiment', 'eager'])
    calls, real = [], torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: calls.append(kw) or real(model, **kw))
    torch._dynamo.utils.counters.clear()
    fnl_train.run(args + ['--experiment', 'compiled', '--torchcompile', '--torchcompile-mode', 'default'])
    assert calls == [dict(backend='inductor', mode='default')]
    assert torch._dynamo.utils.counters['frames']['ok'] > 0  # the training steps ran through dynamo
    a = torch.load(tmp_path / 'eager' / 'last.pth.tar', weights_only=False)
    b = torch.load(tmp_path / 'compiled' / 'last.pth.tar', weights_only=False)
    assert b['args'].torchcompile == 'inductor' and a['args'].torchcompile is None
    assert a['state_dict'].keys() == b['state_dict'].keys()  # no '_orig_mod.' prefix
    for k, v in a['state_dict'].items():
        _close(v.float(), b['state_dict'][k].float(), atol=1e-4)
