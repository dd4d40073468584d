"""Exact behaviour of the tensor-format convs ``fnl.TTConv2d`` / ``fnl.TuckerConv2d`` (issue 19: mutation
survivors of ``fnl/tensor_conv.py``).

The exact errors of the abstract base, ``from_dense`` and ``inference_form``; ``extra_repr``; explicit
modes kept by ``from_dense``; parameters, conversions and Frobenius-decay gradients that follow the
layer's device and dtype, not torch's global defaults; multiply-add counts against their closed forms
(non-square kernels, every path); 1x1 layers with asymmetric stride and padding against ``nn.Conv2d``.
"""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
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
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_dense_keeps_explicit_modes(cls):
    """Explicit modes, different from the derived ones ((3, 2, 2), (2, 2, 2) for 12 x 8), are used."""
    out_modes, in_modes = (2, 2, 3), (1, 4, 2)
    assert fnl.tensor_modes(12, 8) != (out_modes, in_modes)
    full = _full_ranks(cls, out_modes, in_modes)
    torch.manual_seed(0)
    src = cls(8, 12, 3, padding=1, rank=full, out_modes=out_modes, in_modes=in_modes, dtype=torch.float64)
    dense = src.to_dense()
    new = cls.from_dense(dense, rank=full, out_modes=out_modes, in_modes=in_modes)
    assert new.out_modes == out_modes and new.in_modes == in_modes
    assert new.modes == (2, 8, 6) and new.ranks == full
    assert [tuple(p.shape) for p in new.factor_parameters()] == [tuple(p.shape) for p in src.factor_parameters()]
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert torch.allclose(new(x), dense(x), atol=1e-10), f"{(new(x) - dense(x)).abs().max()}"
    # only one of the two: refused, as by the constructor
    with pytest.raises(ValueError, match="give both out_modes and in_modes, or neither"):
        cls.from_dense(dense, rank=2, out_modes=out_modes)
    with pytest.raises(ValueError, match="give both out_modes and in_modes, or neither"):
        cls.from_dense(dense, rank=2, in_modes=in_modes)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_dense_copies_geometry_bias_and_path(cls):
    conv = nn.Conv2d(8, 12, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1)).double()
    new = cls.from_dense(conv, rank=2, path="factored")
    assert (new.kernel_size, new.stride, new.padding, new.dilation) == ((3, 1), (2, 1), (1, 0), (2, 1))
    assert new.path == "factored" and new.groups == 1
    assert new.bias.dtype == torch.float64 and torch.equal(new.bias, conv.bias)
    assert all(p.dtype == torch.float64 for p in new.parameters())
    nobias = cls.from_dense(nn.Conv2d(8, 12, 1, bias=False), rank=2)
    assert nobias.bias is None and nobias.to_dense().bias is None
    assert cls.from_dense(nn.Conv2d(8, 12, 1), rank=2).path == "auto"


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_conversions_follow_the_layer_not_the_default_device(cls):
    """Under another default device (here 'meta'), from_dense / to_dense / FD stay on the layers' device."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = cls(8, 12, 3, padding=1, rank=2)
    ref_dense = layer.to_dense()
    ref_grads = layer._frobenius_grads(layer._promoted_cores())
    with torch.device("meta"):
        new = cls.from_dense(conv, rank=2)
        dense = layer.to_dense()
        layer.add_frobenius_grad_(0.5)
    assert {p.device.type for p in new.parameters()} == {"cpu"}
    assert {p.device.type for p in dense.parameters()} == {"cpu"}
    assert torch.equal(dense.weight, ref_dense.weight) and torch.equal(dense.bias, ref_dense.bias)
    for p, g in zip(layer.factor_parameters(), ref_grads):
        assert p.grad.device.type == "cpu"
        assert torch.allclose(p.grad, 0.5 * g, rtol=1e-6, atol=0), f"{(p.grad - 0.5 * g).abs().max()}"
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(new(x), cls.from_dense(conv, rank=2)(x), atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_dtypes_follow_the_layer_not_the_default_dtype(cls):
    """Under a float64 default dtype, a float32 layer converts to float32 and its FD is computed in float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = cls(8, 12, 3, padding=1, rank=2)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        new = cls.from_dense(conv, rank=2)
        dense = layer.to_dense()
        grads = layer._frobenius_grads(layer._promoted_cores())
        layer.add_frobenius_grad_(1.0)
    finally:
        torch.set_default_dtype(old)
    assert {p.dtype for p in new.parameters()} == {torch.float32}
    assert {p.dtype for p in dense.parameters()} == {torch.float32}
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    assert [tuple(g.shape) for g in grads] == [tuple(p.shape) for p in layer.factor_parameters()]
    assert all(p.grad.dtype == torch.float32 for p in layer.factor_parameters())


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_frobenius_grads_are_computed_in_float32_or_float64(cls, dtype):
    """Low-precision cores: FD in float32 (then cast back); float64 cores stay float64."""
    torch.manual_seed(0)
    layer = cls(8, 12, 3, rank=2, dtype=dtype)
    promoted = layer._promoted_cores()
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert [c.dtype for c in promoted] == [want] * len(promoted)
    assert all(torch.equal(c, p.detach().to(want)) for c, p in zip(promoted, layer.factor_parameters()))
    assert layer.frobenius_norm_sq().dtype == want
    # the exact gradient of (1/2)||W||² in the promoted dtype, then cast to the cores' dtype
    cores = [c.double().requires_grad_() for c in promoted]
    ref = type(layer)(8, 12, 3, rank=2, dtype=torch.float64)
    with torch.no_grad():
        for p, c in zip(ref.factor_parameters(), cores):
            p.copy_(c)
    (0.5 * ref.matrix().square().sum()).backward()
    layer.add_frobenius_grad_(2.0)
    for p, r in zip(layer.factor_parameters(), ref.factor_parameters()):
        assert p.grad.dtype == dtype
        assert torch.allclose(p.grad.double(), 2.0 * r.grad.to(dtype).double(), rtol=1e-2, atol=1e-6), \
            f"{(p.grad.double() - 2.0 * r.grad).abs().max()}"


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_add_frobenius_grad_accumulates_and_coef_zero_is_a_no_op(cls):
    torch.manual_seed(0)
    layer = cls(8, 12, 3, rank=(2, 3) if cls is TTConv2d else (2, 3, 2), dtype=torch.float64)
    layer.add_frobenius_grad_(0.0)
    assert all(p.grad is None for p in layer.factor_parameters())
    (0.5 * layer.matrix().square().sum()).backward()
    auto = [p.grad.clone() for p in layer.factor_parameters()]
    assert layer.depthwise.grad is None or torch.count_nonzero(layer.depthwise.grad) == 0
    layer.add_frobenius_grad_(0.25)  # adds to the existing .grad
    for p, a in zip(layer.factor_parameters(), auto):
        assert torch.allclose(p.grad, 1.25 * a, rtol=1e-12, atol=1e-14), f"{(p.grad - 1.25 * a).abs().max()}"
    assert math.isclose(float(layer.frobenius_norm_sq().detach()), float(layer.matrix().detach().square().sum()),
                        rel_tol=1e-12)


