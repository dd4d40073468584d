"""Guards against classes of realistic one-line bugs that leave the method's maths intact.

Each test names the class of bug it exists to catch; every one was checked by injecting such a
bug into the library and watching the test fail. Statistical checks use large layers, fixed seeds
and tolerances far below the size of the bug they guard against (a wrong fan-in changes a std by
a factor of sqrt(fan-in ratio), >= 1.7x here; the tolerance is 3%).
"""
import copy
import fnmatch
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fnl

REL = 0.03  # statistical tolerance on a std estimated from >= 10,000 draws (standard error < 0.7%)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _std(t):
    return t.detach().double().std().item()


def _uniform_std(fan_in):
    """Std of torch's default layer init, Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1 / math.sqrt(3 * fan_in)


def _kaiming_normal(w):
    nn.init.kaiming_normal_(w)  # fan-in mode, gain sqrt(2)


def _assert_uniform_bound(t, bound):
    """Draws of U(-bound, bound): none beyond it, the largest within 1% of it, std bound/sqrt(3)."""
    a = t.detach().double().abs()
    assert a.max().item() <= bound * (1 + 1e-6), (a.max().item(), bound)
    assert a.max().item() >= 0.99 * bound, (a.max().item(), bound)
    assert _std(t) == pytest.approx(bound / math.sqrt(3), rel=REL)


# --- initialisation: default (per-factor) init ---------------------------------------------------

@pytest.mark.parametrize("in_f, out_f, rank", [(400, 600, 40), (600, 150, 30)])
def test_linear_default_init_fan_ins(in_f, out_f, rank):
    """Vᵀ is the weight of an in -> r layer (fan-in ``in``), U of an r -> out layer (fan-in r).
    Bugs: the init applied to V (fan-in r) or to Uᵀ (fan-in out), a dense fan-in for both."""
    torch.manual_seed(0)
    f = fnl.FactorizedLinear(in_f, out_f, rank=rank)
    _assert_uniform_bound(f.V, 1 / math.sqrt(in_f))
    _assert_uniform_bound(f.U, 1 / math.sqrt(rank))
    g = fnl.FactorizedLinear(in_f, out_f, rank=rank, init=_kaiming_normal)
    assert _std(g.V) == pytest.approx(math.sqrt(2 / in_f), rel=REL)
    assert _std(g.U) == pytest.approx(math.sqrt(2 / rank), rel=REL)
    # the product: a sum of r products of independent entries
    assert _std(g.matrix()) == pytest.approx(math.sqrt(rank * 2 / in_f * 2 / rank), rel=REL)


@pytest.mark.parametrize("square", [False, True])
def test_conv_default_init_fan_ins(square):
    """The reference's scheme: init on the matrices Vᵀ (r x in*kw, fan-in in*kw) and U (out*kh x r,
    fan-in r). Bugs: U read as the (out, r, kh, 1) conv weight (fan-in r*kh), kh and kw swapped,
    the dense fan-in in*kh*kw, the init applied to V."""
    torch.manual_seed(1)
    cin, cout, (kh, kw), rank = 40, 64, (3, 5), 48
    f = fnl.FactorizedConv2d(cin, cout, (kh, kw), rank=rank, square=square)
    _assert_uniform_bound(f.V, 1 / math.sqrt(cin * kw))
    _assert_uniform_bound(f.U, 1 / math.sqrt(rank))
    g = fnl.FactorizedConv2d(cin, cout, (kh, kw), rank=rank, square=square, init=_kaiming_normal)
    assert _std(g.V) == pytest.approx(math.sqrt(2 / (cin * kw)), rel=REL)
    assert _std(g.U) == pytest.approx(math.sqrt(2 / rank), rel=REL)
    if square:
        assert torch.equal(f.S.detach(), torch.eye(rank)) and torch.equal(g.S.detach(), torch.eye(rank))


def test_embedding_default_init():
    """None: U ~ N(0, 1) like nn.Embedding's table, V ~ N(0, 1/r), so the table has unit variance;
    a given init goes to both factors. Bugs: std 1/r or 1/sqrt(dim) on V, the init on one factor."""
    torch.manual_seed(2)
    f = fnl.FactorizedEmbedding(3000, 96, rank=24)
    assert _std(f.U) == pytest.approx(1.0, rel=REL)
    assert _std(f.V) == pytest.approx(1 / math.sqrt(24), rel=REL)
    assert abs(f.U.detach().mean().item()) < 0.02 and abs(f.V.detach().mean().item()) < 0.02
    assert _std(f.dense_weight()) == pytest.approx(1.0, rel=REL)
    g = fnl.FactorizedEmbedding(3000, 96, rank=24, init=lambda w: nn.init.normal_(w, std=0.3))
    assert _std(g.U) == pytest.approx(0.3, rel=REL) and _std(g.V) == pytest.approx(0.3, rel=REL)
    h = fnl.FactorizedEmbedding(3000, 96, padding_idx=7, rank=24, square=True)
    assert torch.equal(h.U[7].detach(), torch.zeros(24)) and torch.equal(h.S.detach(), torch.eye(24))


@pytest.mark.parametrize("spectral", [False, True])
def test_embedding_padding_row_stays_zero_and_untrained(spectral):
    """As ``nn.Embedding``: the padding row of the table is zero and gets no gradient (so no optimizer
    step moves it), whichever init."""
    torch.manual_seed(12)
    layer = fnl.FactorizedEmbedding(10, 6, padding_idx=3, rank=4, square=True, spectral=spectral)
    assert torch.equal(layer.dense_weight()[3].detach(), torch.zeros(6))
    idx = torch.tensor([[3, 1, 3, 5], [0, 3, 9, 3]])
    (layer(idx) * torch.randn(2, 4, 6)).sum().backward()  # non-zero output gradients at the padding rows too
    assert torch.equal(layer.U.grad[3], torch.zeros(4)), layer.U.grad[3]
    assert layer.U.grad[1].abs().sum() > 0
    assert torch.equal(layer(torch.tensor([3])).detach(), torch.zeros(1, 6))


def test_bias_init_uses_the_dense_fan_in():
    """Biases as the dense layer's: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the dense fan-in
    (in, in*kh*kw). Bugs: the rank, the factor's fan-in, or in*kh for a conv."""
    torch.manual_seed(3)
    _assert_uniform_bound(fnl.FactorizedLinear(7, 6000, rank=1).bias, 1 / math.sqrt(7))
    _assert_uniform_bound(fnl.FactorizedConv2d(3, 6000, (3, 5), rank=1).bias, 1 / math.sqrt(45))
    for cls in (fnl.TTConv2d, fnl.TuckerConv2d):
        _assert_uniform_bound(cls(3, 4096, (3, 5), rank=1).bias, 1 / math.sqrt(45))


def test_tensor_conv_default_init_scales():
    """Depthwise filters get nn.Conv2d's init for an (in, 1, kh, kw) weight (fan-in kh*kw); the rebuilt
    1x1 matrix has the variance of the dense 1x1 init (fan-in ``in``)."""
    torch.manual_seed(4)
    for cls in (fnl.TTConv2d, fnl.TuckerConv2d):
        layer = cls(512, 64, (3, 5), rank_scale=0.5)
        _assert_uniform_bound(layer.depthwise, 1 / math.sqrt(15))
        assert _std(layer.matrix()) == pytest.approx(_uniform_std(512), rel=0.1)  # few independent cores


@pytest.mark.parametrize("make, fan_in, std", [
    (lambda: fnl.FactorizedLinear(200, 300, rank_scale=1.0, spectral=True), 200, None),
    (lambda: fnl.FactorizedConv2d(40, 50, (3, 5), rank_scale=1.0, spectral=True), 40 * 15, None),
    (lambda: fnl.FactorizedEmbedding(400, 64, rank_scale=1.0, spectral=True), None, 1.0),
])
def test_spectral_init_at_full_rank_is_the_dense_init(make, fan_in, std):
    """Spectral init factorizes a draw of the dense layer's own init: at full rank the product has
    its distribution (bound and std), and S is the identity."""
    torch.manual_seed(5)
    layer = make()
    w = layer.dense_weight()
    if fan_in is not None:
        _assert_uniform_bound(w, 1 / math.sqrt(fan_in))
    else:
        assert _std(w) == pytest.approx(std, rel=REL)
    square = type(layer)(*_ctor_args(layer), rank_scale=1.0, spectral=True, square=True)
    assert torch.equal(square.S.detach(), torch.eye(square.rank))


