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
