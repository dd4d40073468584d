"""Factorized layers against their dense counterparts (docs/method.md#factorized-layers)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl

CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation)
    (3, 4, 3, 1, 1, 1),
    (5, 7, (3, 2), (2, 1), (1, 2), (1, 2)),
    (4, 6, (1, 5), 2, (0, 2), 1),
    (6, 3, (2, 3), (1, 3), 0, (2, 1)),
    (4, 8, 1, 1, 0, 1),
]


def _close(a, b, atol=1e-5):
    assert torch.allclose(a, b, atol=atol), f"max abs diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("square", [False, True])
def test_linear_full_rank_roundtrip(bias, square):
    torch.manual_seed(0)
    dense = nn.Linear(12, 9, bias=bias)
    f = fnl.FactorizedLinear.from_dense(dense, rank_scale=1.0, square=square)
    assert f.rank == 9
    x = torch.randn(5, 12)
    _close(f(x), dense(x))
    back = f.to_dense()
    _close(back.weight, dense.weight)
    _close(back(x), dense(x))
    assert (back.bias is None) == (not bias)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["factored", "dense"])
def test_conv_full_rank_roundtrip(case, bias, path):
    cin, cout, k, s, p, d = case
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, s, p, d, bias=bias)
    kh, kw = dense.kernel_size
    rank = min(cout * kh, cin * kw)
    f = fnl.FactorizedConv2d.from_dense(dense, rank=rank, path=path)
    x = torch.randn(2, cin, 11, 13)
    _close(f(x), dense(x))
    back = f.to_dense()
    _close(back.weight, dense.weight)
    _close(back(x), dense(x))


def test_embedding_full_rank_roundtrip():
    torch.manual_seed(0)
    dense = nn.Embedding(11, 6, padding_idx=2)
    f = fnl.FactorizedEmbedding.from_dense(dense, rank_scale=1.0)
    idx = torch.randint(0, 11, (3, 7))
    _close(f(idx), dense(idx))
    _close(f.to_dense().weight, dense.weight)
    assert f(torch.tensor([2])).abs().max() == 0
    f(idx).sum().backward()
    assert f.U.grad[2].abs().max() == 0, "padding row of U must get no gradient"


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_conv_spectral_is_best_rank_r(case):
    """Eckart-Young on the matrix the forward pass uses: error = norm of the discarded singular values."""
    cin, cout, k, s, p, d = case
    torch.manual_seed(1)
    dense = nn.Conv2d(cin, cout, k, s, p, d).double()
    kh, kw = dense.kernel_size
    # the (out*kh) x (in*kw) matrix M[(o,h),(i,w)] of docs/method.md#conv2d
    m = dense.weight.permute(0, 2, 1, 3).reshape(cout * kh, cin * kw)
    sv = torch.linalg.svdvals(m)
    for rank in (1, 2, len(sv) - 1):
        f = fnl.FactorizedConv2d.from_dense(dense, rank=rank)
        err = (f.dense_weight() - dense.weight).norm()
        expected = sv[rank:].norm()
        assert torch.isclose(err, expected, rtol=1e-9, atol=1e-12), f"rank {rank}: {err} vs {expected}"


def test_spectral_init_conv_uses_forward_layout():
    """The reference's raw reshape of (out, in, kh, kw) is a different matrix; ours must match the kernel."""
    torch.manual_seed(2)
    dense = nn.Conv2d(4, 6, 3).double()
    f = fnl.FactorizedConv2d.from_dense(dense, rank=5)
    raw = dense.weight.reshape(6 * 3, 4 * 3)  # the reference's matrix
    raw_err = math.sqrt((torch.linalg.svdvals(raw)[5:] ** 2).sum().item())
    ours = (f.dense_weight() - dense.weight).norm().item()
    m = dense.weight.permute(0, 2, 1, 3).reshape(18, 12)
    assert ours == pytest.approx(torch.linalg.svdvals(m)[5:].norm().item(), rel=1e-9)
    assert ours != pytest.approx(raw_err, rel=1e-3)


