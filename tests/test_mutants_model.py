"""fnl/model.py: the summary table users read, counts, the rank_scale solver, factorize / collapse.

Written to kill the surviving mutants of ``fnl/model.py`` (tests/README.md, "Mutation testing"): every
test checks exact text or exact numbers, from closed forms (docs/method.md: a factorized m x n layer of
rank r has r (m + n) parameters, plus r^2 with ``square``) or from the layers' own counts.
"""
import copy

import pytest
import torch
from torch import nn

import fnl


def _two_linears():
    """Linear(64 -> 32) factorized at rank 4, Linear(32 -> 8) left dense (excluded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    return fnl.factorize(model, rank=4, exclude=["2"])


# 32x64 at rank 4: 4 (32 + 64) + 32 bias = 416 parameters (dense 2,048 + 32), 4 (32 + 64) = 384 MACs
# (dense 2,048); the dense 8x32 layer: 264 parameters, 256 MACs. Ratios 680 / 2,344 and 640 / 2,304.
_GOLDEN = """\
layer                kind              shape  rank  params  dense params    MACs  dense MACs  why dense
----------------------------------------------------------------------------------------------------------------------------------------------------
0                    FactorizedLinear  32x64  4        416         2,080     384       2,048
2                    Linear            8x32   -        264           264     256         256  not selected (include / exclude, or the model's rules)
----------------------------------------------------------------------------------------------------------------------------------------------------
total (whole model)                                    680         2,344     640       2,304
ratio                                               0.2901                0.2778"""

# the same model without an input: no MACs ("-" everywhere in their columns, right-aligned)
_GOLDEN_NO_MACS = """\
layer                kind              shape  rank  params  dense params  MACs  dense MACs  why dense
--------------------------------------------------------------------------------------------------------------------------------------------------
0                    FactorizedLinear  32x64  4        416         2,080     -           -
2                    Linear            8x32   -        264           264     -           -  not selected (include / exclude, or the model's rules)
--------------------------------------------------------------------------------------------------------------------------------------------------
total (whole model)                                    680         2,344     -           -
ratio                                               0.2901                   -"""


def test_summary_table_exact_text():
    model = _two_linears()
    s = fnl.summary(model, (64,))
    assert str(s) == _GOLDEN
    assert str(fnl.summary(model)) == _GOLDEN_NO_MACS


def test_summary_rows_are_the_layers_own_counts():
    model = _two_linears()
    s = fnl.summary(model, (64,))
    fact, dense = model[0], model[2]
    assert [(r.name, r.kind, r.shape, r.rank) for r in s.rows] == [
        ("0", "FactorizedLinear", "32x64", 4), ("2", "Linear", "8x32", None)]
    r0, r2 = s.rows
    assert (r0.params, r0.dense_params) == (fact.num_parameters(), fact.dense_num_parameters()) == (416, 2080)
    assert (r0.macs, r0.dense_macs) == (fact.macs((64,)), fact.dense_macs((64,))) == (384, 2048)
    assert r0.why_dense is None
    assert (r2.params, r2.dense_params, r2.macs, r2.dense_macs) == (264, 264, 256, 256)
    assert (s.total_params, s.dense_params, s.total_macs, s.dense_macs) == (680, 2344, 640, 2304)
    assert s.param_ratio == 680 / 2344 and s.macs_ratio == 640 / 2304
    assert dense.weight.numel() + dense.bias.numel() == 264
    s0 = fnl.summary(model)
    assert (s0.total_macs, s0.dense_macs, s0.macs_ratio) == (None, None, None)
    assert [(r.macs, r.dense_macs) for r in s0.rows] == [(None, None), (None, None)]


def test_count_macs_from_example_input_or_input_size():
    model = _two_linears()
    assert fnl.count_macs(model, (64,)) == 640
    assert fnl.count_macs(model, (64,), dense=True) == 2304
    assert fnl.count_macs(model, example_input=torch.randn(1, 64)) == 640
    assert fnl.count_macs(model, example_input=torch.randn(1, 64), dense=True) == 2304
    # token ids: only an example_input can carry them
    emb = fnl.factorize(nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)), rank=2, embeddings=True,
                        include=["0"])
    tokens = torch.tensor([[1, 7, 3]])
    assert fnl.count_macs(emb, example_input=tokens) == emb[0].macs((3,)) + 3 * 16 * 8
    # a dense embedding is a lookup: no multiply-adds
    plain = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    rows = fnl.summary(plain, example_input=tokens).rows
    assert [(r.macs, r.dense_macs) for r in rows] == [(0, 0), (384, 384)]
    with pytest.raises(ValueError, match=r"^count_macs needs input_size \(one sample's shape, e\.g\. \(3, 32, 32\)\) "
                                         r"or example_input$"):
        fnl.count_macs(model)


# conv rows: 8x3x3x3 at rank 2 is U (8*3 x 2) and V (3*3 x 2): 66 + 8 bias = 74 parameters; on 3x6x6
# (padding 1) its MACs are 2*3*3*36 (V, 1x3) + 8*2*3*36 (U, 3x1) = 2,376, dense 8*27*36 = 7,776; the
# grouped conv (groups=2, no bias) is 8*4*9 = 288 parameters and 8*4*9*36 = 10,368 MACs.
_GOLDEN_CONV = """\
layer                kind              shape    rank  params  dense params    MACs  dense MACs  why dense
----------------------------------------------------------------------------------------------------------------------------------------------------------
0                    FactorizedConv2d  8x3x3x3  2         74           224   2,376       7,776
1                    Conv2d            8x4x3x3  -        288           288  10,368      10,368  grouped conv (groups=2): the factorized conv has one group
----------------------------------------------------------------------------------------------------------------------------------------------------------
total (whole model)                                      362           512  12,744      18,144
ratio                                                 0.7070                0.7024"""


def test_summary_of_convs_exact_text_and_integer_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False))
    fnl.factorize(model, rank=2, include=["0"])
    s = fnl.summary(model, (3, 6, 6))
    assert str(s) == _GOLDEN_CONV
    assert [(r.macs, r.dense_macs) for r in s.rows] == [(2376, 7776), (10368, 10368)]
    assert all(type(x) is int for r in s.rows for x in (r.params, r.dense_params, r.macs, r.dense_macs))
    total, dense = fnl.count_macs(model, (3, 6, 6)), fnl.count_macs(model, (3, 6, 6), dense=True)
    assert (total, dense) == (12744, 18144) and type(total) is int and type(dense) is int


def test_summary_says_why_dense_for_each_refusal_and_root_attention():
    class SubConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), SubConv(4, 4, 1),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Embedding(5, 4), nn.Linear(4, 4))
    fnl.factorize(model, rank=2, include=["1"])
    model.fnl_kept_dense = {"5": 7}  # a recorded reason is shown as text, whatever its type
    why = {r.name: r.why_dense for r in fnl.summary(model).rows}
    assert why == {
        "0": "not selected (include / exclude, or the model's rules)",
        "1": None,
        "2": "SubConv is a subclass of nn.Conv2d (exact types only)",
        "3": "padding_mode='circular': the factorized conv pads with zeros",
        "4": "embedding (factorized only with embeddings=True)",
        "5": "7",
    }
    # the model itself an attention block: its projections are named without a prefix
    mha = nn.MultiheadAttention(8, 2)
    rows = fnl.summary(mha).rows
    assert [(r.name, r.why_dense) for r in rows] == [
        ("out_proj", "inside nn.MultiheadAttention (it reads the weight directly)")]
    outer = nn.Sequential(nn.Sequential(nn.MultiheadAttention(8, 2)), nn.Linear(8, 8))
    assert [(r.name, r.why_dense) for r in fnl.summary(outer).rows] == [
        ("0.0.out_proj", "inside nn.MultiheadAttention (it reads the weight directly)"),
        ("1", "not selected (include / exclude, or the model's rules)")]


def test_factorize_never_swaps_a_plain_linear_inside_attention():
    """Attention reads ``out_proj.weight`` itself: even an exact nn.Linear put there stays dense."""
    for prefix, model in (("", nn.MultiheadAttention(8, 2)),
                          ("0.", nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8)))):
        mha = model if not prefix else model[0]
        mha.out_proj = nn.Linear(8, 8)
        if prefix:
            fnl.factorize(model, rank=2)
            assert type(model[1]) is fnl.FactorizedLinear
        else:
            with pytest.raises(ValueError, match=r"^include=\['\*'\] selects no nn.Linear / nn.Conv2d \(groups=1\) "
                                                 r"in the model$"):
                fnl.factorize(model, rank=2, include=["*"])
        assert type(mha.out_proj) is nn.Linear
        assert summary_why(model, prefix + "out_proj") == "inside nn.MultiheadAttention (it reads the weight directly)"


def summary_why(model, name):
    return next(r.why_dense for r in fnl.summary(model).rows if r.name == name)


def test_summary_input_is_one_sample_of_zeros_in_the_models_dtype_and_device():
    seen = []

    class Probe(nn.Module):
        def __init__(self, dtype=None, device=None):
            super().__init__()
            self.fc = nn.Linear(6, 3, dtype=dtype, device=device)

        def forward(self, x):
            seen.append((tuple(x.shape), x.dtype, x.device.type, bool((x == 0).all()) if x.device.type != "meta"
                         else None))
            return self.fc(x)

    fnl.summary(Probe(), (6,))
    fnl.summary(Probe(dtype=torch.float64), (6,))
    assert fnl.summary(Probe(device="meta"), (6,)).total_macs == 18
    assert seen == [((1, 6), torch.float32, "cpu", True), ((1, 6), torch.float64, "cpu", True),
                    ((1, 6), torch.float32, "meta", None)]
    # no parameters: float32 on the default device
    seen.clear()

    class NoParams(nn.Module):
        def forward(self, x):
            seen.append((tuple(x.shape), x.dtype))
            return x

    s = fnl.summary(NoParams(), (2, 3))
    assert seen == [((1, 2, 3), torch.float32)] and s.rows == [] and (s.total_macs, s.dense_macs) == (0, 0)
    # an integer (frozen) parameter first: the input stays float32
    class IntFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    model = IntFirst()
    assert not next(model.parameters()).is_floating_point()
    assert fnl.count_macs(model, (4,)) == 8


# --- solve_rank_scale against its closed form ------------------------------------------------------------
# Linear(8 -> 16, no bias) at rank r: U (16 x r) and V (8 x r), 24 r parameters (+ r^2 with square), rank
# base min(16, 8) = 8 (rank = round(8 * rank_scale), at least 1). Everything else counts as fixed.

def _closest_rank(count, target, dense, ranks):
    """The rank whose whole-model ratio is closest to target; a tie goes to the larger rank."""
    return min(ranks, key=lambda r: (abs(count(r) / dense - target), -r))


@pytest.mark.parametrize("square", [False, True])
def test_solve_rank_scale_closed_form_of_one_layer(square):
    model = nn.Sequential(nn.Linear(8, 16, bias=False))
    dense = 128

    def count(r):
        return 24 * r + (r * r if square else 0)

    ratios = [count(r) / dense for r in range(1, 9)]
    targets = sorted({t for a, b in zip(ratios, ratios[1:]) for t in (a, (a + b) / 2, a + 0.3 * (b - a),
                                                                        a + 0.7 * (b - a), b)})
    for target in targets:
        scale = fnl.solve_rank_scale(model, target, square=square)
        want = _closest_rank(count, target, dense, range(1, 9))
        assert max(1, round(scale * 8)) == want, (target, scale)
        assert 0 < scale <= 1.0
        layer = fnl.factorize(nn.Sequential(nn.Linear(8, 16, bias=False)), rank_scale=scale, square=square)[0]
        assert layer.rank == want and layer.num_parameters() == count(want)
    # the exact midpoints are ties (binary fractions): the larger rank wins
    if not square:
        assert fnl.solve_rank_scale(model, (48 + 72) / 2 / 128) > 2.5 / 8
    # square: target 0.5 is rank 2 (52 / 128) counting S; without S it would be rank 3 (72 / 128)
    assert round(fnl.solve_rank_scale(model, 0.5, square=square) * 8) == (2 if square else 3)
    # at (or below the step of) every rank 1 the smallest scale is returned, a scale of 1e-9
    assert fnl.solve_rank_scale(model, count(1) / dense, square=square) == 1e-9
    lowest, highest = count(1) / dense, count(8) / dense
    with pytest.raises(ValueError, match=rf"^target_ratio=0\.1 cannot be reached: this model's ratios run from "
                                         rf"{lowest:.6g} \(every rank 1\) to {highest:.6g} \(rank_scale 1\.0\)$"):
        fnl.solve_rank_scale(model, 0.1, square=square)
    assert round(fnl.solve_rank_scale(model, highest, square=square) * 8) == 8
    with pytest.raises(ValueError, match=r"^target_ratio=2\.5 cannot be reached"):
        fnl.solve_rank_scale(model, 2.5, square=square)


def test_solve_rank_scale_fixed_parameters_and_rank_bases():
    """Biases, norms, excluded layers and factorized layers already there (at their dense size) are fixed;
    the bases are min(m, n) for Linear / Embedding and out * kh for Conv2d (docs/method.md)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)                        # base 6, 26 r, no bias
            self.conv = nn.Conv2d(4, 6, (3, 1))                   # base 18, (18 + 4) r + 6
            self.fc = nn.Linear(16, 8)                            # base 8, 24 r + 8
            self.bn = nn.BatchNorm1d(8)                           # 16 fixed
            self.done = fnl.FactorizedLinear(8, 8, rank=2)        # fixed at its dense 64 + 8
            self.head = nn.Linear(8, 3)                           # excluded: 27 fixed

    model = Net()
    dense = 120 + 72 + 6 + 128 + 8 + 16 + 72 + 27
    assert fnl.count_parameters(model, dense=True) == dense

    def count(scale, embeddings):
        def r(base):
            return max(1, round(scale * base))
        fixed = 6 + 8 + 16 + 72 + 27 + (0 if embeddings else 120)
        return fixed + 22 * r(18) + 24 * r(8) + (26 * r(6) if embeddings else 0)

    for embeddings in (False, True):
        lowest, highest = count(0.0, embeddings) / dense, count(1.0, embeddings) / dense
        with pytest.raises(ValueError, match=rf"^target_ratio=0\.01 cannot be reached: this model's ratios run from "
                                             rf"{lowest:.6g} \(every rank 1\) to {highest:.6g} \(rank_scale 1\.0\)$"):
            fnl.solve_rank_scale(model, 0.01, exclude=["head"], embeddings=embeddings)
        grid = sorted({(k + 0.5) / b for b in (18, 8, 6) for k in range(b)})
        scales = [1e-9] + [(a + b) / 2 for a, b in zip(grid, grid[1:])] + [1.0]
        reachable = [count(s, embeddings) / dense for s in scales]
        for target in (0.35, 0.5, 0.62, 0.8, 0.93):
            if not min(reachable) <= target <= max(reachable):
                continue
            scale = fnl.solve_rank_scale(model, target, exclude=["head"], embeddings=embeddings)
            best = min(abs(x - target) for x in reachable)
            assert abs(count(scale, embeddings) / dense - target) == best, (embeddings, target, scale)
            if not embeddings:  # the default: embeddings are not factorized
                default = fnl.solve_rank_scale(model, target, exclude=["head"])
                assert abs(count(default, False) / dense - target) == best, (target, default)
            m = fnl.factorize(Net(), rank_scale=scale, exclude=["head"], embeddings=embeddings)
            # the solver counts `done` at its dense 72; the model holds its 2 * 16 + 8 = 40
            assert fnl.count_parameters(m) == count(scale, embeddings) - 72 + 40
            assert fnl.count_parameters(m, dense=True) == dense
    with pytest.raises(ValueError, match=r"^the model has no layer to factorize, so no target_ratio can be reached$"):
        fnl.solve_rank_scale(nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)), 0.5)
    with pytest.raises(TypeError, match=r"^target_ratio must be a finite float > 0, got str '0\.5'$"):
        fnl.solve_rank_scale(model, "0.5")


