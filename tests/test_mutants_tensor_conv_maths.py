"""Exact behaviour of the tensor-format convs ``fnl.TTConv2d`` / ``fnl.TuckerConv2d``: conversions, counts
and Frobenius decay (tests that kill the mutants of ``fnl/tensor_conv.py``, ``make mutate``; construction
is in ``test_mutants_tensor_conv.py``).

``from_dense`` (explicit modes, geometry, the depthwise filters), conversions and FD gradients that follow
the layer's device and dtype rather than torch's defaults, FD computed in float32 / float64, multiply-add
counts against their closed forms (non-square kernels, three different mode sizes, every path, recomputed
after unpickling), 1x1 layers with asymmetric stride and padding against ``nn.Conv2d``, the dense weight
and the matrix <-> tensor index map.
"""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl
from fnl.tensor_conv import TTConv2d, TuckerConv2d
from test_mutants_tensor_conv import CLASSES, IDS, _full_ranks  # noqa: E402


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
