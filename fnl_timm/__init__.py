"""timm plugin for FNL (Khodak et al., ICLR 2022): factorized model zoo and Frobenius-decay
optimizers, registered in timm's model and optimizer registries on import.

    import timm, fnl_timm
    model = timm.create_model('fnl_resnet20', rank_scale=0.111, spectral=True)
    opt = timm.optim.create_optimizer_v2(model, 'fdmomentum', lr=0.1, weight_decay=1e-4)

Stock timm ``train.py``: ``--device-modules fnl_timm`` imports this package.
"""
from .optim import FDAdam, FDAdamW, FDSGD, factor_owner, mark_factors, register_fd_optimizers
from .models import BasicBlock, CifarResNet, CifarVGG, WideResNet

register_fd_optimizers()

__all__ = [
    'FDAdam', 'FDAdamW', 'FDSGD', 'factor_owner', 'mark_factors', 'register_fd_optimizers',
    'BasicBlock', 'CifarResNet', 'CifarVGG', 'WideResNet',
]