# --- factorize / collapse ----------------------------------------------------------------------------------

def test_factorize_refuses_a_single_layer_with_the_layer_named():
    for layer in (nn.Linear(4, 4), nn.Conv2d(3, 4, 3), nn.Embedding(5, 4), fnl.FactorizedLinear(4, 4, rank=2)):
        name = type(layer).__name__
        with pytest.raises(TypeError, match=rf"^model is a single {name}; use the layer's from_dense\(\) instead$"):
            fnl.factorize(layer, rank=2)
    with pytest.raises(ValueError, match=r"^give exactly one of rank, rank_scale or target_ratio; got none$"):
        fnl.factorize(nn.Sequential(nn.Linear(4, 4)))


def test_factorize_wraps_a_layer_error_keeping_its_type_and_leaves_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    before = [id(m) for m in model.modules()]
    with pytest.raises(TypeError, match=r"^cannot factorize layer '0' \(Linear\(in_features=4, out_features=4, "
                                        r"bias=True\)\): 'str' object is not callable; the model is unchanged$") as e:
        fnl.factorize(model, rank=2, init="zeros")
    assert isinstance(e.value.__cause__, TypeError)
    assert [id(m) for m in model.modules()] == before


def test_factorize_selectors():
    def net():
        return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1)), nn.Embedding(6, 4))

    def chosen(**kw):
        m = fnl.factorize(net(), rank=2, **kw)
        return [n for n, x in m.named_modules() if isinstance(x, fnl.FactorizedLayer)]

    assert chosen() == ["0", "1.0", "1.1"]
    assert chosen(embeddings=True) == ["0", "1.0", "1.1", "2"]
    assert chosen(include="1.*") == ["1.0", "1.1"]                      # one pattern as a string
    assert chosen(include=("0", "1.1")) == ["0", "1.1"]                  # a tuple
    assert chosen(include={"1.0"}) == ["1.0"]                            # a set
    assert chosen(exclude="1.*") == ["0"]
    assert chosen(exclude=["0", "1.1"]) == ["1.0"]
    assert chosen(include=["1.*", "0"], exclude=["1.1"]) == ["0", "1.0"]
    assert chosen(include=lambda n, m: 1 if isinstance(m, nn.Conv2d) else 0) == ["1.1"]  # truthiness
    assert chosen(exclude=lambda n, m: n.startswith("1")) == ["0"]
    assert chosen(exclude=lambda n, m: isinstance(m, nn.Conv2d)) == ["0", "1.0"]  # the predicate sees the module
    assert chosen(include="1.[!1]") == ["1.0"]                           # fnmatch, case-sensitive
    assert chosen(exclude=[]) == ["0", "1.0", "1.1"]
    for arg in ("include", "exclude"):
        for bad in ([1, 2], {"a": 1}, 3, ["0", None]):
            with pytest.raises(TypeError, match=rf"^{arg} must be None, a pattern, a list of fnmatch patterns over "
                                                rf"module names, or a callable \(name, module\) -> bool; got "):
                fnl.factorize(net(), rank=2, **{arg: bad})
    with pytest.raises(ValueError, match=r"^include=\['2'\] selects no nn.Linear / nn.Conv2d \(groups=1\) in the model$"):
        fnl.factorize(net(), rank=2, include=["2"])
    with pytest.raises(ValueError, match=r"^include='x\*' selects no nn.Linear / nn.Conv2d / nn.Embedding \(groups=1\) "
                                         r"in the model$"):
        fnl.factorize(net(), rank=2, include="x*", embeddings=True)