def _ctor_args(layer):
    if isinstance(layer, fnl.FactorizedLinear):
        return layer.in_features, layer.out_features
    if isinstance(layer, fnl.FactorizedConv2d):
        return layer.in_channels, layer.out_channels, layer.kernel_size
    return layer.num_embeddings, layer.embedding_dim


def test_reset_parameters_restores_the_identity_s():
    torch.manual_seed(6)
    for layer in (fnl.FactorizedLinear(8, 6, rank=4, square=True), fnl.FactorizedConv2d(3, 4, 3, rank=5, square=True),
                  fnl.FactorizedEmbedding(9, 5, rank=3, square=True)):
        with torch.no_grad():
            layer.S.normal_()
        layer.reset_parameters()
        assert torch.equal(layer.S.detach(), torch.eye(layer.rank)), type(layer).__name__


# --- counts and solvers ----------------------------------------------------------------------------

class Mixed(nn.Module):
    """Layers whose rank bases differ: convs with kh != kw (base out*kh), linears with in > out and
    in < out (base min), an embedding, with and without bias, and fixed parameters (a norm, a
    grouped conv that is never factorized)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv2d(3, 5, (3, 1), padding=(1, 0))  # base 15
        self.conv2 = nn.Conv2d(5, 4, (1, 3), bias=False)  # base 4
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.fc1 = nn.Linear(12, 7)  # base 7
        self.fc2 = nn.Linear(7, 9, bias=False)  # base 7
        self.norm = nn.LayerNorm(9)


def _bases(model, embeddings, include=None):
    out = []
    for name, m in model.named_modules():
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if type(m) is nn.Conv2d and m.groups == 1:
            out.append(m.out_channels * m.kernel_size[0])
        elif type(m) is nn.Linear:
            out.append(min(m.in_features, m.out_features))
        elif type(m) is nn.Embedding and embeddings:
            out.append(min(m.num_embeddings, m.embedding_dim))
    return out


def _step_scales(bases, top=1.0):
    """One rank_scale inside every step of the piecewise-constant counts on (0, top]: ranks change at
    (k + 1/2) / base, so the midpoints between consecutive change points (and the ends) cover all."""
    points = sorted({(k + 0.5) / b for b in bases for k in range(b) if (k + 0.5) / b < top})
    edges = [0.0, *points, top]
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])] + [top]


def _targets(ratios):
    """Targets that demand the closest step: 30% and 70% of the way between consecutive reachable
    ratios (the nearest is then unique), and each reachable ratio itself (above 1 too: square and
    overcomplete layers can hold more parameters than the dense model)."""
    rs = sorted(set(ratios))
    out = list(rs)
    for a, b in zip(rs, rs[1:]):
        out += [a + 0.3 * (b - a), a + 0.7 * (b - a)]
    return sorted(out)


@pytest.mark.parametrize("square, embeddings, include", [
    (False, False, None), (True, False, None), (False, True, None), (True, True, None),
    (True, True, ["emb", "conv*"]),
])
def test_solve_rank_scale_is_the_closest_reachable_by_brute_force(square, embeddings, include):
    """Against the ratios of actually factorized copies at one rank_scale in every step: the solved
    scale's ratio is the closest to every target (square layers count their r x r S; embeddings
    count only when asked; biases and unfactorized layers count as fixed). Bugs: S ignored, the
    step above the target always taken, a wrong rank base (in*kw, max(m, n)), biases dropped."""
    model = Mixed()
    dense = fnl.count_parameters(model)

    def ratio_of(scale):
        m = fnl.factorize(copy.deepcopy(model), rank_scale=scale, square=square, embeddings=embeddings,
                          include=include)
        return fnl.count_parameters(m) / dense

    reachable = [ratio_of(s) for s in _step_scales(_bases(model, embeddings, include))]
    for target in _targets(reachable):
        scale = fnl.solve_rank_scale(model, target, square=square, embeddings=embeddings, include=include)
        got = ratio_of(scale)
        best = min(reachable, key=lambda r: abs(r - target))
        assert abs(got - target) <= abs(best - target) + 1e-12, \
            f"target {target:.5f}: ratio {got:.5f} at scale {scale:.4f}, but {best:.5f} is reachable"
    # through factorize: the same solution is applied, with the same square / embeddings settings
    targets = _targets(reachable)
    target = targets[len(targets) // 2]
    m = fnl.factorize(copy.deepcopy(model), target_ratio=target, square=square, embeddings=embeddings,
                      include=include)
    assert fnl.count_parameters(m) / dense == ratio_of(fnl.solve_rank_scale(model, target, square=square,
                                                                            embeddings=embeddings, include=include))


def test_solve_rank_scale_square_target_of_the_issue():
    """A square model at target 0.8 lands within one step of it (ignoring S gives 0.978)."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    scale = fnl.solve_rank_scale(model, 0.8, square=True)
    m = fnl.factorize(copy.deepcopy(model), rank_scale=scale, square=True)
    r = m[0].rank
    assert m[0].num_parameters() == r * 64 + r * r + 32
    got = fnl.count_parameters(m) / fnl.count_parameters(model)
    step = max(abs((k * 64 + k * k) - ((k - 1) * 64 + (k - 1) ** 2)) for k in (r, r + 1)) * 4 / \
        fnl.count_parameters(model)
    assert abs(got - 0.8) <= step / 2 + 1e-12, got


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 12, 1, bias=False)  # no depthwise part
        self.c = nn.Conv2d(12, 18, (3, 1), padding=(1, 0))
        self.head = nn.Linear(18, 5)