# --- counts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_macs_closed_forms_for_a_non_square_kernel(cls):
    """(out, in, kh, kw) = (12, 8, 3, 5), stride (2, 1), padding (1, 2), dilation (1, 2) on 9 x 11."""
    kw = dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    h_out = (9 + 2 * 1 - 1 * (3 - 1) - 1) // 2 + 1  # 5
    w_out = (11 + 2 * 2 - 2 * (5 - 1) - 1) // 1 + 1  # 7
    assert (h_out, w_out) == (5, 7)
    layer = cls(8, 12, rank=2, **kw)
    dense_conv = nn.Conv2d(8, 12, **kw)
    assert dense_conv(torch.zeros(1, 8, 9, 11)).shape[-2:] == (h_out, w_out)
    assert layer(torch.zeros(1, 8, 9, 11)).shape == (1, 12, h_out, w_out)
    pixels = h_out * w_out
    assert layer.dense_macs((8, 9, 11)) == 12 * 8 * 3 * 5 * pixels
    depthwise = 8 * 3 * 5 * pixels
    contract = min(layer._contract_macs("rtl"), layer._contract_macs("ltr"))
    assert layer._contract_macs("rtl") != layer._contract_macs("ltr")
    for path, per_pixel in (("auto", min(contract, 12 * 8)), ("factored", contract), ("dense", 12 * 8)):
        layer.path = path
        assert layer.macs((8, 9, 11)) == depthwise + per_pixel * pixels, path
    # 1x1: no depthwise part
    one = cls(8, 12, 1, stride=(1, 2), padding=(0, 1), rank=2, path="factored")
    assert one.macs((8, 6, 7)) == one._contract_macs("ltr" if one._ltr_macs < one._rtl_macs else "rtl") * 6 * 5
    assert one.dense_macs((8, 6, 7)) == 12 * 8 * 6 * 5