def test_factorize_eligibility_of_each_layer_kind():
    class SubLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Embedding(6, 4, max_norm=0.0), nn.Embedding(6, 4, scale_grad_by_freq=True),
                          nn.Embedding(6, 4, sparse=True), SubLinear(4, 4), nn.Embedding(6, 4), nn.Conv2d(4, 4, 3),
                          nn.Linear(4, 4))
    fnl.factorize(model, rank=2, embeddings=True)
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "Conv2d", "Embedding", "Embedding", "Embedding", "SubLinear", "FactorizedEmbedding",
        "FactorizedConv2d", "FactorizedLinear"]
    # and the summary says why, even for the embeddings factorize refused with embeddings=True
    model.append(nn.Embedding(6, 4, max_norm=2.0, scale_grad_by_freq=True, sparse=True))
    why = [r.why_dense for r in fnl.summary(model).rows]
    assert why == [
        "grouped conv (groups=2): the factorized conv has one group",
        "padding_mode='reflect': the factorized conv pads with zeros",
        "embedding with max_norm=0.0: the factorized embedding has none of these",
        "embedding with scale_grad_by_freq=True: the factorized embedding has none of these",
        "embedding with sparse=True: the factorized embedding has none of these",
        "SubLinear is a subclass of nn.Linear (exact types only)", None, None, None,
        "embedding with max_norm=2.0, scale_grad_by_freq=True, sparse=True: the factorized embedding has none of these"]