def _tensor_bases(model, fmt, exclude=()):
    bases = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and name not in exclude:
            o, i = fnl.tensor_modes(m.out_channels, m.in_channels)
            n = [a * b for a, b in zip(o, i)]
            bases += [min(n[0], n[1]), min(n[1], n[2])] if fmt == "tt" else n
    return bases


@pytest.mark.parametrize("exclude", [None, ["a"]])
@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_solve_tensor_scale_is_the_closest_reachable_by_brute_force(fmt, exclude):
    """The tensor counterpart: against tensorized copies (depthwise filters of k x k convs, biases,
    the dense head and excluded convs all count)."""
    model = ConvNet()
    dense = fnl.count_parameters(model)

    def ratio_of(scale):
        m = fnl.tensorize(copy.deepcopy(model), tensor_format=fmt, rank_scale=scale, exclude=exclude)
        return fnl.count_parameters(m) / dense

    reachable = [ratio_of(s) for s in _step_scales(_tensor_bases(model, fmt, exclude or ()))]
    for target in _targets(reachable)[::2]:
        scale = fnl.solve_tensor_scale(model, target, fmt, exclude=exclude)
        got = ratio_of(scale)
        best = min(reachable, key=lambda r: abs(r - target))
        assert abs(got - target) <= abs(best - target) + 1e-12, \
            f"target {target:.5f}: ratio {got:.5f} at scale {scale:.4f}, but {best:.5f} is reachable"


def test_count_parameters_dense_and_summary_of_square_and_embedding_layers():
    """Counts of a factorized model equal those of the model it collapses to (dense) and of its own
    parameters; per-row counts include S. Bugs: S or biases left out of a count, a row's dense
    count taken from the factorized layer."""
    torch.manual_seed(7)
    model = Mixed()
    dense_total = fnl.count_parameters(model)
    fnl.factorize(model, rank_scale=0.5, square=True, embeddings=True)
    s = fnl.summary(model)
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.dense_params == dense_total == fnl.count_parameters(model, dense=True)
    rows = {r.name: r for r in s.rows}
    assert rows["fc1"].params == 4 * (12 + 7) + 16 + 7 and rows["fc1"].dense_params == 12 * 7 + 7
    assert rows["conv1"].params == 8 * (15 + 3) + 64 + 5 and rows["conv1"].dense_params == 5 * 3 * 3 + 5
    assert rows["emb"].params == 3 * (20 + 6) + 9 and rows["emb"].dense_params == 120
    assert s.param_ratio == s.total_params / dense_total
    # without an input there are no MACs to report: None everywhere (not 0)
    assert s.total_macs is None and s.dense_macs is None and s.macs_ratio is None
    assert all(r.macs is None and r.dense_macs is None for r in s.rows)
    assert rows["grouped"].rank is None and rows["fc1"].rank == 4  # dense rows have no rank
    assert fnl.count_parameters(fnl.collapse(model)) == dense_total


