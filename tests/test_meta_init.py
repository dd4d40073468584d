"""Deferred initialisation: every factorized layer builds on the ``meta`` device (no values, no init), and
``to_empty()`` then ``reset_parameters()`` gives exactly the layer built on the CPU from the same seed,
spectral init included (torch's protocol for building large models without allocating them)."""
import pytest
import torch

import fnl

LAYERS = {
    "linear": lambda **kw: fnl.FactorizedLinear(12, 10, rank=4, **kw),
    "linear-square": lambda **kw: fnl.FactorizedLinear(12, 10, rank=4, square=True, **kw),
    "conv": lambda **kw: fnl.FactorizedConv2d(6, 8, 3, padding=1, rank_scale=0.5, **kw),
    "conv-square": lambda **kw: fnl.FactorizedConv2d(6, 8, (3, 1), rank=3, square=True, **kw),
    "embedding": lambda **kw: fnl.FactorizedEmbedding(20, 8, padding_idx=3, rank=4, **kw),
    "tt": lambda **kw: fnl.TTConv2d(8, 12, 3, padding=1, rank_scale=0.5, **kw),
    "tucker": lambda **kw: fnl.TuckerConv2d(8, 12, 3, padding=1, rank_scale=0.5, **kw),
}


@pytest.mark.parametrize("spectral", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_meta_then_to_empty_then_reset_is_the_cpu_layer(name, spectral):
    meta = LAYERS[name](spectral=spectral, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(7)
    cpu = LAYERS[name](spectral=spectral)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.reset_parameters()
    got, want = meta.state_dict(), cpu.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.randint(0, 20, (2, 5)) if name == "embedding" else (
        torch.randn(2, 12) if name.startswith("linear") else torch.randn(2, meta.in_channels, 6, 6))
    assert torch.equal(meta(x), cpu(x))