def test_contract_and_rebuild_macs_closed_forms():
    """TT: o = (3, 2, 2), i = (2, 2, 2), r = (3, 2); Tucker: n = (6, 4, 4), R = (2, 3, 2) (bonds R_1, R_3)."""
    tt = TTConv2d(8, 12, 3, rank=(3, 2))
    # rtl: core 3 (1*2*2*2*2*1... each step: I_{<k} r_k o_k i_k r_{k+1} O_{>k}
    rtl = (1 * 1 * 3 * 2 * 3 * 2 * 2) + (2 * 3 * 2 * 2 * 2 * 2) + (2 * 2 * 2 * 2 * 2 * 1)
    ltr = (1 * 3 * 3 * 1 * 2 * 2 * 2) + (3 * 2 * 2 * 3 * 2 * 2) + (3 * 2 * 2 * 1 * 2 * 2)
    assert (tt._contract_macs("rtl"), tt._contract_macs("ltr")) == (rtl, ltr)
    assert tt.rebuild_macs() == 6 * 3 * 4 * 2 + 6 * 4 * 2 * 4
    tucker = TuckerConv2d(8, 12, 3, rank=(2, 3, 2))
    assert tucker.rebuild_macs() == 6 * 2 * 4 * 2 + 6 * 4 * 2 * 4 + 2 * 3 * 2 * 4
    trtl = (1 * 1 * 3 * 2 * 2 * 2 * 2) + (2 * 2 * 2 * 2 * 2 * 2) + (2 * 2 * 2 * 2 * 2 * 1)
    tltr = (1 * 3 * 2 * 1 * 2 * 2 * 2) + (3 * 2 * 2 * 2 * 2 * 2) + (3 * 2 * 2 * 2 * 2 * 1)
    assert (tucker._contract_macs("rtl"), tucker._contract_macs("ltr")) == (trtl, tltr)
    # the plan: the cheaper direction (right-to-left on a tie), the dense path when it costs no more
    for layer in (tt, tucker):
        rtl_, ltr_ = layer._contract_macs("rtl"), layer._contract_macs("ltr")
        direction = "rtl" if rtl_ <= ltr_ else "ltr"
        for pixels in (1, 7, 1000):
            dense = pixels * min(rtl_, ltr_) >= layer.rebuild_macs() + pixels * 96
            assert layer._plan(pixels) == (dense, direction), pixels
        layer.path = "dense"
        assert layer._plan(1) == (True, direction)
        layer.path = "factored"
        assert layer._plan(10 ** 6) == (False, direction)
    tie = TTConv2d(8, 12, 3, rank=2)  # contract 144 per pixel, rebuild 288: 6 x 144 = 288 + 6 x 96
    assert (tie._rtl_macs, tie._ltr_macs, tie._rebuild_macs) == (144, 192, 288)
    assert tie._plan(6) == (True, "rtl") and tie._plan(5) == (False, "rtl")
    # equal in and out modes: both directions cost the same, and right-to-left is taken
    sym = TTConv2d(8, 8, 1, rank=2)
    per_core = (1 * 2 * 2 * 2 * 4, 2 * 2 * 2 * 2 * 2 * 2, 4 * 2 * 2 * 2)  # the same in both directions
    assert sym._contract_macs("rtl") == sym._contract_macs("ltr") == sum(per_core)
    assert sym._plan(1)[1] == "rtl"
    # o = (2, 2, 2), i = (3, 2, 2), r = (1, 4): left-to-right is cheaper
    ltr = TTConv2d(12, 8, 1, rank=(1, 4))
    assert ltr._contract_macs("rtl") == 1 * 2 * 3 * 1 * 4 + 3 * 1 * 2 * 2 * 4 * 2 + 6 * 4 * 2 * 2 == 216
    assert ltr._contract_macs("ltr") == 2 * 1 * 3 * 4 + 2 * 2 * 4 * 1 * 2 * 2 + 4 * 2 * 4 * 2 == 152
    assert ltr._plan(1)[1] == "ltr" and ltr._plan(10 ** 6) == (True, "ltr")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_pickled_layer_without_cached_counts_recomputes_them(cls):
    layer = cls(8, 12, 3, rank=2)
    counts = (layer._rtl_macs, layer._ltr_macs, layer._rebuild_macs)
    assert counts == (layer._contract_macs("rtl"), layer._contract_macs("ltr"), layer.rebuild_macs())
    assert counts == ((144, 192, 288) if cls is TTConv2d else (144, 192, 320))
    state = layer.__dict__.copy()
    for k in ("_rtl_macs", "_ltr_macs", "_rebuild_macs"):
        del state[k]
    old = cls.__new__(cls)
    old.__setstate__(state)
    assert (old._rtl_macs, old._ltr_macs, old._rebuild_macs) == counts
    back = pickle.loads(pickle.dumps(layer))
    assert (back._rtl_macs, back._ltr_macs, back._rebuild_macs) == counts
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(back(x), layer(x))


