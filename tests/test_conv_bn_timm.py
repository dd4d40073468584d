"""The weights kept between eager inference calls (folded BatchNorms, a factorized conv's two weights)
follow timm's model-EMA updates: ``train.py --model-ema`` validates the EMA copy under ``torch.no_grad``
after updating it in place, which must not serve the previous EMA weights (docs/speed.md)."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.utils import model_ema  # noqa: E402

import fnl_timm  # noqa: E402,F401  (registers the zoo models)

EMAS = {
    "ModelEmaV3-foreach": lambda m: model_ema.ModelEmaV3(m, decay=0.5, foreach=True),
    "ModelEmaV3-loop": lambda m: model_ema.ModelEmaV3(m, decay=0.5, foreach=False),
    "ModelEmaV2": lambda m: model_ema.ModelEmaV2(m, decay=0.5),
}


@pytest.mark.parametrize("rank_scale", [None, 0.111], ids=["dense", "factorized"])
@pytest.mark.parametrize("ema_kind", list(EMAS))
def test_kept_weights_follow_ema_updates(ema_kind, rank_scale):
    torch.manual_seed(0)
    model = timm.create_model("fnl_resnet20", rank_scale=rank_scale)
    ema = EMAS[ema_kind](model)
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
