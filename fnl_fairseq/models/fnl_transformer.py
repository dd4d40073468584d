"""Factorized Transformers for fairseq (paper sections 2, 3 and 6; docs/method.md and
docs/experiments.md#translation).

Model ``fnl_transformer``, a subclass of fairseq's ``transformer`` with the paper's flags:

- ``--rank-scale S``: FFN linears, token and learned positional embeddings and the output
  projection become ``fnl`` factorized layers of rank ``max(1, round(S * min(m, n)))``;
  attention heads shrink to ``d_h = int(S * d / heads)`` (docs/method.md#attention-quadratic-forms),
  projections staying dense.
- ``--spectral``: spectral initialisation of the factorized layers (paper section 3.1).
- ``--spectral-quekey`` / ``--spectral-outval``: per-head spectral rebalancing of the query-key
  and output-value factor pairs after initialisation (the function is unchanged).
- ``--wd2fd`` / ``--wd2fd-quekey`` / ``--wd2fd-outval``: Frobenius decay instead of weight decay
  on the factorized layers / QK forms / OV forms, applied by the ``fd_*`` optimizers
  (``fnl_fairseq.optim``) with coefficient ``--weight-decay``.

Without ``--rank-scale`` the model is fairseq's Transformer, parameter for parameter.

Architectures: ``fnl_transformer_small`` (the paper's: 2+2 layers, d 256, FFN 1024, 4 heads),
``fnl_transformer_iwslt_de_en`` and ``fnl_transformer`` (fairseq's ``transformer_iwslt_de_en``
and ``transformer`` shapes).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
from typing import Any, Optional

import fnl
from fnl._validate import check_rank_scale
import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig, TransformerDecoderBase, TransformerEncoderBase, TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import base_architecture, transformer_iwslt_de_en
from fairseq.modules import LearnedPositionalEmbedding
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import nn

from fnl_fairseq.checkpoint import check_literal_settings
from fnl_fairseq.fd import FDTerms, register_model as _register_for_fd
from fnl_fairseq.modules.attention import attention_layers, balance_attention_, head_dim_for, shrink_heads_
from fnl_fairseq.modules.embedding import (
    FactorizedLearnedPositionalEmbedding, TiedFactorizedOutput, build_factorized_embedding,
)

__all__ = [
    "FNLSettings", "FNLTransformerDecoder", "FNLTransformerDecoderLayer", "FNLTransformerEncoder",
    "FNLTransformerEncoderLayer", "FNLTransformerModel",
]

FD_OPTIMIZER_PREFIX = "fd_"

# fairseq's hub reads a model folder's sentencepiece model under this name (``hub_utils.from_pretrained``)
HUB_SENTENCEPIECE = "sentencepiece.bpe.model"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FNLSettings:
    """The plugin's flags, read from a fairseq args namespace or ``TransformerConfig``."""

    rank_scale: Optional[float] = None
    spectral: bool = False
    spectral_quekey: bool = False
    spectral_outval: bool = False
    wd2fd: bool = False
    wd2fd_quekey: bool = False
    wd2fd_outval: bool = False

    @classmethod
    def from_cfg(cls, cfg: Any) -> "FNLSettings":
        values = {f.name: getattr(cfg, f.name, f.default) for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if f.name != "rank_scale":
                values[f.name] = bool(values[f.name])
        if values["rank_scale"] is not None:  # the core's one rule (docs/method.md#rank-settings)
            values["rank_scale"] = check_rank_scale(values["rank_scale"], "--rank-scale")
        return cls(**values)

    @property
    def wants_fd(self) -> bool:
        return self.wd2fd or self.wd2fd_quekey or self.wd2fd_outval

    def linear(self, in_features: int, out_features: int, bias: bool = True,
               init: Optional[Any] = None) -> nn.Module:
        """A factorized linear layer with these settings (``--rank-scale`` must be set)."""
        return fnl.FactorizedLinear(in_features, out_features, bias, rank_scale=self.rank_scale,
                                    spectral=self.spectral, init=init if self.spectral else None)


def check_settings(args: Any) -> FNLSettings:
    """Refuse, at model build time, every flag combination the plugin cannot honour."""
    s = FNLSettings.from_cfg(args)
    if s.rank_scale is None:
        for flag in ("spectral", "wd2fd"):
            if getattr(s, flag):
                raise ValueError(f"--{flag.replace('_', '-')} acts on factorized layers; it needs --rank-scale "
                                 f"(e.g. --rank-scale 0.5)")
    else:
        unsupported = {"quant_noise_pq": "--quant-noise-pq", "adaptive_softmax_cutoff": "--adaptive-softmax-cutoff",
                       "adaptive_input": "--adaptive-input", "scale_heads": "--scale-heads",
                       "base_layers": "--base-layers", "tie_adaptive_weights": "--tie-adaptive-weights"}
        for attr, flag in unsupported.items():
            value = getattr(args, attr, None)
            if value:
                raise ValueError(f"{flag} is not supported together with --rank-scale (got {flag} {value!r})")
        for side in ("encoder", "decoder"):
            if getattr(args, f"{side}_xformers_att_config", None):
                raise ValueError(f"--{side}-xformers-att-config is not supported together with --rank-scale")
    if s.spectral_quekey or s.spectral_outval or s.wd2fd_quekey or s.wd2fd_outval:
        enc, dec = getattr(args, "encoder_embed_dim", None), getattr(args, "decoder_embed_dim", None)
        if enc is not None and dec is not None and enc != dec:
            raise ValueError(f"QK/OV forms of the encoder-decoder attention need --encoder-embed-dim == "
                             f"--decoder-embed-dim (got {enc} and {dec}) for --spectral-quekey/--spectral-outval/"
                             f"--wd2fd-quekey/--wd2fd-outval")
    optimizer = getattr(args, "optimizer", None)
    if s.wants_fd and optimizer is not None and not str(optimizer).startswith(FD_OPTIMIZER_PREFIX):
        flags = " ".join(f"--{f.replace('_', '-')}" for f in ("wd2fd", "wd2fd_quekey", "wd2fd_outval") if getattr(s, f))
        raise ValueError(f"{flags} replaces weight decay by Frobenius decay, which only the FD optimizers apply; "
                         f"--optimizer {optimizer} would silently ignore it. Use --optimizer fd_nag, fd_adam or "
                         f"fd_sgd (the FD coefficient is --weight-decay)")
    return s


def _wrap_layer(layer: nn.Module, cfg: TransformerConfig) -> nn.Module:
    """Activation checkpointing and FSDP wrapping, as fairseq applies them to its own layers."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


def _factorize_positions(positions: Optional[nn.Module], s: FNLSettings) -> Optional[nn.Module]:
    if s.rank_scale is None or not isinstance(positions, LearnedPositionalEmbedding):
        return positions  # sinusoidal positions have no parameters
    return build_factorized_embedding(FactorizedLearnedPositionalEmbedding, positions.num_embeddings,
                                      positions.embedding_dim, positions.padding_idx, s.rank_scale, s.spectral)


def _shrunk(attn: nn.Module, s: FNLSettings, embed_dim: int) -> nn.Module:
    if s.rank_scale is None:
        return attn
    return shrink_heads_(attn, head_dim_for(s.rank_scale, embed_dim, attn.num_heads))


class _FactorizedFFN:
    """The FFN linears of a fairseq Transformer layer, factorized when ``--rank-scale`` is set."""

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        if self.fnl_settings.rank_scale is None:
            return super().build_fc1(input_dim, output_dim, q_noise, qn_block_size)
        return self.fnl_settings.linear(input_dim, output_dim)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        if self.fnl_settings.rank_scale is None:
            return super().build_fc2(input_dim, output_dim, q_noise, qn_block_size)
        return self.fnl_settings.linear(input_dim, output_dim)


class FNLTransformerEncoderLayer(_FactorizedFFN, TransformerEncoderLayerBase):
    """fairseq's encoder layer with factorized FFN linears and shrunk attention heads."""

    def __init__(self, cfg: TransformerConfig, return_fc: bool = False) -> None:
        self.fnl_settings = FNLSettings.from_cfg(cfg)  # read by the build_* hooks that __init__ calls
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim, cfg):
        return _shrunk(super().build_self_attention(embed_dim, cfg), self.fnl_settings, embed_dim)