def test_factorize_keeps_each_layers_geometry_dtype_and_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=torch.float64)
    lin = nn.Linear(5, 3, bias=False, dtype=torch.float64)
    emb = nn.Embedding(7, 4, padding_idx=2, dtype=torch.float64)
    model = nn.ModuleDict({"conv": conv, "lin": lin, "emb": emb})
    fnl.factorize(model, rank=2, square=True, embeddings=True, init=nn.init.ones_)
    c, f, e = model["conv"], model["lin"], model["emb"]
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation) == \
        (4, 6, (3, 2), (2, 1), (1, 2), (1, 2))
    assert torch.equal(c.bias.detach(), conv.bias.detach()) and c.bias.dtype == torch.float64
    assert (f.in_features, f.out_features, f.bias) == (5, 3, None)
    assert (e.num_embeddings, e.embedding_dim, e.padding_idx) == (7, 4, 2)
    for layer in (c, f, e):
        assert layer.rank == 2 and layer.S is not None and layer.S.shape == (2, 2)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        assert bool((layer.V == 1).all())  # init reached every factor (the padding row of U stays 0)
        rows = [i for i in range(layer.U.shape[0]) if layer is not e or i != 2]
        assert bool((layer.U[rows] == 1).all())
    assert bool((e.U[2] == 0).all())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert c(x).shape == conv(x).shape == (2, 6, 5, 11)
    # spectral at full rank: the same function, with the requested rank and square
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), nn.Flatten(),
                          nn.Linear(4 * 25, 5, dtype=torch.float64))
    model = fnl.factorize(copy_of(dense), rank_scale=1.0, spectral=True, square=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert model[0].S is not None and model[2].S is not None and (model[0].rank, model[2].rank) == (12, 5)
    assert torch.allclose(model(x), dense(x), atol=1e-10)
    low = fnl.factorize(copy_of(dense), rank=2, spectral=True)
    assert (low[0].rank, low[2].rank, low[0].S) == (2, 2, None)
    u, s, vh = torch.linalg.svd(dense[2].weight.detach())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(low[2].to_dense().weight, best, atol=1e-10)


def copy_of(module):
    return copy.deepcopy(module)


def test_factorize_and_collapse_keep_shared_layers_shared_at_every_depth():
    shared = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Sequential(shared))
            self.b = shared
            self.c = nn.ModuleList([nn.Linear(4, 4), shared])

    model = fnl.factorize(Net(), rank=2)
    assert isinstance(model.b, fnl.FactorizedLinear) and model.a[0][0] is model.b is model.c[1]
    assert isinstance(model.c[0], fnl.FactorizedLinear) and model.c[0] is not model.b
    fnl.collapse(model)
    assert type(model.b) is nn.Linear and model.a[0][0] is model.b is model.c[1]
    assert type(model.c[0]) is nn.Linear and model.c[0] is not model.b


