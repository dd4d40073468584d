"""Exact behaviour of the tensor-format convs ``fnl.TTConv2d`` / ``fnl.TuckerConv2d``: construction (tests that
kill the mutants of ``fnl/tensor_conv.py`` the rest of the suite let through, ``make mutate``).

The exact errors of the abstract base, ``from_dense``, ``inference_form``, ``set_matrix_`` and the mode and
rank arguments; ``extra_repr``; the core parameters; the default, spectral and custom inits as exact draws;
constructor attributes, shapes, dtypes and devices; the TT and Tucker rank bounds. The conversions, counts
and Frobenius-decay gradients are in ``test_mutants_tensor_conv_maths.py``.
"""
import math

import pytest
import torch
from torch import nn

import fnl
from fnl.tensor_conv import TensorConv2d, TTConv2d, TuckerConv2d

CLASSES = [TTConv2d, TuckerConv2d]


IDS = ["tt", "tucker"]


def _full_ranks(cls, out_modes, in_modes):
    n = [o * i for o, i in zip(out_modes, in_modes)]
    if cls is TTConv2d:
        return (min(n[0], n[1] * n[2]), min(n[0] * n[1], n[2]))
    return tuple(n)


def _cores(layer):
    return [p.detach().clone() for p in layer.factor_parameters()]


# --- errors ------------------------------------------------------------------------------------


def test_abstract_base_refuses_construction_and_from_dense():
    with pytest.raises(TypeError, match="abstract"):
        TensorConv2d(4, 6, 3, rank=2)
    with pytest.raises(TypeError, match=r"^TensorConv2d is abstract: use TTConv2d\.from_dense or "
                                        r"TuckerConv2d\.from_dense$"):
        TensorConv2d.from_dense(nn.Conv2d(4, 6, 3), rank=2)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_dense_refuses_what_it_cannot_represent(cls):
    name = cls.__name__
    with pytest.raises(TypeError, match=r"^layer must be an nn\.Conv2d, got Linear$"):
        cls.from_dense(nn.Linear(4, 6), rank=2)
    with pytest.raises(TypeError, match=r"^layer must be an nn\.Conv2d, got Conv1d$"):
        cls.from_dense(nn.Conv1d(4, 6, 3), rank=2)
    with pytest.raises(ValueError, match=rf"^layer\.groups must be 1 for {name}, got 2$"):
        cls.from_dense(nn.Conv2d(4, 6, 3, groups=2), rank=2)
    # a numeric padding with another padding mode: refused here (the layer itself only has zero padding)
    for mode in ("reflect", "circular", "replicate"):
        with pytest.raises(ValueError, match=rf"^layer must have padding_mode 'zeros' and numeric padding for "
                                             rf"{name}, got padding_mode='{mode}', padding=\(1, 2\)$"):
            cls.from_dense(nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode=mode), rank=2)
    # string padding with zero padding mode: refused too
    for pad in ("same", "valid"):
        with pytest.raises(ValueError, match=rf"^layer must have padding_mode 'zeros' and numeric padding for "
                                             rf"{name}, got padding_mode='zeros', padding='{pad}'$"):
            cls.from_dense(nn.Conv2d(4, 6, 3, padding=pad), rank=2)


@pytest.mark.parametrize("cls,fmt", [(TTConv2d, "tt"), (TuckerConv2d, "tucker")], ids=IDS)
def test_inference_form_is_refused_with_the_alternatives(cls, fmt):
    layer = cls(4, 6, 3, rank=2)
    expected = (f"{cls.__name__} has no plain-torch inference form that keeps its {fmt} cores; keep the layer "
                "(it runs in eager, TorchScript and export), or convert it to its dense conv with fnl.collapse / "
                "to_dense()")
    with pytest.raises(ValueError) as info:
        layer.inference_form()
    assert str(info.value) == expected


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_set_matrix_and_weight_refuse_bad_shapes_and_values(cls):
    layer = cls(8, 12, 3, rank=2)
    with pytest.raises(ValueError, match=r"^matrix must have shape \(12, 8\), got \(8, 12\)$"):
        layer.set_matrix_(torch.zeros(8, 12))
    bad = torch.zeros(12, 8)
    bad[3, 1] = float("nan")
    before = _cores(layer)
    with pytest.raises(ValueError, match=r"^matrix has non-finite values \(inf or nan\)"):
        layer.set_matrix_(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, _cores(layer)))  # nothing was written
    with pytest.raises(ValueError, match=r"^weight must have shape \(12, 8, 3, 3\), got \(12, 8, 1, 1\)$"):
        layer.set_from_weight_(torch.zeros(12, 8, 1, 1))


