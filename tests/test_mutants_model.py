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