def test_collapse_of_a_layer_and_of_nested_layers():
    torch.manual_seed(0)
    layer = fnl.FactorizedLinear(6, 4, rank=2, square=True)
    dense = fnl.collapse(layer)
    assert type(dense) is nn.Linear
    x = torch.randn(3, 6)
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
    model = nn.Sequential(nn.Sequential(fnl.FactorizedConv2d(3, 4, 3, rank=2), nn.ReLU()), nn.Flatten(),
                          fnl.FactorizedLinear(4, 2, rank=1))
    x = torch.randn(2, 3, 3, 3)
    y = model(x)
    out = fnl.collapse(model)
    assert out is model and [type(m) for m in (model[0][0], model[2])] == [nn.Conv2d, nn.Linear]
    assert torch.allclose(model(x), y, atol=1e-6)


# --- summary's forward pass ----------------------------------------------------------------------------------

def test_summary_traces_one_eval_forward_without_grad_and_cleans_up():
    state = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.shared = nn.Linear(6, 6)
            self.unused = nn.Linear(6, 6)
            self.fc = fnl.FactorizedLinear(6, 2, rank=1)

        def forward(self, x):
            state.append((self.training, torch.is_grad_enabled()))
            x = self.shared(self.bn(x))
            return self.fc(self.shared(x.unsqueeze(1).expand(-1, 3, -1)))  # second call: 3 rows of 6

    model = Net().train()
    mean = model.bn.running_mean.clone()
    s = fnl.summary(model, (6,))
    assert state == [(False, False)] and model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, mean)  # eval mode: the statistics are left alone
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    rows = {r.name: r for r in s.rows}
    assert list(rows) == ["shared", "unused", "fc"]
    assert (rows["shared"].macs, rows["unused"].macs, rows["fc"].macs) == (36, None, 3 * 1 * (6 + 2))
    assert (rows["unused"].dense_macs, rows["fc"].dense_macs) == (None, 3 * 12)
    assert (s.total_macs, s.dense_macs) == (36 + 24, 36 + 36)  # the unused layer adds nothing
    # a forward that fails: the mode is restored and the hooks removed before the error reaches the caller
    model.eval()
    with pytest.raises(RuntimeError):
        fnl.summary(model, (5,))
    assert not model.training and all(not m._forward_pre_hooks for m in model.modules())


