"""Exact behaviour of ``fnl.tensorize`` and ``fnl.solve_tensor_scale`` (issue 19: mutation survivors).

Which layers are converted and which kept, the new layers equal to the ones built directly with the same
arguments (fresh, spectral and custom inits, from_dense), dtype / device follow the model, parameter
counts equal the layers' own counts, the solved scale is the closest step, and the exact errors.
"""
import copy

import pytest
import torch
from torch import nn

import fnl
from fnl.tensor_conv import TTConv2d, TuckerConv2d

FORMATS = {"tt": TTConv2d, "tucker": TuckerConv2d}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1, bias=False)
        self.same = nn.Conv2d(8, 8, 3, padding="same")  # string padding: kept
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # groups 2: kept
        self.circ = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")  # not zero padding: kept
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)  # not a conv: kept
        self.emb = nn.Embedding(5, 8)  # kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (self.stem, self.point, self.same, self.grouped, self.circ, self.last):
            x = m(x)
        return self.fc(x.mean((2, 3)))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["tt", "tucker", None])
def test_tensorize_converts_exactly_the_eligible_convs(fmt):
    torch.manual_seed(0)
    model = _Net()
    kept = {n: getattr(model, n) for n in ("same", "grouped", "circ", "fc", "emb")}
    old_bias = model.stem.bias.detach().clone()
    kwargs = {} if fmt is None else {"tensor_format": fmt}
    out = fnl.tensorize(model, rank_scale=0.5, **kwargs)
    assert out is model
    cls = FORMATS[fmt or "tt"]  # the default format is tt
    for n in ("stem", "point", "last"):
        assert type(getattr(model, n)) is cls, n
    for n, m in kept.items():
        assert getattr(model, n) is m, n
    assert torch.equal(model.stem.bias, old_bias)
    assert model.point.bias is None
    assert model(torch.randn(1, 4, 5, 5)).shape == (1, 3)


def test_tensorize_exclude_and_include():
    model = _Net()
    point = model.point
    fnl.tensorize(model, rank_scale=0.5, exclude=["point"])
    assert model.point is point
    assert type(model.stem) is TTConv2d and type(model.last) is TTConv2d
    model = _Net()
    stem, last = model.stem, model.last
    fnl.tensorize(model, rank_scale=0.5, include="point")
    assert type(model.point) is TTConv2d
    assert model.stem is stem and model.last is last


def test_tensorize_include_selecting_no_conv_or_linear_is_an_error():
    model = _Net()
    with pytest.raises(ValueError) as e:
        fnl.tensorize(model, rank_scale=0.5, include="emb")
    assert "include='emb' selects no nn.Linear / nn.Conv2d (groups=1) in the model" in str(e.value)
    assert "Embedding" not in str(e.value)
    with pytest.raises(ValueError, match=r"include='emb' selects no nn\.Linear / nn\.Conv2d"):
        fnl.solve_tensor_scale(_Net(), 0.5, "tt", include="emb")
    # a selection with convs that cannot be converted (or only a Linear) is an error, not a silent no-op
    for include in ("fc", ["same", "grouped", "circ"]):
        model = _Net()
        before = list(model.children())
        with pytest.raises(ValueError) as e:
            fnl.tensorize(model, rank_scale=0.5, include=include)
        assert str(e.value) == (f"include={include!r} selects no nn.Conv2d that tensorize converts (groups 1, "
                                "padding_mode 'zeros', numeric padding)")
        assert list(model.children()) == before


def test_tensorize_shared_conv_becomes_one_shared_layer():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    fnl.tensorize(model, tensor_format="tucker", rank_scale=0.5)
    assert type(model[0]) is TuckerConv2d
    assert model[0] is model[2]
    assert _params(model) == _params(model[0])


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
@pytest.mark.parametrize("spectral", [False, True])
def test_tensorize_fresh_layer_equals_direct_constructor(fmt, spectral):
    cls = FORMATS[fmt]
    conv = nn.Conv2d(8, 4, 3, stride=2, padding=1, dilation=2)
    model = nn.Sequential(conv)
    torch.manual_seed(5)
    fnl.tensorize(model, tensor_format=fmt, rank_scale=0.5, spectral=spectral)
    torch.manual_seed(5)
    ref = cls(8, 4, 3, 2, 1, 2, 1, True, rank_scale=0.5, spectral=spectral)
    with torch.no_grad():
        ref.bias.copy_(conv.bias)
    new = model[0]
    assert new.spectral is spectral
    assert (new.stride, new.padding, new.dilation, new.ranks) == ((2, 2), (1, 1), (2, 2), ref.ranks)
    x = torch.randn(1, 8, 9, 9)
    assert new(x).shape == conv(x).shape == (1, 4, 4, 4)
    _same_state(new, ref)
    # neither the other init (spectral flipped) nor a projection of the conv's weights
    torch.manual_seed(5)
    other = cls(8, 4, 3, 2, 1, 2, 1, True, rank_scale=0.5, spectral=not spectral)
    assert not torch.equal(other.dense_weight(), new.dense_weight())
    assert not torch.allclose(cls.from_dense(conv, rank_scale=0.5).dense_weight(), new.dense_weight())