def test_conv_macs_count_dilation_and_both_strides():
    """MACs at dilation (2, 3), stride (2, 1), padding (1, 0) on a 12 x 13 input, by hand:
    output 5 x 7; the (1 x 3) conv runs on all 12 input rows at 7 output columns."""
    f = fnl.FactorizedConv2d(4, 6, 3, stride=(2, 1), padding=(1, 0), dilation=(2, 3), rank=5, path="factored")
    h_out, w_out = (12 + 2 - 2 * 2 - 1) // 2 + 1, (13 - 3 * 2 - 1) // 1 + 1
    assert (h_out, w_out) == (5, 7)
    assert f.macs((4, 12, 13)) == 5 * 4 * 3 * 12 * w_out + 6 * 5 * 3 * h_out * w_out
    assert f.dense_macs((4, 12, 13)) == 6 * 4 * 9 * h_out * w_out
    assert f(torch.randn(1, 4, 12, 13)).shape == (1, 6, h_out, w_out)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 0), dilation=(2, 3)))
    assert fnl.count_macs(model, (4, 12, 13)) == 6 * 4 * 9 * h_out * w_out


# --- path choice -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, dense", [((1, 1), False), ((2, 1), True), ((1, 2), False), ((3, 2), True)])
def test_conv_auto_path_uses_the_vertical_stride_only(stride, dense):
    """8 -> 24 channels, 3x3, rank 16: r (8*3*sh + 24*3) = 16 (24 sh + 72) against 24*8*9 = 1728 per
    output pixel: factored at sh = 1 (1536), dense at sh >= 2 (1920); the horizontal stride scales
    both paths alike. The choice agrees with the MAC counts of both paths on a large input."""
    layer = fnl.FactorizedConv2d(8, 24, 3, stride, padding=1, rank=16)
    assert layer.uses_dense_path == dense
    shape = (8, 64, 64)
    layer.path = "factored"
    factored = layer.macs(shape)
    assert (factored > layer.dense_macs(shape)) == dense, (factored, layer.dense_macs(shape))
    layer.path = "auto"
    assert layer.macs(shape) == min(factored, layer.dense_macs(shape))
    x = torch.randn(1, 8, 11, 10)
    y = layer(x)
    layer.path = "dense" if not dense else "factored"
    assert torch.allclose(layer(x), y, atol=1e-5)


@pytest.mark.parametrize("kernel, dilation", [((3, 1), 1), ((1, 5), 1), ((3, 3), (2, 1)), ((5, 3), (1, 3))])
def test_same_padding_is_per_dimension(kernel, dilation):
    """``padding='same'`` pads each dimension by its own dilation * (k - 1) / 2, as ``nn.Conv2d`` does.
    Bug: the two totals swapped (invisible with square kernels and equal dilations)."""
    torch.manual_seed(11)
    dense = nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    for path in ("factored", "dense"):
        layer = fnl.FactorizedConv2d.from_dense(dense, rank_scale=1.0, path=path)
        y = layer(x)
        assert y.shape == dense(x).shape == x.shape[:1] + (4,) + x.shape[2:]
        assert torch.allclose(y, dense(x), atol=1e-10), path
        assert layer.dense_macs((3, 9, 11)) == 4 * 3 * math.prod(_pair(kernel)) * 9 * 11  # output 9 x 11


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def test_conv_from_dense_keeps_the_path():
    conv = nn.Conv2d(3, 4, 3)
    for path in ("auto", "factored", "dense"):
        assert fnl.FactorizedConv2d.from_dense(conv, rank=2, path=path).path == path
        assert fnl.TTConv2d.from_dense(conv, rank=1, path=path).path == path


@pytest.mark.parametrize("cls", [fnl.TTConv2d, fnl.TuckerConv2d])
@pytest.mark.parametrize("stride, padding", [((1, 1), (0, 2)), ((1, 1), (2, 0)), ((2, 1), (1, 3)),
                                             ((1, 2), (3, 1)), ((2, 3), (0, 1))])
