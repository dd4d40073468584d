"""CIFAR ResNets with factorized block convs (paper sections 2-5; docs/experiments.md).

``fnl_resnet20/32/44/56/110``: the CIFAR ResNets of He et al. (2016, sec. 4.2): a 3x3 stem with
16 channels, three stages of 16/32/64 channels, parameter-free "option A" shortcuts (stride-2
subsampling and zero-padded channels). Both 3x3 convs of every basic block are factorized; the
stem conv and the classifier stay dense. ``fnl_resnet20`` has 269,722 parameters dense and
63,850 at ``rank_scale=0.111`` (stage ranks 5, 11, 21).

``fnl_resnet32_x2``: the width-64/128/256 ResNet-32 of the compression experiments, with
1x1-conv + BN shortcuts; conv1, conv2 and the shortcut conv of every block are factorized.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
import torch.nn.functional as F

from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ._factorize import ClassifierMixin, FoldsBatchNorm, channels_last_input, factorize_model

__all__ = ['CifarResNet', 'BasicBlock']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride``, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f'option-A shortcut needs out_channels >= in_channels with an even '
                             f'difference, got in={in_channels}, out={out_channels}')
        self.stride = stride
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(FoldsBatchNorm, nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            stride: int = 1,
            shortcut: str = 'pad',
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        if stride == 1 and in_channels == out_channels:
            self.downsample = nn.Identity()
        elif shortcut == 'pad':
            self.downsample = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == 'conv':
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            shortcut = self.downsample(x)
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.bn2(self.conv2(x))
        else:
            shortcut = self._sequential(self.downsample, x)
            x = self.act1(self._conv_bn(self.conv1, self.bn1, x))
            x = self._conv_bn(self.conv2, self.bn2, x)
        x += shortcut  # in place, as in timm's blocks: x is this block's own BatchNorm (or conv) output
        return self.act2(x)


class CifarResNet(FoldsBatchNorm, ClassifierMixin, nn.Module):
    """CIFAR ResNet (three stages of basic blocks) with factorized block convs.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        widths: channels of the three stages; the stem has ``widths[0]`` channels.
        shortcut: 'pad' (option A, parameter-free) or 'conv' (1x1 conv + BN, factorized too).
        num_classes: classifier outputs (0 = no classifier, ``forward`` gives pooled features).
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        global_pool: timm pool type ('avg', 'max', 'avgmax', '' = none).
        rank_scale: rank = round(rank_scale * out * kh) per block conv, a finite float > 0; None = dense
            (docs/method.md#rank-settings).
        target_ratio: solve one rank_scale so that params / dense params is closest to this (> 0).
        spectral: spectral init of the factors from the dense Kaiming init (paper section 3.1).
        square: ``W = U S Vᵀ`` with S = I (deep distillation).

    In eager inference (eval mode, autograd off) each BatchNorm (after the stem, the block and the
    shortcut convs) is folded into the conv before it (``fnl.conv_bn``): the same function, faster
    on the CPU (docs/speed.md). ``set_bn_folding(False)`` keeps them apart.
    """

    def __init__(
            self,
            depth: int = 20,
            widths: Sequence[int] = (16, 32, 64),
            shortcut: str = 'pad',
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
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f'depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}')
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f'widths must be three positive ints, got {widths!r}')
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='act1')]
        in_ch = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, w, stride if j == 0 else 1, shortcut=shortcut))
                in_ch = w
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** i, module=f'layer{i + 1}'))
        self.num_features = self.head_hidden_size = in_ch
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        # the reference's init: Kaiming normal (fan-in) for every conv and linear weight
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        include = ['layer*.conv1', 'layer*.conv2']
        if shortcut == 'conv':
            include.append('layer*.downsample.0')
        self.rank_scale = factorize_model(
            self, include, rank_scale=rank_scale, target_ratio=target_ratio,
            spectral=spectral, square=square, init=nn.init.kaiming_normal_)
        if device is not None or dtype is not None:  # built (and SVD-initialised) on the CPU, then moved
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self.act1(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        else:
            x = self.act1(self._conv_bn(self.conv1, self.bn1, x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)  # (B, w1, H/2, W/2)
            x = self.layer3(x)  # (B, w2, H/4, W/4)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last_input(x, self.channels_last_inputs)  # on the CPU: faster (docs/speed.md)
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'paper_ids': 'arXiv:2105.01029',
        'license': 'mit', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fnl_resnet20.untrained': _cfg(),
    'fnl_resnet32.untrained': _cfg(),
    'fnl_resnet44.untrained': _cfg(),
    'fnl_resnet56.untrained': _cfg(),
    'fnl_resnet110.untrained': _cfg(),
    'fnl_resnet32_x2.untrained': _cfg(),
    'fnl_test_resnet.untrained': _cfg(input_size=(3, 16, 16), pool_size=(4, 4)),
})


@register_model
def fnl_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters dense), factorized block convs."""
    return _create_cifar_resnet('fnl_resnet20', pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def fnl_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR, factorized block convs (deep distillation: rank_scale=1, square=True)."""
    return _create_cifar_resnet('fnl_resnet32', pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def fnl_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR, factorized block convs."""
    return _create_cifar_resnet('fnl_resnet44', pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def fnl_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR, factorized block convs."""
    return _create_cifar_resnet('fnl_resnet56', pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def fnl_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR, factorized block convs."""
    return _create_cifar_resnet('fnl_resnet110', pretrained, **dict(dict(depth=110), **kwargs))


@register_model
def fnl_resnet32_x2(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 with 64/128/256 channels and 1x1-conv + BN shortcuts (compression experiments)."""
    args = dict(depth=32, widths=(64, 128, 256), shortcut='conv')
    return _create_cifar_resnet('fnl_resnet32_x2', pretrained, **dict(args, **kwargs))


@register_model
def fnl_test_resnet(pretrained: bool = False, **kwargs) -> CifarResNet:
    """A tiny ResNet-8 (8/16/16 channels, conv shortcuts) for fast tests."""
    args = dict(depth=8, widths=(8, 16, 16), shortcut='conv')
    return _create_cifar_resnet('fnl_test_resnet', pretrained, **dict(args, **kwargs))
