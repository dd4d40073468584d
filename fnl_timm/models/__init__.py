"""The fnl_* model zoo and ``fnl`` (any timm model, factorized); importing registers them in timm's registry."""
from .fnl_cifar_resnet import BasicBlock, CifarResNet
from .fnl_vgg import CifarVGG
from .fnl_wide_resnet import WideResNet
from .fnl_any import factorize_timm_model
from ._factorize import prefers_channels_last
from ._timm_attention import (
    add_attention_fd_grad_, attention_owner, balance_attention_, mark_attention, shrink_heads_, timm_attentions,
)

__all__ = [
    'BasicBlock', 'CifarResNet', 'CifarVGG', 'WideResNet', 'factorize_timm_model',
    'add_attention_fd_grad_', 'attention_owner', 'balance_attention_', 'mark_attention', 'shrink_heads_',
    'prefers_channels_last', 'timm_attentions',
]