def test_1x1_tensor_conv_pads_height_and_width_apart(cls, stride, padding):
    """A 1x1 tensor conv pads and subsamples itself (no depthwise conv): height padding on the top and
    bottom, width padding left and right, the vertical stride on rows. Bugs: ``F.pad`` arguments in
    (H, W) order, strides swapped in the slicing."""
    torch.manual_seed(8)
    layer = cls(6, 4, 1, stride, padding, rank_scale=1.0, dtype=torch.float64)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    ref = F.conv2d(x, layer.dense_weight().detach(), layer.bias.detach(), stride, padding)
    for path in ("factored", "dense"):
        layer.path = path
        y = layer(x)
        assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-12), path
    with pytest.raises(ValueError, match="padding"):
        cls(6, 4, 1, padding="same", rank=1)


@pytest.mark.parametrize("cls", [fnl.TTConv2d, fnl.TuckerConv2d])
def test_tensor_conv_auto_path_counts_the_batch(cls):
    """Rebuilding the 1x1 matrix is paid once per call, the contraction once per pixel of the whole
    batch: with 1 x 1 inputs, 32 -> 32 channels at scale 0.5, contracting is cheaper for one sample
    and rebuilding for 16. 'auto' must take the cheaper path of each call (torch's own count, on
    the meta device). Bug: the plan counting the pixels of one sample only."""
    layer = cls(32, 32, 1, rank_scale=0.5).to("meta")

    def flops(path, batch):
        layer.path = path
        with FlopCounterMode(display=False) as counter:
            layer(torch.empty(batch, 32, 1, 1, device="meta"))
        return counter.get_total_flops()

    for batch, cheaper in ((1, "factored"), (16, "dense")):
        costs = {p: flops(p, batch) for p in ("factored", "dense")}
        assert min(costs, key=costs.get) == cheaper, (batch, costs)  # the case does exercise the choice
        assert flops("auto", batch) == costs[cheaper], (batch, costs)


# --- factors other than the identity: S and the tensor cores --------------------------------------

def test_collapse_square_embedding_and_linear_with_trained_s():
    """``collapse`` (and each layer's forward) must use S as trained, in the right orientation
    (``U S Vᵀ``, not ``U Sᵀ Vᵀ``) for every layer kind, embeddings included."""
    torch.manual_seed(9)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.conv = nn.Conv2d(6, 5, (3, 2), padding=(1, 0))
            self.fc = nn.Linear(5, 4)

        def forward(self, idx):
            h = self.emb(idx).transpose(1, 2)[..., None]  # (B, 6, L, 1)
            h = self.conv(torch.cat([h, h.flip(2)], 3))  # (B, 5, L, 1)
            return self.fc(h.mean((2, 3)))

    model = fnl.factorize(Tiny(), rank_scale=0.5, square=True, embeddings=True).eval()
    assert len(fnl.factorized_layers(model)) == 3
    with torch.no_grad():
        for layer in fnl.factorized_layers(model):
            layer.S.copy_(torch.eye(layer.rank) + torch.triu(torch.randn(layer.rank, layer.rank), 1))
    idx = torch.randint(0, 11, (3, 7))
    y = model(idx)
    fnl.collapse(model)
    assert not fnl.factorized_layers(model)
    assert torch.allclose(model(idx), y, atol=1e-5), (model(idx) - y).abs().max()


@pytest.mark.parametrize("cls", [fnl.TTConv2d, fnl.TuckerConv2d])
def test_tensor_spectral_init_balances_the_cores(cls):
    """Spectral init and ``from_dense`` spread the norm evenly over the cores (equal Frobenius norms),
    keeping the product."""
    torch.manual_seed(10)
    layer = cls(24, 20, 3, rank_scale=0.5, spectral=True, dtype=torch.float64)
    norms = [p.detach().norm().item() for p in layer.factor_parameters()]
    assert max(norms) / min(norms) == pytest.approx(1.0, abs=1e-9), norms
    conv = nn.Conv2d(24, 20, 1, dtype=torch.float64)
    n = layer.modes
    full = n if cls is fnl.TuckerConv2d else (min(n[0], n[1] * n[2]), min(n[0] * n[1], n[2]))
    back = cls.from_dense(conv, rank=full)
    norms = [p.detach().norm().item() for p in back.factor_parameters()]
    assert max(norms) / min(norms) == pytest.approx(1.0, abs=1e-9), norms
    assert torch.allclose(back.dense_weight(), conv.weight, atol=1e-10)