# --- repr and accessors ------------------------------------------------------------------------


def test_extra_repr_lists_the_geometry_and_only_non_default_options():
    assert repr(TTConv2d(8, 12, (3, 1), stride=2, padding=(1, 0), bias=False, rank=2, path="dense")) == (
        "TTConv2d(8, 12, kernel_size=(3, 1), stride=(2, 2), ranks=(2, 2), out_modes=(3, 2, 2), "
        "in_modes=(2, 2, 2), padding=(1, 0), bias=False, path='dense')")
    assert repr(TuckerConv2d(8, 12, 3, rank=(2, 3, 2))) == (
        "TuckerConv2d(8, 12, kernel_size=(3, 3), stride=(1, 1), ranks=(2, 3, 2), out_modes=(3, 2, 2), "
        "in_modes=(2, 2, 2))")
    assert repr(TTConv2d(8, 12, 3, rank=(3, 2), padding=2, dilation=2, path="factored")) == (
        "TTConv2d(8, 12, kernel_size=(3, 3), stride=(1, 1), ranks=(3, 2), out_modes=(3, 2, 2), "
        "in_modes=(2, 2, 2), padding=(2, 2), dilation=(2, 2), path='factored')")
    # a 1x1 kernel has no depthwise part: its dilation has no effect and is reset (not shown)
    one = TuckerConv2d(8, 12, 1, rank=2, dilation=2)
    assert one.dilation == (1, 1) and one.depthwise is None and not one.has_depthwise
    assert one.extra_repr() == ("8, 12, kernel_size=(1, 1), stride=(1, 1), ranks=(2, 2, 2), out_modes=(3, 2, 2), "
                                "in_modes=(2, 2, 2)")


@pytest.mark.parametrize("cls,names", [(TTConv2d, ["core1", "core2", "core3"]),
                                       (TuckerConv2d, ["core", "factor1", "factor2", "factor3"])], ids=IDS)
def test_factors_are_the_core_parameters(cls, names):
    layer = cls(8, 12, 3, rank=2)
    f = layer.factors()
    assert isinstance(f, tuple) and len(f) == len(names)
    assert all(a is getattr(layer, n) for a, n in zip(f, names))
    assert all(a is b for a, b in zip(f, layer.factor_parameters()))
    # the depthwise filters and the bias are not factors
    assert {id(p) for p in f}.isdisjoint({id(layer.depthwise), id(layer.bias)})
    assert fnl.factor_parameter_names(nn.Sequential(layer)) == {f"0.{n}" for n in names}


# --- from_dense / to_dense ---------------------------------------------------------------------


def _kaiming(shape, dtype):
    w = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's default
    return w


