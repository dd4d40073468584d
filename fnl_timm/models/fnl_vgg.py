"""VGG-19 with BatchNorm for CIFAR / Tiny-ImageNet, factorized convs (paper section 4;
docs/experiments.md#compression).

The CIFAR configuration of the compression experiments: sixteen 3x3 convs (64, 64, M, 128, 128,
M, 256 x4, M, 512 x4, M, 512 x4) with BN and ReLU, global average pooling and one Linear
classifier. 32x32 inputs end at 2x2 and 64x64 (Tiny-ImageNet) at 4x4 before the pool. Every
conv but the first is factorized.
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ._factorize import ClassifierMixin, FoldsBatchNorm, channels_last_input, factorize_model, kaiming_fan_out_
from .fnl_cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['CifarVGG']

VGG19_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
             512, 512, 512, 512)


class CifarVGG(FoldsBatchNorm, ClassifierMixin, nn.Module):
    """VGG with BN for small images; every conv but the first is factorized.

    Args:
        cfg: channels per conv, 'M' for a 2x2 max pool.
        num_classes, in_chans, drop_rate, global_pool: timm's usual meaning.
        rank_scale, target_ratio, spectral, square: see ``fnl_timm.models.CifarResNet``.

    In eager inference every BatchNorm is folded into the conv before it, as in ``CifarResNet``
    (``set_bn_folding(False)`` keeps them apart).
    """

    def __init__(
            self,
            cfg: Sequence[Union[int, str]] = VGG19_CFG,
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
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        layers: List[nn.Module] = []
        self.feature_info = []
        in_ch, reduction, convs = in_chans, 1, []
        for v in cfg:
            if v == 'M':
                self.feature_info.append(dict(num_chs=in_ch, reduction=reduction,
                                              module=f'features.{len(layers) - 1}'))
                layers.append(nn.MaxPool2d(2, 2))
                reduction *= 2
            elif isinstance(v, int) and v > 0:
                convs.append(f'features.{len(layers)}')
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
            else:
                raise ValueError(f"cfg entries must be positive ints or 'M', got {v!r}")
        if not convs:
            raise ValueError('cfg has no conv layer')
        self.feature_info.append(dict(num_chs=in_ch, reduction=reduction, module=f'features.{len(layers) - 1}'))
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = in_ch
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self.rank_scale = factorize_model(
            self, convs[1:], rank_scale=rank_scale, target_ratio=target_ratio, spectral=spectral,
            square=square, init=kaiming_fan_out_)
        if device is not None or dtype is not None:  # built (and SVD-initialised) on the CPU, then moved
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^features\.[012]\.', blocks=r'^features\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        if torch.jit.is_scripting():
            return self.features(x)  # (B, 512, H/16, W/16)
        return self._sequential(self.features, x)  # eager inference: BatchNorm folded into the convs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last_input(x, self.channels_last_inputs)  # on the CPU: faster (docs/speed.md)
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (2, 2),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'features.0', 'classifier': 'fc', 'paper_ids': 'arXiv:2105.01029',
        'license': 'mit', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fnl_vgg19.cifar': _cfg(),
    'fnl_vgg19.tinyimagenet': _cfg(num_classes=200, input_size=(3, 64, 64), pool_size=(4, 4),
                                   mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821)),
})


@register_model
def fnl_vgg19(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 with BN (CIFAR configuration, 20.0M parameters dense), factorized convs."""
    return build_model_with_cfg(
        CifarVGG, 'fnl_vgg19', pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )
