"""The weights kept between eager inference calls (folded BatchNorms, a factorized conv's two weights;
docs/speed.md): they follow timm's model-EMA updates (``train.py --model-ema`` validates the EMA copy
under ``torch.no_grad`` after updating it in place), and ``fnl.keep_inference_weights(model, False)``
makes them afresh on every call, for code that edits parameters through ``.data``, which no version
counter sees."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fnl
from fnl.conv_bn import _FOLDED
from test_graph_capture import LAYERS

EMAS = {
    "ModelEmaV3-foreach": lambda ema, m: ema.ModelEmaV3(m, decay=0.5, foreach=True),
    "ModelEmaV3-loop": lambda ema, m: ema.ModelEmaV3(m, decay=0.5, foreach=False),
    "ModelEmaV2": lambda ema, m: ema.ModelEmaV2(m, decay=0.5),
}


@pytest.mark.parametrize("rank_scale", [None, 0.111], ids=["dense", "factorized"])
@pytest.mark.parametrize("ema_kind", list(EMAS))
def test_kept_weights_follow_ema_updates(ema_kind, rank_scale):
    timm = pytest.importorskip("timm")
    from timm.utils import model_ema

    import fnl_timm  # noqa: F401  (registers the zoo models)
    torch.manual_seed(0)
    model = timm.create_model("fnl_resnet20", rank_scale=rank_scale)
    ema = EMAS[ema_kind](model_ema, model)
    ema.module.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = ema.module(x)  # the folded weights are made and kept here
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()  # train mode: the running statistics move too
    opt.step()
    ema.update(model)
    with torch.no_grad():
        after = ema.module(x)
        reference = copy.deepcopy(ema.module)  # a copy carries no kept weights
        reference.set_bn_folding(False)
        want = reference(x)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)


def _kept(conv):
    return conv in _FOLDED or "_conv_weight_cache" in conv.__dict__


@pytest.mark.parametrize("layer", list(LAYERS))
def test_keeping_off_follows_edits_through_data(layer):
    torch.manual_seed(0)
    run, reference, conv = LAYERS[layer]()
    holder = nn.Sequential(conv)
    x = torch.randn(2, 4, 7, 7)
    weight = conv.V if isinstance(conv, fnl.FactorizedConv2d) else conv.weight
    with torch.no_grad():
        first = run(x)
        assert _kept(conv)
        weight.data.mul_(1.5)  # ``.data`` has its own version counter: nothing sees this edit
        assert torch.equal(run(x), first)  # kept (the default): the previous weights, as documented
        assert fnl.keep_inference_weights(holder, False) is holder
        assert not _kept(conv)  # what was kept is dropped
        edited = run(x)
        weight.data.mul_(2.0)
        twice = run(x)
        assert not _kept(conv)
    with torch.enable_grad():
        want = reference(x).detach()
    assert not torch.allclose(edited, first, atol=1e-3)
    torch.testing.assert_close(twice, want, rtol=1e-4, atol=1e-5)
    # the setting travels with the layer; turned on again, the weights are kept again
    for copied in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert copied.keep_inference_weights is False
    fnl.keep_inference_weights(holder)
    with torch.no_grad():
        torch.testing.assert_close(run(x), want, rtol=1e-4, atol=1e-5)
    assert _kept(conv)


def test_keep_inference_weights_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fnl.keep_inference_weights(object())
    with pytest.raises(TypeError, match="enable must be True or False"):
        fnl.keep_inference_weights(nn.Conv2d(1, 1, 1), enable="no")


def _zoo(**kwargs):
    timm = pytest.importorskip("timm")
    import fnl_timm  # noqa: F401  (registers the zoo models)
    torch.manual_seed(0)
    return timm.create_model("fnl_resnet20", **kwargs).eval()


def _fresh(model, x):
    """The output with nothing kept: a copy with keeping off."""
    reference = fnl.keep_inference_weights(copy.deepcopy(model), False)
    with torch.no_grad():
        return reference(x)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_kept_weights_follow_fused_optimizer_steps(opt_cls):
    """A fused optimizer updates the parameters without bumping their version counters: the optimizer
    step itself must make the kept weights (factor convs and folded BatchNorms) be made again."""
    model = _zoo(rank_scale=0.111)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)  # kept here
    opt = opt_cls(model.parameters(), lr=1e-3, fused=True)
    version = model.layer1[0].conv1.U._version
    model.train()  # batch statistics: gradients of a sane size
    model(x).logsumexp(1).mean().backward()
    model.eval()
    opt.step()
    assert model.layer1[0].conv1.U._version == version  # nothing for a version key to see
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after, _fresh(model, x), rtol=1e-5, atol=1e-5)


def test_kept_weights_of_a_square_layer_under_autocast_are_not_reused_in_float32():
    """U @ S is made in bfloat16 under autocast: a later float32 call must not reuse it."""
    model = _zoo(rank_scale=0.111, square=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _fresh(model, x), rtol=1e-5, atol=1e-5)
    layer = fnl.FactorizedConv2d(4, 4, 3, padding=1, rank=2, square=True).eval()
    y = torch.randn(1, 4, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(y)
    with torch.no_grad():
        torch.testing.assert_close(layer(y), _fresh(layer, y))  # ran: no bfloat16 weight kept for it


@pytest.mark.parametrize("name", ["layer1.0.conv1.V", "conv1.weight"], ids=["factor", "folded-stem"])
def test_kept_weights_follow_tensors_passed_to_functional_call(name):
    """A new tensor per call (torch.func.functional_call) often gets the address and id of the one freed
    after the previous call, with the same version 0: every call must compute with the tensor it gets."""
    from torch.func import functional_call
    model = _zoo(rank_scale=0.111)
    x = torch.randn(2, 3, 32, 32)
    base = model.get_parameter(name).detach().clone()
    scales = [1.0 + 0.05 * i for i in range(40)]
    with torch.no_grad():
        outs = [functional_call(model, {name: base * s}, (x,)) for s in scales]
    with torch.enable_grad():  # nothing is kept or folded with autograd on
        refs = [functional_call(model, {name: base * s}, (x,)).detach() for s in scales]
    stale = [i for i, (o, r) in enumerate(zip(outs, refs)) if not torch.allclose(o, r, rtol=1e-4, atol=1e-3)]
    assert stale == []
