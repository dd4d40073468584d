"""Wide ResNet-28-10 (Zagoruyko & Komodakis 2016) with factorized block convs (paper section 4;
docs/experiments.md#tensor-formats-against-low-rank).

Pre-activation basic blocks, three groups of 160/320/640 channels, 1x1-conv shortcuts where
the shape changes. With ``conv='lowrank'`` conv1, conv2 and the shortcut conv of every block are
factorized (``U Vᵀ``). For the tensor comparison (``conv='tt'`` / ``'tucker'``) conv1 and
conv2 become a depthwise conv followed by a 1x1 conv held as a Tensor-Train or a Tucker tensor
(``fnl.TTConv2d``, ``fnl.TuckerConv2d``; ``rank_scale`` is the tensor scale s) and the three 1x1
shortcut convs stay dense, as in the paper's tensor models: that is what makes ``TensorTrain_0.234``
about 1/60 of the dense model (592,992 / 36,479,194 = 1/61.5; tensorizing the shortcuts too would
give 1/104). The stem conv and the classifier stay dense.
"""
from typing import Any, Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ._factorize import (
    PAPER_KEEPS_DENSE, ClassifierMixin, channels_last_input, factorize_model, kaiming_fan_out_, kaiming_linear_fan_in_,
    record_kept_dense,
)
from .fnl_cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['WideResNet']

CONV_TYPES = ('lowrank', 'tt', 'tucker')


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the (pre-activated) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        self.drop_rate = drop_rate
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.act2(self.bn2(self.conv1(o)))
        if self.drop_rate:
            o = F.dropout(o, p=float(self.drop_rate), training=self.training)
        return self.conv2(o) + shortcut


class WideResNet(ClassifierMixin, nn.Module):
    """WRN-depth-width for CIFAR.

    Args:
        depth: 6n+4 (28 for WRN-28-10).
        width: widening factor (10).
        block_drop_rate: dropout between the two convs of a block.
        conv: block conv format: 'lowrank' (``U Vᵀ`` factorization), 'tt' or 'tucker' (docs/method.md#tensor-formats:
            depthwise conv + tensor-format 1x1 conv; ``rank_scale`` is the tensor scale s in (0, 1],
            or ``target_ratio`` solves it; ``spectral`` = TT-SVD / HOSVD of the dense init; no ``square``).
        num_classes, in_chans, drop_rate, global_pool: timm's usual meaning.
        rank_scale, target_ratio, spectral, square: see ``fnl_timm.models.CifarResNet``.
    """

    def __init__(
            self,
            depth: int = 28,
            width: int = 10,
            block_drop_rate: float = 0.0,
            conv: str = 'lowrank',
            num_classes: int = 10,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            global_pool: str = 'avg',
            rank_scale: Optional[float] = None,
            target_ratio: Optional[float] = None,
            spectral: bool = False,
            square: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f'depth must be 6n+4 with n >= 1 (e.g. 28), got {depth!r}')
        if not isinstance(width, int) or width < 1:
            raise ValueError(f'width must be a positive int, got {width!r}')
        if conv not in CONV_TYPES:
            raise ValueError(f'conv must be one of {CONV_TYPES}, got {conv!r}')
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=16, reduction=1, module='conv1')]
        in_ch = 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_ch, w, (1 if i == 0 else 2) if j == 0 else 1, block_drop_rate))
                in_ch = w
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            if i < 2:
                self.feature_info.append(dict(num_chs=w, reduction=2 ** i, module=f'layer{i + 1}'))
        self.bn = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=in_ch, reduction=4, module='act'))
        self.num_features = self.head_hidden_size = in_ch
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        include = ['layer*.conv1', 'layer*.conv2', 'layer*.shortcut']
        self.channels_last_inputs = False  # tensor formats: not measured channels-last (factorize_model sets it)
        if conv != 'lowrank':
            self.rank_scale = _tensorize(self, include[:2], conv, rank_scale, target_ratio, spectral, square)
        else:
            self.rank_scale = factorize_model(
                self, include, rank_scale=rank_scale, target_ratio=target_ratio, spectral=spectral,
                square=square, init=kaiming_fan_out_)
        if device is not None or dtype is not None:  # built (and SVD-initialised) on the CPU, then moved
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)  # (B, 640, H/4, W/4)
        return self.act(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last_input(x, self.channels_last_inputs)  # on the CPU: faster (docs/speed.md)
        return self.forward_head(self.forward_features(x))


def _tensorize(model: nn.Module, include, conv: str, rank_scale: Optional[float], target_ratio: Optional[float],
               spectral: bool, square: bool) -> float:
    """Replace the block convs by ``fnl.TTConv2d`` / ``fnl.TuckerConv2d``; returns the scale s."""
    import fnl
    from fnl._validate import check_rank_choice

    from ..optim import mark_factors
    if square:
        raise ValueError(f'square=True is for conv=\'lowrank\' only, got conv={conv!r}')
    if rank_scale is None and target_ratio is None:
        raise ValueError(f'conv={conv!r} needs rank_scale (the tensor scale s, a float in (0, 1]) or target_ratio')
    check_rank_choice(None, rank_scale, target_ratio, at_most_one=True)  # docs/method.md#rank-settings
    if target_ratio is not None:
        rank_scale = fnl.solve_tensor_scale(model, target_ratio, conv, include=include)
    fnl.adopt_on_load(model, after=mark_factors)  # a checkpoint's ranks and format are adopted on load
    fnl.tensorize(
        model, tensor_format=conv, rank_scale=rank_scale, spectral=bool(spectral), include=include,
        init=kaiming_fan_out_, depthwise_init=kaiming_linear_fan_in_)
    mark_factors(model)
    record_kept_dense(model, PAPER_KEEPS_DENSE.replace('stem or classifier', 'stem, classifier or 1x1 shortcut'))
    return float(rank_scale)


default_cfgs = generate_default_cfgs({
    'fnl_wrn28_10.untrained': {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'paper_ids': 'arXiv:2105.01029', 'license': 'mit',
    },
})


@register_model
def fnl_wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 (36.5M parameters dense), factorized block and shortcut convs."""
    return build_model_with_cfg(
        WideResNet, 'fnl_wrn28_10', pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **dict(dict(depth=28, width=10), **kwargs),
    )