@pytest.mark.parametrize("spectral", [False, True])
def test_tensorize_passes_init_and_depthwise_init(spectral):
    def init(t):
        with torch.no_grad():
            return t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape).sin())

    def dw_init(t):
        with torch.no_grad():
            return t.fill_(0.25)

    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    torch.manual_seed(3)
    fnl.tensorize(model, rank_scale=1.0, spectral=spectral, init=init, depthwise_init=dw_init)
    new = model[0]
    assert new.init is init and new.depthwise_init is dw_init
    assert torch.equal(new.depthwise, torch.full_like(new.depthwise, 0.25))
    torch.manual_seed(3)
    ref = TTConv2d(8, 8, 3, padding=1, rank_scale=1.0, spectral=spectral, init=init, depthwise_init=dw_init)
    torch.testing.assert_close(new.dense_weight(), ref.dense_weight(), rtol=0, atol=0)
    torch.manual_seed(3)
    default = TTConv2d(8, 8, 3, padding=1, rank_scale=1.0, spectral=spectral, depthwise_init=dw_init)
    assert not torch.allclose(new.dense_weight(), default.dense_weight())


def test_tensorize_follows_the_model_dtype_and_device():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, dtype=torch.float64))
    with torch.device("meta"):  # a default device elsewhere must not move the layer
        fnl.tensorize(model, rank_scale=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model = nn.Sequential(nn.Conv2d(4, 8, 3, dtype=torch.float64))
    fnl.tensorize(model, rank_scale=0.5, from_dense=True)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_tensorize_explicit_rank(fmt):
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
    fnl.tensorize(model, tensor_format=fmt, rank=2)
    n = 2 if fmt == "tt" else 3
    assert model[0].ranks == (2,) * n and model[1].ranks == (2,) * n
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    fnl.tensorize(model, tensor_format=fmt, rank=1, from_dense=True)
    assert model[0].ranks == (1,) * n


@pytest.mark.parametrize("fmt,rank", [("tt", (4, 4)), ("tucker", None)])
def test_tensorize_from_dense_full_rank_reproduces_the_dense_outputs(fmt, rank):
    torch.manual_seed(1)
    convs = [nn.Conv2d(8, 8, 1, dtype=torch.float64), nn.Conv2d(8, 8, 1, stride=2, bias=False, dtype=torch.float64)]
    dense = nn.Sequential(*convs)
    model = copy.deepcopy(dense)
    if rank is None:
        fnl.tensorize(model, tensor_format=fmt, rank_scale=1.0, from_dense=True)
    else:
        fnl.tensorize(model, tensor_format=fmt, rank=rank, from_dense=True)
    assert all(type(m) is FORMATS[fmt] for m in model)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-9, atol=1e-9)
    assert torch.equal(model[0].bias, dense[0].bias)
    assert model[1].bias is None


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
@pytest.mark.parametrize("kwargs", [{"rank_scale": 0.5}, {"rank": 2}])
def test_tensorize_from_dense_equals_the_layer_projection(fmt, kwargs):
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(copy.deepcopy(conv))
    fnl.tensorize(model, tensor_format=fmt, from_dense=True, **kwargs)
    _same_state(model[0], FORMATS[fmt].from_dense(conv, **kwargs))


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_layer_counts_equal_the_layers_own_counts(fmt):
    from fnl.tensorize import _layer_count
    for args in [(8, 8, 3), (4, 8, 1), (8, 4, (3, 1)), (8, 4, (1, 3)), (6, 12, 3)]:
        for bias in (True, False):
            conv = nn.Conv2d(*args, bias=bias)
            for s in (1e-9, 0.3, 0.5, 1.0):
                new = FORMATS[fmt](*args, bias=bias, rank_scale=s)
                assert _layer_count(fmt, conv, s) == _params(new), (args, bias, s)


def _fixed_model():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3, padding=1),
                         nn.Conv2d(32, 32, 1), nn.Conv2d(32, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4, 10))


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_solve_tensor_scale_is_the_closest_step_and_tensorize_uses_it(fmt):
    dense = _fixed_model()
    total = _params(dense)

    def ratio_at(s, **kw):
        m = fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, rank_scale=s, **kw)
        return _params(m) / total

    for target, kw in [(0.3, {}), (0.44, {"include": ["2"]}), (0.35, {"exclude": "0"})]:
        s = fnl.solve_tensor_scale(dense, target, fmt, **kw)
        assert 0 < s <= 1
        got = ratio_at(s, **kw)
        best = min(abs(ratio_at(g / 40, **kw) - target) for g in range(1, 41))
        assert abs(got - target) <= best + 1e-12, (target, kw)
        model = fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, target_ratio=target, **kw)
        assert _params(model) / total == got
        kinds = [type(m).__name__ for m in model]
        want = [type(m).__name__ for m in fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, rank_scale=s, **kw)]
        assert kinds == want
        assert [getattr(m, "ranks", None) for m in model] == [
            getattr(m, "ranks", None) for m in fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt,
                                                             rank_scale=s, **kw)]
    # exclude changes the solved scale (it is passed on)
    assert fnl.solve_tensor_scale(dense, 0.35, fmt) != fnl.solve_tensor_scale(dense, 0.35, fmt, exclude="0")


