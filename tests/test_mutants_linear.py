"""Tests that kill the mutants of `fnl/linear.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour: the counts for inputs with more than one leading dimension, the
device and dtype the conversions build on, the defaults and messages of `from_dense`.
Device checks run under a `meta` default device: a layer built without the source's device would
land there instead of on the CPU.
"""
import pytest
import torch
from torch import nn

from fnl import FactorizedLinear


def test_counts_multiply_every_leading_dimension():
    layer = FactorizedLinear(5, 7, rank=3)
    assert layer.macs((2, 3, 5)) == 2 * 3 * 3 * (5 + 7)
    assert layer.dense_macs((2, 3, 5)) == 2 * 3 * 5 * 7
    assert layer.macs((4, 5)) == 4 * 3 * 12
    assert layer.dense_macs((4, 5)) == 4 * 35


def test_to_dense_keeps_dtype_and_device():
    torch.manual_seed(0)
    layer = FactorizedLinear(5, 7, rank=3, dtype=torch.float64)
    with torch.device("meta"):
        dense = layer.to_dense()
    assert dense.weight.dtype == torch.float64 and dense.bias.dtype == torch.float64
    assert dense.weight.device.type == "cpu" and dense.bias.device.type == "cpu"
    assert torch.equal(dense.weight, layer.dense_weight().detach())
    assert torch.equal(dense.bias, layer.bias.detach())


def test_from_dense_defaults_keep_dtype_and_device():
    torch.manual_seed(0)
    dense = nn.Linear(6, 4, dtype=torch.float64)
    with torch.device("meta"):
        layer = FactorizedLinear.from_dense(dense, rank=4)
    assert layer.S is None and not layer.square
    assert layer.U.device.type == "cpu" and layer.U.dtype == torch.float64
    torch.testing.assert_close(layer.dense_weight(), dense.weight, rtol=0, atol=1e-12)
    assert torch.equal(layer.bias, dense.bias)


def test_from_dense_square_is_passed_on():
    dense = nn.Linear(6, 4)
    layer = FactorizedLinear.from_dense(dense, rank=3, square=True)
    assert layer.square and torch.equal(layer.S, torch.eye(3))


def test_from_dense_names_the_wrong_type():
    with pytest.raises(TypeError, match=r"^layer must be an nn\.Linear, got Conv2d$"):
        FactorizedLinear.from_dense(nn.Conv2d(2, 2, 1), rank=1)


@pytest.mark.parametrize("args, message", [
    ((0, 3), "in_features must be an int >= 1, got 0"),
    ((3, 0), "out_features must be an int >= 1, got 0"),
])
def test_sizes_are_named(args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        FactorizedLinear(*args, rank=1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_inference_form_is_the_same_function_on_the_same_device(bias, training):
    torch.manual_seed(0)
    layer = FactorizedLinear(5, 7, bias=bias, rank=3, square=True, dtype=torch.float64).train(training)
    with torch.no_grad():
        layer.S.copy_(torch.randn(3, 3, dtype=torch.float64))  # a trained S, not the identity
    with torch.device("meta"):
        seq = layer.inference_form()
    first, second = seq
    assert seq.training is training and first.training is training and second.training is training
    assert first.bias is None and (second.bias is not None) is bias
    for p in seq.parameters():
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(seq(x), layer(x), rtol=0, atol=1e-12)