@pytest.mark.parametrize("cls,power", [(TTConv2d, 6), (TuckerConv2d, 8)], ids=IDS)
@pytest.mark.parametrize("kernel", [(3, 2), (1, 1)])
def test_default_init_is_the_documented_sequence_of_draws(cls, power, kernel):
    """Depthwise filters and the 1x1 matrix get nn.Conv2d's init (fan-in kh kw and in); every core is
    N(0, std²) with r_1 r_2 std⁶ (TT) / R_1 R_2 R_3 std⁸ (Tucker) the mean square of that drawn matrix;
    the bias is U(+-1/sqrt(in kh kw)), as nn.Conv2d's."""
    dtype = torch.float64
    ranks = (2, 3) if cls is TTConv2d else (2, 3, 2)
    torch.manual_seed(7)
    layer = cls(8, 12, kernel, rank=ranks, dtype=dtype)
    torch.manual_seed(7)
    depthwise = _kaiming((8, 1, *kernel), dtype) if kernel != (1, 1) else None
    dense = _kaiming((12, 8, 1, 1), dtype)
    std = (float(dense.square().mean()) / math.prod(ranks)) ** (1 / power)
    cores = [torch.empty(p.shape, dtype=dtype).normal_(0.0, std) for p in layer.factor_parameters()]
    bound = 1 / math.sqrt(8 * kernel[0] * kernel[1])
    bias = torch.empty(12, dtype=dtype).uniform_(-bound, bound)
    if depthwise is None:
        assert layer.depthwise is None
    else:
        assert torch.equal(layer.depthwise, depthwise)
    for p, c in zip(layer.factor_parameters(), cores):
        assert torch.equal(p.detach(), c)
    assert torch.equal(layer.bias.detach(), bias)
    # the bounds themselves: fan-in 8 of the 1x1 matrix, 8 kh kw of the bias
    assert float(dense.abs().max()) <= 1 / math.sqrt(8) and float(dense.abs().max()) > 0.8 / math.sqrt(8)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_spectral_init_and_custom_inits(cls):
    """spectral=True at full ranks: the matrix is exactly the dense init; custom inits are called on the
    (in, 1, kh, kw) depthwise and (out, in, 1, 1) dense weights and are what the layer holds."""
    full = _full_ranks(cls, (3, 2, 2), (2, 2, 2))
    torch.manual_seed(3)
    layer = cls(8, 12, 3, rank=full, spectral=True, dtype=torch.float64)
    torch.manual_seed(3)
    depthwise = _kaiming((8, 1, 3, 3), torch.float64)
    dense = _kaiming((12, 8, 1, 1), torch.float64)
    assert layer.spectral is True and torch.equal(layer.depthwise.detach(), depthwise)
    assert torch.allclose(layer.matrix().detach(), dense[:, :, 0, 0], rtol=0, atol=1e-12)
    norms = [float(p.detach().norm()) for p in layer.factor_parameters()]
    assert max(norms) - min(norms) < 1e-9 * max(norms)  # balanced
    seen = {}

    def init(w):
        seen["init"] = tuple(w.shape)
        with torch.no_grad():
            w.copy_(torch.arange(96, dtype=w.dtype).reshape(12, 8, 1, 1) / 96 - 0.5)

    def depthwise_init(w):
        seen["depthwise"] = tuple(w.shape)
        nn.init.constant_(w, 0.25)

    layer = cls(8, 12, (3, 1), rank=full, spectral=1, init=init, depthwise_init=depthwise_init, dtype=torch.float64)
    assert seen == {"init": (12, 8, 1, 1), "depthwise": (8, 1, 3, 1)}
    assert layer.spectral is True and layer.init is init and layer.depthwise_init is depthwise_init
    assert torch.equal(layer.depthwise.detach(), torch.full((8, 1, 3, 1), 0.25, dtype=torch.float64))
    want = torch.arange(96, dtype=torch.float64).reshape(12, 8) / 96 - 0.5
    assert torch.allclose(layer.matrix().detach(), want, rtol=0, atol=1e-12)
    # without spectral, the custom init sets the variance the random cores reproduce
    torch.manual_seed(0)
    ranks = (2, 2) if cls is TTConv2d else (2, 2, 2)
    rnd = cls(8, 12, 3, rank=ranks, init=lambda w: nn.init.constant_(w, 3.0), dtype=torch.float64)
    assert rnd.spectral is False
    std = (9.0 / math.prod(ranks)) ** (1 / (6 if cls is TTConv2d else 8))
    torch.manual_seed(0)
    _kaiming((8, 1, 3, 3), torch.float64)
    for p in rnd.factor_parameters():
        assert torch.equal(p.detach(), torch.empty(p.shape, dtype=torch.float64).normal_(0.0, std))