class FNLTransformerDecoderLayer(_FactorizedFFN, TransformerDecoderLayerBase):
    """fairseq's decoder layer with factorized FFN linears and shrunk attention heads."""

    def __init__(self, cfg: TransformerConfig, no_encoder_attn: bool = False, add_bias_kv: bool = False,
                 add_zero_attn: bool = False) -> None:
        self.fnl_settings = FNLSettings.from_cfg(cfg)
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        attn = super().build_self_attention(embed_dim, cfg, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        return _shrunk(attn, self.fnl_settings, embed_dim)

    def build_encoder_attention(self, embed_dim, cfg):
        return _shrunk(super().build_encoder_attention(embed_dim, cfg), self.fnl_settings, embed_dim)


class FNLTransformerEncoder(TransformerEncoderBase):
    """fairseq's encoder built from ``FNLTransformerEncoderLayer``, with factorized learned positions."""

    def __init__(self, cfg: TransformerConfig, dictionary, embed_tokens, return_fc: bool = False) -> None:
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        self.embed_positions = _factorize_positions(self.embed_positions, FNLSettings.from_cfg(cfg))

    def build_encoder_layer(self, cfg):
        return _wrap_layer(FNLTransformerEncoderLayer(cfg, return_fc=self.return_fc), cfg)


class FNLTransformerDecoder(TransformerDecoderBase):
    """fairseq's decoder built from ``FNLTransformerDecoderLayer``, with a factorized output projection."""

    def __init__(self, cfg: TransformerConfig, dictionary, embed_tokens, no_encoder_attn: bool = False,
                 output_projection: Optional[nn.Module] = None) -> None:
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)
        self.embed_positions = _factorize_positions(self.embed_positions, FNLSettings.from_cfg(cfg))

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return _wrap_layer(FNLTransformerDecoderLayer(cfg, no_encoder_attn), cfg)

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        s = FNLSettings.from_cfg(cfg)
        if s.rank_scale is None:
            return super().build_output_projection(cfg, dictionary, embed_tokens)
        if self.share_input_output_embed:
            # logits x Eᵀ with E = U Vᵀ are (x V) Uᵀ: the tie is exact on the embedding's own factors
            self.output_projection = TiedFactorizedOutput(embed_tokens)
        else:
            init = functools.partial(nn.init.normal_, mean=0.0, std=self.output_embed_dim ** -0.5)
            self.output_projection = s.linear(self.output_embed_dim, len(dictionary), bias=False, init=init)