def test_spectral_overcomplete_extra_rank_trains():
    """rank > min(m, n): product unchanged, and the extra columns receive gradient (docs/differences.md)."""
    torch.manual_seed(3)
    dense = nn.Linear(4, 6)
    f = fnl.FactorizedLinear.from_dense(dense, rank=7)
    x = torch.randn(8, 4)
    _close(f(x), dense(x))
    f(x).pow(2).sum().backward()
    assert f.V.grad[:, 4:].abs().sum() > 0, "extra columns of V must learn"
    assert f.U[:, 4:].abs().sum() > 0 and f.V[:, 4:].abs().sum() == 0


def test_spectral_constructor_matches_svd_of_init():
    torch.manual_seed(4)
    f = fnl.FactorizedLinear(10, 8, rank=3, spectral=True)
    su = torch.linalg.svdvals(f.U.detach())
    sv = torch.linalg.svdvals(f.V.detach())
    _close(su, sv, atol=1e-5)  # singular values split evenly between U and V


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spectral_low_precision_dtype(dtype):
    torch.manual_seed(5)
    dense = nn.Linear(16, 16).to(dtype)
    f = fnl.FactorizedLinear.from_dense(dense, rank=16)
    assert f.U.dtype == dtype
    _close(f.dense_weight().float(), dense.weight.float(), atol=2e-2)


def test_conv_auto_path_choice():
    low = fnl.FactorizedConv2d(64, 64, 3, padding=1, rank_scale=0.1)
    high = fnl.FactorizedConv2d(64, 64, 3, padding=1, rank_scale=1.0)
    assert not low.uses_dense_path and high.uses_dense_path
    x = torch.randn(2, 64, 8, 8)
    y_auto = high(x)
    high.path = "factored"
    _close(high(x), y_auto, atol=1e-4)


def test_square_factor_is_identity_and_trains():
    torch.manual_seed(6)
    f = fnl.FactorizedConv2d(3, 4, 3, rank_scale=1.0, square=True)
    assert torch.equal(f.S.detach(), torch.eye(f.rank))
    f(torch.randn(2, 3, 6, 6)).sum().backward()
    assert f.S.grad is not None and f.S.grad.abs().sum() > 0


def test_resnet20_stage_ranks():
    # docs/experiments.md#reference-checks: 3x3 convs of 16/32/64 channels at rank_scale 0.111 get ranks 5, 11, 21
    assert [fnl.FactorizedConv2d(c, c, 3, rank_scale=0.111).rank for c in (16, 32, 64)] == [5, 11, 21]


def test_counts():
    f = fnl.FactorizedConv2d(16, 32, 3, stride=2, padding=1, rank=11, bias=False)
    assert f.num_parameters() == 11 * (32 * 3 + 16 * 3)
    assert f.dense_num_parameters() == 32 * 16 * 9
    # (1 x 3) conv over all 32 rows at 16 output columns, then (3 x 1) conv at 16 x 16 outputs
    assert f.macs((16, 32, 32)) == 11 * 16 * 3 * 32 * 16 + 32 * 11 * 3 * 16 * 16
    assert f.dense_macs((16, 32, 32)) == 32 * 16 * 9 * 16 * 16
    lin = fnl.FactorizedLinear(100, 50, rank=10)
    assert lin.macs((7, 100)) == 7 * 10 * 150 and lin.dense_macs((100,)) == 5000
    assert lin.num_parameters() == 10 * 150 + 50