# --- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_constructor_attributes_shapes_and_dtypes(cls):
    layer = cls(8, 12, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=True, rank=2,
                dtype=torch.float64)
    assert (layer.in_channels, layer.out_channels) == (8, 12)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 2), (2, 1), (1, 0), (1, 2))
    assert (layer.out_modes, layer.in_modes, layer.modes) == ((3, 2, 2), (2, 2, 2), (6, 4, 4))
    assert layer.rank == layer.ranks == ((2, 2) if cls is TTConv2d else (2, 2, 2))
    assert layer.square is False and layer.has_depthwise is True and layer.path == "auto"
    assert layer.depthwise.shape == (8, 1, 3, 2) and layer.bias.shape == (12,)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    if cls is TTConv2d:
        assert [tuple(p.shape) for p in layer.factor_parameters()] == [(1, 3, 2, 2), (2, 2, 2, 2), (2, 2, 2, 1)]
    else:
        assert [tuple(p.shape) for p in layer.factor_parameters()] == [(2, 2, 2), (6, 2), (4, 2), (4, 2)]
    assert [n for n, _ in layer.named_parameters()] == (
        ["depthwise", *(["core1", "core2", "core3"] if cls is TTConv2d else ["core", "factor1", "factor2", "factor3"]),
         "bias"])
    assert layer.num_parameters() == 8 * 6 + sum(p.numel() for p in layer.factor_parameters()) + 12
    assert layer.dense_num_parameters() == 12 * 8 * 6 + 12
    nobias = cls(8, 12, 1, bias=False, rank=2, out_modes=(2, 3, 2), in_modes=(2, 2, 2))
    assert nobias.bias is None and nobias.depthwise is None and not nobias.has_depthwise
    assert (nobias.out_modes, nobias.in_modes, nobias.modes) == ((2, 3, 2), (2, 2, 2), (4, 6, 4))
    assert [n for n, _ in nobias.named_parameters()] == (
        ["core1", "core2", "core3"] if cls is TTConv2d else ["core", "factor1", "factor2", "factor3"])
    assert nobias.dense_num_parameters() == 12 * 8
    with pytest.raises(ValueError, match=r"^give both out_modes and in_modes, or neither \(derived\)$"):
        cls(8, 12, 3, rank=2, out_modes=(3, 2, 2))
    for pad in ("same", "valid"):  # string padding: only numeric (the depthwise conv carries it)
        with pytest.raises(ValueError, match=rf"^padding must be an int or a pair of ints for {cls.__name__}, "
                                             rf"got '{pad}'$"):
            cls(8, 12, 3, rank=2, padding=pad)
    with pytest.raises(ValueError, match=r"^give both out_modes and in_modes, or neither \(derived\)$"):
        cls(8, 12, 3, rank=2, in_modes=(2, 2, 2))


def test_tt_rank_bounds_are_exact():
    """r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}: the bounds themselves are allowed."""
    # n = (6, 4, 4): r_1 <= min(6, 16), r_2 <= min(4 r_1, 4)
    assert TTConv2d(8, 12, 1, rank=(6, 4)).ranks == (6, 4)
    assert TTConv2d(8, 12, 1, rank=(4, 1)).ranks == (4, 1)  # r_1 = n_2 r_2
    with pytest.raises(ValueError, match=r"^rank: TT rank r_1=7 exceeds what its neighbours allow "
                                         r"\(r_0 n_1=6, n_2 r_2=16\) for modes n=\(6, 4, 4\)$"):
        TTConv2d(8, 12, 1, rank=(7, 4))
    with pytest.raises(ValueError, match=r"^rank: TT rank r_1=5 exceeds what its neighbours allow "
                                         r"\(r_0 n_1=6, n_2 r_2=4\) for modes n=\(6, 4, 4\)$"):
        TTConv2d(8, 12, 1, rank=(5, 1))
    with pytest.raises(ValueError, match=r"^rank: TT rank r_2=5 exceeds what its neighbours allow "
                                         r"\(r_1 n_2=24, n_3 r_3=4\) for modes n=\(6, 4, 4\)$"):
        TTConv2d(8, 12, 1, rank=(6, 5))
    # n = (2, 3, 8) (out (1, 3, 4), in (2, 1, 2)): r_2 <= r_1 n_2 = 3 r_1
    modes = dict(out_modes=(1, 3, 4), in_modes=(2, 1, 2))
    assert TTConv2d(4, 12, 1, rank=(1, 3), **modes).ranks == (1, 3)
    assert TTConv2d(4, 12, 1, rank=(2, 6), **modes).ranks == (2, 6)  # r_2 = r_1 n_2 > n_2
    with pytest.raises(ValueError, match=r"^rank: TT rank r_2=4 exceeds what its neighbours allow "
                                         r"\(r_1 n_2=3, n_3 r_3=8\) for modes n=\(2, 3, 8\)$"):
        TTConv2d(4, 12, 1, rank=(1, 4), **modes)
    assert TTConv2d(8, 12, 1, rank=3).ranks == (3, 3)  # an int: every rank