@register_model("fnl_transformer")
class FNLTransformerModel(TransformerModel):
    """fairseq's Transformer with the paper's factorization, spectral init and Frobenius decay flags."""

    def __init__(self, args, encoder, decoder) -> None:
        super().__init__(args, encoder, decoder)
        self.fnl_settings = FNLSettings.from_cfg(self.args)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # Flag names carry no encoder_/decoder_ prefix, so TransformerConfig.from_namespace passes
        # them through unchanged instead of routing them into its encoder/decoder sub-configs.
        group = parser  # fairseq hands add_args an argument group already
        group.add_argument("--rank-scale", type=float, metavar="S", default=None,
                           help="factorize FFN linears, token/learned positional embeddings and the output "
                                "projection at rank max(1, round(S*min(m,n))); attention heads get "
                                "d_h = int(S*d/heads). Default: dense")
        group.add_argument("--spectral", action="store_true", default=False,
                           help="spectral initialisation of the factorized layers (needs --rank-scale)")
        group.add_argument("--spectral-quekey", action="store_true", default=False,
                           help="rebalance each head's query/key factors by SVD of their product after init")
        group.add_argument("--spectral-outval", action="store_true", default=False,
                           help="rebalance each head's output/value factors by SVD of their product after init")
        group.add_argument("--wd2fd", action="store_true", default=False,
                           help="Frobenius decay instead of weight decay on the factorized layers "
                                "(coefficient --weight-decay; needs an fd_* optimizer)")
        group.add_argument("--wd2fd-quekey", action="store_true", default=False,
                           help="Frobenius decay of each head's query-key form instead of weight decay on "
                                "q_proj/k_proj weights (needs an fd_* optimizer)")
        group.add_argument("--wd2fd-outval", action="store_true", default=False,
                           help="Frobenius decay of each head's output-value form instead of weight decay on "
                                "out_proj/v_proj weights (needs an fd_* optimizer)")

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, checkpoint_file: str = "model.pt",
                        data_name_or_path: str = ".", **kwargs: Any):
        """fairseq's hub interface (``translate``, ``sample``, ``generate``) over a checkpoint folder.

        As ``TransformerModel.from_pretrained``: the dictionaries are read from the folder (or
        ``data_name_or_path``), and a ``sentencepiece.bpe.model`` there replaces the path the
        checkpoint recorded (``--bpe sentencepiece --sentencepiece-model``, as the iwslt14 recipe
        trains), so ``translate`` takes and returns plain text with only the folder at hand. A
        checkpoint that records no BPE (trained without ``--bpe``) in a folder holding
        ``sentencepiece.bpe.model`` gets that model as its BPE. Without any BPE, ``translate`` works on
        text already split into the dictionary's tokens, and a warning says so.

        Args:
            model_name_or_path: the folder (or a name of ``hub_models``).
            checkpoint_file: the checkpoint in it (the iwslt14 recipe writes ``checkpoint_best.pt``).
            data_name_or_path: where the dictionaries are; ``.`` is the model folder.
            **kwargs: fairseq settings to override (``bpe``, ``sentencepiece_model``, ``beam``, ...).
        """
        hub = super().from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path, **kwargs)
        spm_path = os.path.join(str(model_name_or_path), HUB_SENTENCEPIECE)
        if hub.bpe is None and "bpe" not in kwargs and os.path.isfile(spm_path):
            from fairseq.data import encoders
            hub.bpe = encoders.build_bpe(argparse.Namespace(bpe="sentencepiece", sentencepiece_model=spm_path))
            logger.info("%s records no BPE; using the folder's %s", checkpoint_file, spm_path)
        if hub.bpe is None:
            logger.warning("%s records no BPE and none was given: translate() takes and returns text in the "
                           "dictionary's tokens (BPE pieces, if the data was BPE-encoded); for plain text pass "
                           "bpe='sentencepiece', sentencepiece_model=PATH (or train with --bpe sentencepiece "
                           "--sentencepiece-model PATH)", checkpoint_file)
        return hub

    @classmethod
    def build_model(cls, args, task):
        check_literal_settings(args, "model settings")  # fairseq eval()s some; from a checkpoint they are data
        s = check_settings(args)
        model = super().build_model(args, task)
        with torch.no_grad():
            for attn in attention_layers(model):
                balance_attention_(attn, s.spectral_quekey, s.spectral_outval)
        _register_for_fd(model)
        return model

    @classmethod
    def build_embedding(cls, args, dictionary, embed_dim, path=None):
        s = FNLSettings.from_cfg(args)
        if s.rank_scale is None:
            return super().build_embedding(args, dictionary, embed_dim, path)
        if path:  # pretrained vectors: their best rank-r approximation
            dense = super().build_embedding(args, dictionary, embed_dim, path)
            return fnl.FactorizedEmbedding.from_dense(dense, rank_scale=s.rank_scale)
        return build_factorized_embedding(fnl.FactorizedEmbedding, len(dictionary), embed_dim, dictionary.pad(),
                                          s.rank_scale, s.spectral)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return FNLTransformerEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return FNLTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def frobenius_decay_terms(self) -> FDTerms:
        """What the FD optimizers regularise, per the ``--wd2fd*`` flags."""
        s = self.fnl_settings
        terms = FDTerms()
        if s.wd2fd:
            terms.layers = fnl.factorized_layers(self)
        attns = attention_layers(self) if (s.wd2fd_quekey or s.wd2fd_outval) else []
        if s.wd2fd_quekey:
            terms.quekey = [(a.q_proj, a.k_proj, a.num_heads) for a in attns]
        if s.wd2fd_outval:
            terms.outval = [(a.out_proj, a.v_proj, a.num_heads) for a in attns]
        return terms


def _fnl_defaults(args) -> None:
    args.rank_scale = getattr(args, "rank_scale", None)
    for flag in ("spectral", "spectral_quekey", "spectral_outval", "wd2fd", "wd2fd_quekey", "wd2fd_outval"):
        setattr(args, flag, getattr(args, flag, False))


@register_model_architecture("fnl_transformer", "fnl_transformer")
def fnl_transformer(args):
    """fairseq's base ``transformer`` shape (6+6 layers, d 512, FFN 2048, 8 heads)."""
    _fnl_defaults(args)
    base_architecture(args)


@register_model_architecture("fnl_transformer", "fnl_transformer_iwslt_de_en")
def fnl_transformer_iwslt_de_en(args):
    """fairseq's ``transformer_iwslt_de_en`` shape (6+6 layers, d 512, FFN 1024, 4 heads)."""
    _fnl_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("fnl_transformer", "fnl_transformer_small")
def fnl_transformer_small(args):
    """The paper's small Transformer for IWSLT'14 De-En (docs/experiments.md#translation): 2+2 layers, d 256,
    FFN 1024, 4 heads."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    fnl_transformer(args)
