"""fnl/model.py: the summary table users read, counts, the rank_scale solver, factorize / collapse.

Written to kill the surviving mutants of ``fnl/model.py`` (tests/README.md, "Mutation testing"): every
test checks exact text or exact numbers, from closed forms (docs/method.md: a factorized m x n layer of
rank r has r (m + n) parameters, plus r^2 with ``square``) or from the layers' own counts.
"""
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