def test_tucker_rank_bounds_are_exact():
    assert TuckerConv2d(8, 12, 1, rank=(6, 4, 4)).ranks == (6, 4, 4)
    for k, rank in enumerate([(7, 4, 4), (6, 5, 4), (6, 4, 5)]):
        n = (6, 4, 4)[k]
        with pytest.raises(ValueError, match=rf"^rank: Tucker rank R_{k + 1}={n + 1} exceeds the mode size "
                                             rf"n_{k + 1}={n} \(modes \(6, 4, 4\)\)$"):
            TuckerConv2d(8, 12, 1, rank=rank)
    assert TuckerConv2d(8, 12, 1, rank=3).ranks == (3, 3, 3)


# --- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_mode_errors_name_the_argument(cls):
    with pytest.raises(ValueError, match=r"^out_modes=\(2, 2, 2\) must multiply to 12, got 8$"):
        cls(8, 12, 3, rank=2, out_modes=(2, 2, 2), in_modes=(2, 2, 2))
    with pytest.raises(ValueError, match=r"^in_modes=\(2, 2, 3\) must multiply to 8, got 12$"):
        cls(8, 12, 3, rank=2, out_modes=(3, 2, 2), in_modes=(2, 2, 3))
    with pytest.raises(TypeError, match=r"^in_modes must be a sequence of 3 ints >= 1, got \(2, 4\)$"):
        cls(8, 12, 3, rank=2, out_modes=(3, 2, 2), in_modes=(2, 4))
    with pytest.raises(TypeError, match=r"^out_modes must be a sequence of 3 ints >= 1, got \(12,\)$"):
        cls(8, 12, 3, rank=2, out_modes=(12,), in_modes=(2, 2, 2))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("dilation", [2, (2, 1), (1, 2)])
def test_1x1_dilation_is_reset(cls, dilation):
    layer = cls(8, 12, 1, dilation=dilation, rank=2)
    assert layer.dilation == (1, 1) and layer.to_dense().dilation == (1, 1)
    assert "dilation" not in layer.extra_repr()
    assert cls(8, 12, (1, 3), dilation=dilation, rank=2).dilation == ((2, 2) if dilation == 2 else dilation)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("spectral", [False, True])
def test_construction_follows_device_not_the_default_device(cls, spectral):
    """Built with device='cpu' under another default device (here 'meta'): every tensor on the CPU."""
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = cls(8, 12, 3, padding=1, rank=2, spectral=spectral, device="cpu")
    assert {p.device.type for p in layer.parameters()} == {"cpu"}
    assert len(list(layer.parameters())) == len(layer.factor_parameters()) + 2
    assert bool(torch.isfinite(layer.matrix()).all()) and float(layer.matrix().detach().abs().max()) > 0


def test_rank_scale_follows_the_rank_rules():
    """TT: r_k = max(1, round(s min(n_k, n_{k+1}))); Tucker: R_k = max(1, round(s n_k))."""
    modes = dict(out_modes=(1, 3, 4), in_modes=(2, 1, 2))  # n = (2, 3, 8)
    assert TTConv2d(4, 12, 1, rank_scale=1.0, **modes).ranks == (2, 3)
    assert TTConv2d(4, 12, 1, rank_scale=0.5, **modes).ranks == (1, 2)  # round(1.5) = 2
    assert TTConv2d(4, 12, 1, rank_scale=0.1, **modes).ranks == (1, 1)  # at least 1
    assert TTConv2d(8, 12, 3, rank_scale=0.75).ranks == (3, 3)  # n = (6, 4, 4)
    assert TuckerConv2d(4, 12, 1, rank_scale=1.0, **modes).ranks == (2, 3, 8)
    assert TuckerConv2d(4, 12, 1, rank_scale=0.5, **modes).ranks == (1, 2, 4)
    assert TuckerConv2d(8, 12, 3, rank_scale=0.5).ranks == (3, 2, 2)
    for cls in CLASSES:
        with pytest.raises(ValueError, match="exactly one"):
            cls(8, 12, 3, rank=2, rank_scale=0.5)