def test_extra_repr_shows_non_defaults():
    assert repr(fnl.FactorizedLinear(4, 3, bias=False, rank=2)) == \
        "FactorizedLinear(in_features=4, out_features=3, rank=2, bias=False)"
    assert "square=True" in repr(fnl.FactorizedConv2d(2, 2, 3, rank=2, square=True))


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(), ValueError, "exactly one of rank"),
    (dict(rank=2, rank_scale=0.5), ValueError, "exactly one of rank"),
    (dict(rank_scale=0.0), ValueError, "rank_scale must be a finite float > 0"),
    (dict(rank_scale=-1.0), ValueError, "rank_scale must be a finite float > 0"),
    (dict(rank_scale=float("nan")), ValueError, "rank_scale must be a finite float > 0"),
    (dict(rank_scale=float("inf")), ValueError, "rank_scale must be a finite float > 0"),
    (dict(rank=0), ValueError, "rank must be an int >= 1"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(rank_scale="0.5"), TypeError, "rank_scale must be a finite float"),
])
def test_bad_rank_arguments(kwargs, exc, words):
    for make in (lambda: fnl.FactorizedLinear(4, 4, **kwargs), lambda: fnl.FactorizedConv2d(4, 4, 3, **kwargs),
                 lambda: fnl.FactorizedEmbedding(4, 4, **kwargs)):
        with pytest.raises(exc, match=words):
            make()