def test_summary_of_a_factorized_embedding_and_rank_tuples():
    torch.manual_seed(0)
    model = fnl.factorize(nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8)), rank=2, embeddings=True,
                          include=["0"])
    tokens = torch.tensor([[3, 4, 5, 6]])
    s = fnl.summary(model, example_input=tokens)
    r0, r1 = s.rows
    assert (r0.name, r0.kind, r0.shape, r0.rank) == ("0", "FactorizedEmbedding", "30x8", 2)
    assert (r0.params, r0.dense_params) == (2 * 38, 240)
    assert (r0.macs, r0.dense_macs) == (model[0].macs((4,)), 0) == (4 * 2 * 8, 0)
    assert (r1.macs, r1.why_dense) == (4 * 64, "not selected (include / exclude, or the model's rules)")
    assert (s.total_macs, s.dense_macs) == (64 + 256, 256)
    # example_input wins over input_size
    assert fnl.summary(model, (7,), example_input=tokens).total_macs == 320
    tt = nn.Sequential(fnl.TTConv2d(8, 8, 3, padding=1, rank_scale=0.5))
    text = str(fnl.summary(tt))
    assert text.splitlines()[2].startswith("0                    TTConv2d  8x8x3x3  (2, 2)")


def test_factorize_target_ratio_uses_every_selection_setting():
    """Two bias-free layers 8 -> 16 -> 8 (128 weights each, rank base 8, 24 r parameters at rank r):
    the rank factorize applies is the one solved with the same include / exclude / square / embeddings."""
    def net():
        return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False))

    def ranks(model):
        return [m.rank if isinstance(m, fnl.FactorizedLayer) else None for m in model]

    # only layer 0 factorized, layer 1 fixed: 0.75 * 256 = 192 = 128 + 24 r -> r = 2.67, so 3 (200)
    assert ranks(fnl.factorize(net(), target_ratio=0.75, exclude=["1"])) == [3, None]
    assert ranks(fnl.factorize(net(), target_ratio=0.75, include=["0"])) == [3, None]
    # both: 48 r = 192 -> r = 4
    assert ranks(fnl.factorize(net(), target_ratio=0.75)) == [4, 4]
    # both with S: 2 (24 r + r^2) = 192 -> 3 (162) or 4 (224): 3
    assert ranks(fnl.factorize(net(), target_ratio=0.75, square=True)) == [3, 3]
    # an embedding 16 x 8 (128, base 8, 24 r) in front, dense total 384. With embeddings: 72 r
    emb = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False))
    # 0.5 * 384 = 192: 72 r -> 2.67, so 3 (216); the embedding fixed: 128 + 48 r -> 1.33, so 1 (176)
    assert ranks(fnl.factorize(copy.deepcopy(emb), target_ratio=0.5, embeddings=True)) == [3, 3, 3]
    assert ranks(fnl.factorize(copy.deepcopy(emb), target_ratio=0.5)) == [None, 1, 1]
    # 0.7 * 384 = 268.8: 72 r -> 3.73, so 4; 128 + 48 r -> 2.93, so 3
    assert ranks(fnl.factorize(copy.deepcopy(emb), target_ratio=0.7, embeddings=True)) == [4, 4, 4]
    assert ranks(fnl.factorize(copy.deepcopy(emb), target_ratio=0.7)) == [None, 3, 3]


def test_factorize_builds_new_layers_on_the_weights_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta"), nn.Flatten(), nn.Linear(4, 2, device="meta"),
                          nn.Embedding(5, 3, device="meta"))
    fnl.factorize(model, rank=2, embeddings=True)
    assert [type(m).__name__ for m in model] == ["FactorizedConv2d", "Flatten", "FactorizedLinear",
                                                  "FactorizedEmbedding"]
    assert {p.device.type for p in model.parameters()} == {"meta"}