# --- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("stride,padding", [((2, 1), (0, 1)), ((1, 3), (2, 0)), ((3, 2), (1, 2)), ((1, 1), (1, 0)),
                                            ((1, 1), (0, 1)), ((2, 1), (0, 0)), ((1, 2), (0, 0)), ((1, 1), (0, 0))])
def test_1x1_asymmetric_stride_and_padding_equal_the_dense_conv(cls, stride, padding):
    torch.manual_seed(0)
    layer = cls(8, 12, 1, stride=stride, padding=padding, rank=2, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    ref = F.conv2d(x, layer.matrix().detach()[:, :, None, None], layer.bias, stride, padding)
    for path in ("dense", "factored"):
        layer.path = path
        y = layer(x)
        assert y.shape == ref.shape, path
        assert torch.allclose(y, ref, atol=1e-12), f"{path}: {(y - ref).abs().max()}"
    assert torch.allclose(layer.to_dense()(x), ref, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_dense_weight_is_the_matrix_times_the_depthwise_filters(cls):
    torch.manual_seed(0)
    layer = cls(8, 12, (3, 2), rank=2, dtype=torch.float64)
    w, d = layer.matrix().detach(), layer.depthwise.detach()
    k = layer.dense_weight().detach()
    assert k.shape == (12, 8, 3, 2)
    for o, i in ((0, 0), (5, 3), (11, 7)):
        assert torch.allclose(k[o, i], w[o, i] * d[i, 0], rtol=1e-14, atol=0)
    one = cls(8, 12, 1, rank=2)
    assert torch.equal(one.dense_weight().detach(), one.matrix().detach()[:, :, None, None])


# --- initialisation ----------------------------------------------------------------------------
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
def test_matrix_to_tensor_is_the_documented_index_map(cls):
    """W[(o_1 o_2 o_3), (i_1 i_2 i_3)] = T[(o_1, i_1), (o_2, i_2), (o_3, i_3)], row-major pairs."""
    o, i = (2, 3, 1), (1, 2, 3)
    layer = cls(6, 6, 1, rank=1, out_modes=o, in_modes=i)
    m = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    t = layer.matrix_to_tensor(m)
    assert t.shape == (2, 6, 3) == layer.modes
    for a in range(2):
        for b in range(3):
            for ia in range(2):
                for ib in range(3):
                    row, col = a * 3 + b, ia * 3 + ib  # o_3 = i_1 = 1
                    assert t[a, b * 2 + ia, ib] == m[row, col]
    assert torch.equal(layer.tensor_to_matrix(t), m)
    big = cls(12, 8, 1, rank=1, out_modes=(2, 1, 4), in_modes=(3, 2, 2))
    m = torch.randn(8, 12, dtype=torch.float64)
    assert big.matrix_to_tensor(m).shape == (6, 2, 8)
    assert torch.equal(big.tensor_to_matrix(big.matrix_to_tensor(m)), m)
    assert big.matrix_to_tensor(m)[5, 1, 7] == m[1 * 4 + 3, 2 * 4 + 1 * 2 + 1]


def test_tucker_tt_cores_rebuild_the_tucker_tensor():
    from fnl.tensor_conv import _tt_full, _tucker_full
    torch.manual_seed(0)
    layer = TuckerConv2d(8, 12, 1, rank=(3, 2, 4), out_modes=(2, 3, 2), in_modes=(2, 1, 4), dtype=torch.float64)
    assert layer.modes == (4, 3, 8)
    cores = layer.tt_cores()
    assert [tuple(c.shape) for c in cores] == [(1, 2, 2, 3), (3, 3, 1, 4), (4, 2, 4, 1)]
    t = _tucker_full(layer.core.detach(), [layer.factor1.detach(), layer.factor2.detach(), layer.factor3.detach()])
    full = _tt_full([c.detach().reshape(c.shape[0], -1, c.shape[-1]) for c in cores])
    assert torch.allclose(full, t, rtol=0, atol=1e-12)
    assert torch.allclose(layer.matrix().detach(), layer.tensor_to_matrix(t), rtol=0, atol=1e-12)
    expected = torch.einsum("abc,ia,jb,kc->ijk", layer.core, layer.factor1, layer.factor2, layer.factor3).detach()
    assert torch.allclose(t, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_dense_depthwise_filters_are_unit_with_a_non_negative_sum(cls):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    layer = cls.from_dense(conv, rank=_full_ranks(cls, (3, 2, 2), (2, 2, 2)))
    d = layer.depthwise.detach().reshape(8, 9)
    assert torch.allclose(d.norm(dim=1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((d.sum(1) >= 0).all())
    # the kernel is the leading singular pair of every input-channel slice K[:, i] (out x kh kw)
    k = conv.weight.detach()
    for i in range(8):
        u, s, vh = torch.linalg.svd(k[:, i].reshape(12, 9))
        best = s[0] * torch.outer(u[:, 0], vh[0])
        assert torch.allclose(layer.dense_weight().detach()[:, i].reshape(12, 9), best, rtol=0, atol=1e-10)
    # a separable kernel with negative-sum filters: recovered exactly, the filters flipped to sum >= 0
    dw = -torch.rand(8, 1, 3, 3, dtype=torch.float64) - 0.1
    w = torch.randn(12, 8, dtype=torch.float64)
    sep = nn.Conv2d(8, 12, 3, bias=False).double()
    with torch.no_grad():
        sep.weight.copy_(w[:, :, None, None] * dw.view(1, 8, 3, 3))
    assert float(cls.separable_error_sq(sep.weight)) < 1e-20
    back = cls.from_dense(sep, rank=_full_ranks(cls, (3, 2, 2), (2, 2, 2)))
    assert torch.allclose(back.dense_weight().detach(), sep.weight.detach(), rtol=0, atol=1e-12)
    unit = dw.reshape(8, 9) / dw.reshape(8, 9).norm(dim=1, keepdim=True)
    assert torch.allclose(back.depthwise.detach().reshape(8, 9), -unit, rtol=0, atol=1e-12)
    assert float(cls.separable_error_sq(conv.weight)) > 0


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


def test_counts_with_three_different_mode_sizes():
    """out (2, 3, 2), in (2, 1, 4): n = (4, 3, 8), so a mode index off by one changes every count."""
    modes = dict(out_modes=(2, 3, 2), in_modes=(2, 1, 4))
    tt = TTConv2d(8, 12, 1, rank=(3, 2), **modes)
    assert tt.modes == (4, 3, 8)
    assert tt.rebuild_macs() == 4 * 3 * 3 * 2 + 4 * 3 * 2 * 8
    o, i, r = (2, 3, 2), (2, 1, 4), (1, 3, 2, 1)
    assert tt._contract_macs("rtl") == (1 * r[0] * o[0] * i[0] * r[1] * 6 + 2 * r[1] * o[1] * i[1] * r[2] * 2
                                        + 2 * r[2] * o[2] * i[2] * r[3] * 1) == 72 + 72 + 32
    assert tt._contract_macs("ltr") == (1 * o[0] * r[1] * r[0] * i[0] * 4 + 2 * o[1] * r[2] * r[1] * i[1] * 4
                                        + 6 * o[2] * r[3] * r[2] * i[2] * 1) == 48 + 144 + 96
    tucker = TuckerConv2d(8, 12, 1, rank=(3, 2, 5), **modes)
    assert tucker._tt_bond_ranks() == (3, 5)
    assert tucker.rebuild_macs() == 4 * 3 * 3 * 5 + 4 * 3 * 5 * 8 + 3 * 2 * 5 * 3
    r = (1, 3, 5, 1)
    assert tucker._contract_macs("rtl") == (1 * r[0] * o[0] * i[0] * r[1] * 6 + 2 * r[1] * o[1] * i[1] * r[2] * 2
                                            + 2 * r[2] * o[2] * i[2] * r[3] * 1)
    assert tucker._contract_macs("ltr") == (1 * o[0] * r[1] * r[0] * i[0] * 4 + 2 * o[1] * r[2] * r[1] * i[1] * 4
                                            + 6 * o[2] * r[3] * r[2] * i[2] * 1)
    x = torch.randn(1, 8, 3, 3)
    for layer in (tt, tucker):
        assert layer.num_parameters() == sum(p.numel() for p in layer.factor_parameters()) + 12
        assert layer.macs((8, 3, 3)) == min(layer._rtl_macs, layer._ltr_macs, 96) * 9
        assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-5)


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
