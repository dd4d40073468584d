"""Tests that kill the mutants of `fnl/embedding.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour: the counts, the device / dtype / training mode of the conversions,
negative ``padding_idx``, the messages of rejected arguments and the repr.
Device checks run under a `meta` default device: a module built without the source's device would
land there instead of on the CPU.
"""
import pytest
import torch
from torch import nn

from fnl import FactorizedEmbedding


def test_counts():
    layer = FactorizedEmbedding(11, 6, rank=3)
    assert layer.macs((2, 5)) == 2 * 5 * 3 * 6
    assert layer.macs((7,)) == 7 * 3 * 6
    assert layer.dense_macs((2, 5)) == 0


def test_to_dense_keeps_dtype_device_and_padding():
    torch.manual_seed(0)
    layer = FactorizedEmbedding(9, 4, padding_idx=2, rank=3, square=True, dtype=torch.float64)
    with torch.device("meta"):
        dense = layer.to_dense()
    assert dense.weight.dtype == torch.float64 and dense.weight.device.type == "cpu"
    assert dense.padding_idx == 2
    assert torch.equal(dense.weight, layer.dense_weight().detach())
    assert torch.equal(dense.weight[2], torch.zeros(4, dtype=torch.float64))


def test_from_dense_defaults_keep_dtype_device_and_padding():
    torch.manual_seed(0)
    dense = nn.Embedding(7, 5, padding_idx=6, dtype=torch.float64)
    with torch.device("meta"):
        layer = FactorizedEmbedding.from_dense(dense, rank=5)
    assert layer.S is None and not layer.square and layer.padding_idx == 6
    assert layer.U.device.type == "cpu" and layer.U.dtype == torch.float64
    torch.testing.assert_close(layer.dense_weight(), dense.weight, rtol=0, atol=1e-12)
    square = FactorizedEmbedding.from_dense(dense, rank=2, square=True)
    assert square.square and torch.equal(square.S, torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False])
def test_inference_form_is_the_same_function_on_the_same_device(training):
    torch.manual_seed(0)
    layer = FactorizedEmbedding(9, 4, padding_idx=1, rank=3, square=True, dtype=torch.float64).train(training)
    with torch.no_grad():
        layer.S.copy_(torch.randn(3, 3, dtype=torch.float64))
    with torch.device("meta"):
        seq = layer.inference_form()
    lookup, project = seq
    assert seq.training is training and lookup.training is training
    assert lookup.padding_idx == 1 and project.bias is None
    for p in seq.parameters():
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    idx = torch.tensor([[0, 1, 8], [3, 1, 2]])
    torch.testing.assert_close(seq(idx), layer(idx), rtol=0, atol=1e-12)


def test_negative_padding_idx_is_wrapped_and_zeroed():
    layer = FactorizedEmbedding(5, 3, padding_idx=-1, rank=2)
    assert layer.padding_idx == 4
    assert torch.equal(layer.U[4], torch.zeros(2))
    assert repr(layer) == "FactorizedEmbedding(5, 3, rank=2, padding_idx=4)"
    assert repr(FactorizedEmbedding(5, 3, rank=2, square=True)) == "FactorizedEmbedding(5, 3, rank=2, square=True)"


@pytest.mark.parametrize("padding_idx", [5, -6])
def test_padding_idx_out_of_range_is_named(padding_idx):
    with pytest.raises(ValueError, match=rf"^padding_idx must be within \[-5, 5\), got {padding_idx}$"):
        FactorizedEmbedding(5, 3, padding_idx=padding_idx, rank=2)
    FactorizedEmbedding(5, 3, padding_idx=-5, rank=2)  # the bounds themselves are allowed
    FactorizedEmbedding(5, 3, padding_idx=4, rank=2)


def test_from_dense_rejections_are_named():
    with pytest.raises(TypeError, match=r"^layer must be an nn\.Embedding, got Linear$"):
        FactorizedEmbedding.from_dense(nn.Linear(2, 2), rank=1)
    with pytest.raises(ValueError, match=r"^layer\.max_norm=1\.0 is not supported by FactorizedEmbedding \(only None\)$"):
        FactorizedEmbedding.from_dense(nn.Embedding(4, 3, max_norm=1.0), rank=1)
    with pytest.raises(ValueError, match=r"^layer\.scale_grad_by_freq=True is not supported by FactorizedEmbedding "
                                         r"\(only False\)$"):
        FactorizedEmbedding.from_dense(nn.Embedding(4, 3, scale_grad_by_freq=True), rank=1)
    with pytest.raises(ValueError, match=r"^layer\.sparse=True is not supported by FactorizedEmbedding \(only False\)$"):
        FactorizedEmbedding.from_dense(nn.Embedding(4, 3, sparse=True), rank=1)


@pytest.mark.parametrize("args, message", [
    ((0, 3), "num_embeddings must be an int >= 1, got 0"),
    ((3, 0), "embedding_dim must be an int >= 1, got 0"),
])
def test_sizes_are_named(args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        FactorizedEmbedding(*args, rank=1)


def test_spectral_init_factorizes_the_initialised_table():
    table = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = FactorizedEmbedding(6, 4, padding_idx=0, rank=4, spectral=True, init=lambda w: w.copy_(table),
                                dtype=torch.float64)
    assert layer.spectral is True
    want = table.clone()
    want[0] = 0.0  # the padding row, zeroed after the factorisation
    torch.testing.assert_close(layer.dense_weight(), want, rtol=0, atol=1e-12)
    assert FactorizedEmbedding(6, 4, rank=2).spectral is False