def test_bad_conv_arguments():
    with pytest.raises(ValueError, match="groups must be 1"):
        fnl.FactorizedConv2d(4, 4, 3, groups=2, rank=2)
    with pytest.raises(ValueError, match="layer.groups must be 1"):
        fnl.FactorizedConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        fnl.FactorizedConv2d(4, 4, 3, padding_mode="reflect", rank=2)
    with pytest.raises(ValueError, match="path must be one of"):
        fnl.FactorizedConv2d(4, 4, 3, path="fast", rank=2)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        fnl.FactorizedConv2d(4, 4, 3, stride=2, padding="same", rank=2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        fnl.FactorizedConv2d(4, 4, (3, 3, 3), rank=2)


def test_non_finite_weights_rejected_by_spectral_init():
    dense = nn.Linear(4, 4)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fnl.FactorizedLinear.from_dense(dense, rank=2)
    dense = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        dense.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fnl.FactorizedConv2d.from_dense(dense, rank=2)


def test_from_dense_type_checked():
    with pytest.raises(TypeError, match="layer must be an nn.Linear"):
        fnl.FactorizedLinear.from_dense(nn.Conv2d(2, 2, 1), rank=1)


def test_same_padding():
    torch.manual_seed(8)
    dense = nn.Conv2d(3, 4, 3, padding="same")
    f = fnl.FactorizedConv2d.from_dense(dense, rank=9, path="factored")
    x = torch.randn(1, 3, 7, 7)
    _close(f(x), dense(x))


def test_bf16_autocast_cpu():
    torch.manual_seed(9)
    model = nn.Sequential(fnl.FactorizedConv2d(3, 8, 3, padding=1, rank=4), nn.ReLU(), nn.Flatten(),
                          fnl.FactorizedLinear(8 * 6 * 6, 5, rank=3))
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    ref = model(x)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.slow
def test_torch_compile_layer():
    torch.manual_seed(10)
    f = fnl.FactorizedConv2d(3, 8, 3, padding=1, rank=4)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(f)
    _close(compiled(x), f(x), atol=1e-5)


def test_spectral_of_rank_deficient_weight_is_finite():
    dense = nn.Linear(6, 5)
    with torch.no_grad():
        dense.weight.zero_()
        dense.weight[:, 0] = 1.0  # rank 1
    f = fnl.FactorizedLinear.from_dense(dense, rank=4)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
    _close(f.dense_weight(), dense.weight)


@pytest.mark.parametrize("make, x", [
    (lambda: fnl.FactorizedLinear(8, 4, rank=2, square=True), torch.randn(3, 8)),
    (lambda: fnl.FactorizedConv2d(3, 4, 3, padding=1, rank=2), torch.randn(2, 3, 6, 6)),
    (lambda: fnl.FactorizedConv2d(3, 4, 3, rank_scale=1.0, path="dense"), torch.randn(2, 3, 6, 6)),
    (lambda: fnl.FactorizedEmbedding(10, 4, padding_idx=0, rank=2), torch.randint(0, 10, (2, 5))),
])
def test_torchscript(make, x):
    torch.manual_seed(11)
    layer = make()
    scripted = torch.jit.script(layer)
    _close(scripted(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("stride, expect_dense", [((1, 1), False), ((1, 2), False), ((2, 1), True), ((2, 2), True)])
def test_conv_auto_path_counts_the_vertical_stride(stride, expect_dense):
    """The (1 x kw) conv runs on every input row, about sh per output row: rank 20 at 16 -> 16 channels,
    3x3, costs 20 (48 sh + 48) per output pixel against 2304 dense: factored at sh = 1, dense at sh = 2
    (the horizontal stride divides both paths alike)."""
    layer = fnl.FactorizedConv2d(16, 16, 3, stride, padding=1, rank=20)
    assert layer.uses_dense_path == expect_dense
    shape = (16, 32, 32)
    layer.path = "factored"
    factored = layer.macs(shape)
    assert (factored >= layer.dense_macs(shape)) == expect_dense, (factored, layer.dense_macs(shape))


@pytest.mark.parametrize("padding", [(1, 2), (2, 0), (0, 3)])
@pytest.mark.parametrize("stride", [1, (1, 2), (2, 1)])
@pytest.mark.parametrize("cls", [fnl.TTConv2d, fnl.TuckerConv2d])
def test_1x1_tensor_conv_asymmetric_padding_matches_dense_conv(cls, stride, padding):
    torch.manual_seed(12)
    layer = cls(12, 10, 1, stride, padding, rank_scale=0.5, dtype=torch.float64)
    dense = nn.Conv2d(12, 10, 1, stride, padding, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    y, ref = layer(x), dense(x)
    assert y.shape == ref.shape
    _close(y, ref, atol=1e-10)


def test_conv_inference_reuses_weights_until_a_factor_changes():
    """Without autograd the two convs' contiguous weights are made once; any change of a factor
    (optimizer step, load_state_dict, a new dtype) must show in the next output."""
    torch.manual_seed(13)
    f = fnl.FactorizedConv2d(4, 6, 3, padding=1, rank=3, square=True, path="factored")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y0 = f(x)
        first = f._cached_factor_conv_weights()
        assert all(a is b for a, b in zip(first, f._cached_factor_conv_weights())), "not reused"
        assert all(w.is_contiguous() for w in first)
    opt = torch.optim.SGD(f.parameters(), lr=0.5)
    f(x).square().sum().backward()
    opt.step()
    for step in ("optimizer step", "load_state_dict", "double"):
        if step == "load_state_dict":
            state = {k: torch.randn_like(v) for k, v in f.state_dict().items()}
            f.load_state_dict(state)
        elif step == "double":
            f.double()
            x = x.double()
        with torch.no_grad():
            y = f(x)
        ref = F.conv2d(x, f.dense_weight().detach(), f.bias.detach(), f.stride, f.padding)
        _close(y, ref, atol=1e-5 * ref.abs().max().item())
        if step == "double":
            assert y.dtype == torch.float64
        else:
            assert not torch.allclose(y, y0, atol=1e-3), step
        y0 = y


def test_conv_trace_under_no_grad_reads_the_parameters():
    """A trace must not bake the reused inference weights in as constants."""
    torch.manual_seed(14)
    f = fnl.FactorizedConv2d(3, 4, 3, padding=1, rank=2, path="factored")
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        traced = torch.jit.trace(f, x)
        f.U.mul_(2.0)
        _close(traced(x), f(x), atol=1e-6)


# --- one layer protocol (fnl.FactorizedLayer): every kind, every whole-model function ----------
def _every_kind():
    torch.manual_seed(0)
    return [
        ("linear", fnl.FactorizedLinear(6, 5, rank=3), (4, 6)),
        ("linear_square", fnl.FactorizedLinear(6, 5, rank=3, square=True), (4, 6)),
        ("conv", fnl.FactorizedConv2d(3, 4, 3, padding=1, rank=2, path="factored"), (2, 3, 6, 6)),
        ("embedding", fnl.FactorizedEmbedding(7, 4, rank=2, padding_idx=0), (3, 5)),
        ("tt", fnl.TTConv2d(8, 8, 3, padding=1, rank_scale=0.5), (2, 8, 5, 5)),
        ("tucker", fnl.TuckerConv2d(8, 8, 1, rank_scale=0.5), (2, 8, 5, 5)),
    ]


def _input(layer, shape):
    if isinstance(layer, fnl.FactorizedEmbedding):
        return torch.randint(0, layer.num_embeddings, shape)
    return torch.randn(shape)


def test_factorized_layer_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        fnl.FactorizedLayer()

    class Partial(fnl.FactorizedLayer):  # no inference_form, counts, ...
        def factor_parameters(self):
            return []

    with pytest.raises(TypeError, match="inference_form"):
        Partial()


@pytest.mark.parametrize("kind", [k for k, _, _ in _every_kind()])
def test_every_layer_kind_follows_the_protocol(kind):
    name, layer, shape = next(c for c in _every_kind() if c[0] == kind)
    x = _input(layer, shape)
    params = {id(p) for p in layer.parameters()}
    assert layer.factor_parameters() and all(id(p) in params for p in layer.factor_parameters())
    assert tuple(layer.dense_weight().shape) == tuple(layer._dense_weight_shape())
    # dense equivalent: same function, dense counts
    dense = layer.to_dense()
    _close(layer(x), dense(x))
    assert layer.dense_num_parameters() == sum(p.numel() for p in dense.parameters())
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())
    assert layer.macs(shape[1:]) > 0 and layer.dense_macs(shape[1:]) >= 0
    # FD gradient = autograd of (coef/2) * frobenius_norm_sq, and the norm is that of the regularised matrix
    coef = 0.3
    for p in layer.factor_parameters():
        p.grad = None
    (0.5 * coef * layer.frobenius_norm_sq()).backward()
    want = [p.grad.clone() for p in layer.factor_parameters()]
    for p in layer.factor_parameters():
        p.grad = None
    layer.add_frobenius_grad_(coef)
    for p, w in zip(layer.factor_parameters(), want):
        _close(p.grad, w, atol=1e-6)
    matrix = layer.matrix() if hasattr(layer, "matrix") else layer.dense_weight()
    _close(layer.frobenius_norm_sq(), matrix.double().square().sum().float(), atol=1e-4)
    before = layer.frobenius_norm_sq().detach()
    layer.scale_matrix_(4.0)
    _close(layer.frobenius_norm_sq().detach(), 16 * before, atol=1e-4)
    # from_dense of its own dense layer reproduces it: at the same rank (the dense weight has that rank);
    # the tensor formats at full ranks (docs/method.md#tensor-formats)
    rank = {"rank": layer.rank} if not isinstance(layer.rank, tuple) else {"rank_scale": 1.0}
    again = type(layer).from_dense(layer.to_dense(), **rank)
    _close(again(x), layer(x), atol=1e-4)


@pytest.mark.parametrize("kind", [k for k, _, _ in _every_kind()])
def test_inference_form_same_function_or_clear_refusal(kind):
    _, layer, shape = next(c for c in _every_kind() if c[0] == kind)
    x = _input(layer, shape)
    if not layer.has_inference_form:
        with pytest.raises(ValueError, match="no plain-torch inference form.*collapse"):
            layer.inference_form()
        return
    with torch.no_grad():  # a trained layer: no factor at its init (S = I would hide a dropped S)
        for p in layer.factor_parameters():
            p.add_(0.3 * torch.randn_like(p))
    plain = layer.inference_form()
    assert not any(isinstance(m, fnl.FactorizedLayer) for m in plain.modules())
    folded = layer.S.numel() if layer.S is not None else 0  # S is multiplied into one of the two weights
    assert sum(p.numel() for p in plain.parameters()) == layer.num_parameters() - folded
    with torch.no_grad():
        _close(plain(x), layer(x))
