"""The attention head rule of the fairseq plugin, ``d_h = int(S * d / heads)`` (truncation), on values
where truncation, rounding and the ceiling differ (every other test uses values where S * d / heads is
an integer)."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fairseq")

import fnl_fairseq  # noqa: E402
from fairseq import models, options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fnl_fairseq.modules.attention import attention_layers, head_dim_for  # noqa: E402

# (rank_scale, d, heads, d_h): S * d / heads = 2.8 (round 3), 2.4 (ceil 3), 7.5 (round 8)
CASES = [(0.35, 32, 4, 2), (0.3, 32, 4, 2), (0.625, 48, 4, 7)]


@pytest.mark.parametrize("rank_scale, d, heads, d_h", CASES)
def test_head_dim_truncates(rank_scale, d, heads, d_h):
    assert head_dim_for(rank_scale, d, heads) == d_h


def test_head_dim_below_one_is_refused_with_the_smallest_rank_scale():
    with pytest.raises(ValueError, match=r"int\(0\.1125 \* 32 / 4\) = 0 .* --rank-scale must be >= 0\.125"):
        head_dim_for(0.1125, 32, 4)


@pytest.mark.parametrize("rank_scale, d, heads, d_h", CASES)
def test_built_model_has_truncated_heads(rank_scale, d, heads, d_h):
    """The model fairseq builds: every attention (encoder self, decoder self and cross) has d_h per head,
    its projections d -> heads * d_h -> d, and the parameter count follows."""
    dims = [str(d), str(d), "64", "64"]
    argv = ["/nonexistent-data", "--user-dir", fnl_fairseq.user_dir(), "--arch", "fnl_transformer_small",
            "--optimizer", "adam", "--cpu", "--rank-scale", str(rank_scale), "--encoder-layers", "1",
            "--decoder-layers", "1", "--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads),
            "--encoder-embed-dim", dims[0], "--decoder-embed-dim", dims[1], "--encoder-ffn-embed-dim", dims[2],
            "--decoder-ffn-embed-dim", dims[3]]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    vocab = Dictionary()
    for i in range(20):
        vocab.add_symbol(f"w{i}")
    torch.manual_seed(0)
    model = models.build_model(args, SimpleNamespace(source_dictionary=vocab, target_dictionary=vocab))
    attns = list(attention_layers(model))
    assert len(attns) == 3
    inner = heads * d_h
    for a in attns:
        assert (a.num_heads, a.head_dim) == (heads, d_h)
        assert tuple(a.q_proj.weight.shape) == tuple(a.k_proj.weight.shape) == tuple(a.v_proj.weight.shape) \
            == (inner, d)
        assert tuple(a.out_proj.weight.shape) == (d, inner)
        assert a.scaling == pytest.approx(d_h ** -0.5)
    attn_params = sum(p.numel() for a in attns for p in a.parameters())
    assert attn_params == 3 * (3 * (d * inner + inner) + inner * d + d)