def test_tensorize_target_ratio_passes_include_exclude():
    dense = _fixed_model()
    total = _params(dense)
    a = fnl.tensorize(copy.deepcopy(dense), target_ratio=0.44, include=["2"])
    assert [type(m) for m in a[:4]] == [nn.Conv2d, nn.BatchNorm2d, TTConv2d, nn.Conv2d]
    assert _params(a) / total == pytest.approx(0.44, abs=0.01)
    b = fnl.tensorize(copy.deepcopy(dense), tensor_format="tucker", target_ratio=0.35, exclude="0")
    assert [type(m) for m in b[:5]] == [nn.Conv2d, nn.BatchNorm2d, TuckerConv2d, TuckerConv2d, nn.Conv2d]
    assert _params(b) / total == pytest.approx(0.35, abs=0.01)


def test_solve_tensor_scale_counts_factorized_layers_at_their_dense_size():
    dense = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 64))
    fact = copy.deepcopy(dense)
    fnl.factorize(fact, rank=1, include="2")
    assert _params(fact) < _params(dense)
    for target in (0.59, 0.62, 0.64):
        assert fnl.solve_tensor_scale(fact, target, "tt") == fnl.solve_tensor_scale(dense, target, "tt")


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_solve_tensor_scale_range_ends_and_errors(fmt):
    dense = _fixed_model()
    total = _params(dense)
    lowest = _params(fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, rank=1)) / total
    highest = _params(fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, rank_scale=1.0)) / total
    assert fnl.solve_tensor_scale(dense, highest, fmt) == 1.0 or _params(fnl.tensorize(
        copy.deepcopy(dense), tensor_format=fmt, rank_scale=fnl.solve_tensor_scale(dense, highest, fmt))) / total == highest
    msg = (f"cannot be reached with tensor_format={fmt!r}: this model's ratios run from {lowest:.6g} (every rank 1) "
           f"to {highest:.6g} (scale 1.0)")
    for bad in (highest * 1.001, lowest * 0.999):
        with pytest.raises(ValueError) as e:
            fnl.solve_tensor_scale(dense, bad, fmt)
        assert str(e.value) == f"target_ratio={bad} " + msg
        with pytest.raises(ValueError, match="cannot be reached"):
            fnl.tensorize(copy.deepcopy(dense), tensor_format=fmt, target_ratio=bad)


def test_no_conv_to_tensorize_errors():
    msg = "the model has no nn.Conv2d to tensorize, so no target_ratio can be reached"
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError) as e:
        fnl.solve_tensor_scale(model, 0.5, "tt")
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        fnl.tensorize(model, target_ratio=0.5)
    assert str(e.value) == msg
    # rank / rank_scale on such a model: nothing to do, the model comes back unchanged
    before = list(model)
    assert fnl.tensorize(model, rank_scale=0.5) is model and list(model) == before


def test_tensorize_argument_errors():
    with pytest.raises(ValueError) as e:
        fnl.tensorize(_Net(), rank=2, rank_scale=0.5)
    assert str(e.value) == ("give exactly one of rank, rank_scale or target_ratio; got rank=2, rank_scale=0.5, "
                            "target_ratio=None")
    with pytest.raises(ValueError) as e:
        fnl.tensorize(_Net())
    assert "give exactly one of rank, rank_scale or target_ratio" in str(e.value)
    with pytest.raises(ValueError) as e:
        fnl.tensorize(_Net(), rank_scale=0.5, spectral=True, from_dense=True)
    assert str(e.value) == ("spectral and from_dense exclude each other: spectral decomposes a fresh dense init, "
                            "from_dense the weights already in the model")
    for fmt in ("cp", "TT", None):
        with pytest.raises(ValueError, match=r"tensor_format must be one of \('tt', 'tucker'\), got"):
            fnl.tensorize(_Net(), tensor_format=fmt, rank_scale=0.5)
        with pytest.raises(ValueError, match=r"tensor_format must be one of \('tt', 'tucker'\), got"):
            fnl.solve_tensor_scale(_Net(), 0.5, fmt)
    # rank_scale is checked even when there is no conv to build (tensor formats: in (0, 1])
    for bad in (1.5, 0.0, -0.5):
        with pytest.raises(ValueError, match="rank_scale"):
            fnl.tensorize(nn.Sequential(nn.Linear(2, 2)), rank_scale=bad)
    with pytest.raises(ValueError, match="target_ratio"):
        fnl.solve_tensor_scale(_fixed_model(), -1.0, "tt")
