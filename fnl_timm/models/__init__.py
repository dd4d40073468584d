"""The fnl_* model zoo; importing registers every model in timm's registry."""
from .fnl_cifar_resnet import BasicBlock, CifarResNet
from .fnl_vgg import CifarVGG
from .fnl_wide_resnet import WideResNet

__all__ = ['BasicBlock', 'CifarResNet', 'CifarVGG', 'WideResNet']
