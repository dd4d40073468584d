"""FNL: factorized neural layers with spectral initialisation and Frobenius decay.

Implements "Initialization and Regularization of Factorized Neural Layers" (Khodak, Tenenholtz,
Mackey, Fusi; ICLR 2022, arXiv 2105.01029). The core imports only torch.
"""
from .adopt import CheckpointMismatchError, adopt_on_load, adopt_state_dict_shapes
from .attention import (
    add_outval_fd_grad_, add_quekey_fd_grad_, balance_outval_, balance_quekey_, outval_norm_sq, quekey_norm_sq,
)
from .base import FactorizedLayer, add_factor_fd_grad_, resolve_rank, spectral_factors
from .compress import (
    CompressionReport, LayerDecision, apply_ranks, compress, fold_batchnorm, measure_latency, round_rank,
    select_fastest_paths, to_inference_form,
)
from .conv import FactorizedConv2d
from .conv_bn import conv_bn, folds_batchnorm, keep_inference_weights, sequential_conv_bn
from .deploy import compile_for_inference
from .embedding import FactorizedEmbedding
from .fd_engine import FDEngine, FDTerm, factor_owner, form_term, layer_term, mark_factors
from .frobenius import (
    FrobeniusDecay, factor_parameter_names, factorized_layers, frobenius_norm, frobenius_penalty, param_groups,
)
from .linear import FactorizedLinear
from .model import ModelSummary, collapse, count_macs, count_parameters, factorize, solve_rank_scale, summary
from .normalize import FrobeniusNormalizer, FrobeniusNormRecorder, load_frobnorms, rescale_to_norm_
from .runtime import cache_cpu_allocations, cpu_allocations_cached
from .tensor_conv import (
    TensorConv2d, TTConv2d, TuckerConv2d, hosvd, solve_tensor_scale, tensor_modes, tensorize, tt_svd,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError", "CompressionReport", "FactorizedConv2d", "FactorizedEmbedding", "FactorizedLayer", "FactorizedLinear",
    "FDEngine", "FDTerm", "FrobeniusDecay", "FrobeniusNormRecorder", "FrobeniusNormalizer", "LayerDecision", "ModelSummary",
    "adopt_on_load", "adopt_state_dict_shapes", "add_factor_fd_grad_", "add_outval_fd_grad_", "add_quekey_fd_grad_", "apply_ranks", "balance_outval_",
    "balance_quekey_", "cache_cpu_allocations", "collapse", "compile_for_inference", "compress", "conv_bn", "cpu_allocations_cached", "count_macs", "count_parameters", "factor_owner", "factor_parameter_names", "factorize",
    "form_term", "keep_inference_weights", "layer_term", "mark_factors",
    "fold_batchnorm", "folds_batchnorm",
    "factorized_layers", "frobenius_norm", "frobenius_penalty", "load_frobnorms", "measure_latency",
    "outval_norm_sq", "param_groups", "quekey_norm_sq", "rescale_to_norm_", "resolve_rank", "round_rank",
    "select_fastest_paths", "sequential_conv_bn", "solve_rank_scale", "spectral_factors", "summary",
    "to_inference_form",
    # tensor formats (docs/method.md#tensor-formats)
    "TTConv2d", "TensorConv2d", "TuckerConv2d", "hosvd", "solve_tensor_scale", "tensor_modes", "tensorize", "tt_svd",
]
