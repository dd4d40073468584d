"""Building blocks of the plugin's models: shrunk attention heads, factorized embeddings."""
from .attention import attention_layers, head_dim_for, shrink_heads_
from .embedding import FactorizedLearnedPositionalEmbedding, TiedFactorizedOutput

__all__ = [
    "FactorizedLearnedPositionalEmbedding", "TiedFactorizedOutput", "attention_layers", "head_dim_for",
    "shrink_heads_",
]
