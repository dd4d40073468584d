"""Loading for ``fnl-compress``: the model to compress (a timm name with its weights, or a saved
module) and the ``compressed.pth`` it writes (:func:`load_compressed` rebuilds the model).
"""
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

import timm

import fnl

from ._serialization import allow_argparse_namespace
from .optim import mark_factors

__all__ = ['is_compressed_checkpoint', 'load_compressed', 'load_model']


def _is_torchscript(path: str) -> bool:
    """TorchScript archives hold ``<name>/code/`` and ``<name>/constants.pkl``; ``torch.save`` ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def _torch_load(path: str, arg: str) -> Any:
    """``torch.load`` on the CPU, safe loading first; fnl-train / timm checkpoints also hold an argparse Namespace."""
    try:
        with allow_argparse_namespace():
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass  # a pickled module: needs the full unpickler (only for files you trust)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a torch file
        raise ValueError(f'{arg} {path!r} could not be read as a torch file ({type(e).__name__}: {e})') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'{arg} {path!r} could not be read as a torch file ({type(e).__name__}: {e})') from None


def _state_dict_of(obj: Any, path: str, arg: str = '--checkpoint') -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ('state_dict', 'model_state_dict', 'model'):  # the plain weights, not an EMA
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}
    raise ValueError(f'{arg} {path!r} holds no state dict (expected a dict of tensors, or one under '
                     f"'state_dict' / 'model'; got {type(obj).__name__})")


def load_model(
        model: str,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        random_init: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the model to compress.

    Args:
        model: a timm model name, or the path of a ``torch.save``'d ``nn.Module``.
        checkpoint: with a timm name, the weights: a state dict, a timm / fnl-train checkpoint, or
            a TorchScript file (its weights are read into the eager timm model).
        model_kwargs: keyword arguments of ``timm.create_model`` (``num_classes``, ``in_chans``, ...).
        random_init: allow a timm name without a checkpoint (timing runs only).

    Returns:
        (model in eval mode, provenance dict: 'arch', 'model_kwargs', 'source').
    """
    model_kwargs = dict(model_kwargs or {})
    looks_like_file = os.sep in model or model.endswith(('.pt', '.pth', '.ts', '.tar', '.pt2'))
    if not os.path.exists(model) and not timm.is_model(model) and looks_like_file:
        raise ValueError(f'--model {model!r}: no such file (and not a timm model name)')
    if os.path.exists(model):
        if not os.path.isfile(model):
            raise ValueError(f'--model {model!r} is a folder, not a file holding a module')
        if checkpoint is not None:
            raise ValueError('--checkpoint goes with a timm model name; --model is already a file holding a module')
        if _is_torchscript(model):
            raise ValueError(f'--model {model!r} is a TorchScript module: its graph is frozen and its layers cannot '
                             'be factorized. Give the timm name as --model and the TorchScript file as --checkpoint '
                             '(its weights are loaded into the eager model), or torch.save the eager module')
        obj = _torch_load(model, '--model')
        if not isinstance(obj, nn.Module):
            raise ValueError(f'--model {model!r} is not a saved nn.Module (it holds a {type(obj).__name__}); for a '
                             'state dict give the timm model name as --model and the file as --checkpoint')
        return obj.eval(), {'arch': None, 'model_kwargs': {}, 'source': os.path.abspath(model)}
    if not timm.is_model(model):
        raise ValueError(f'--model {model!r} is neither a timm model name nor an existing file '
                         f'(timm.list_models("*{model[:6]}*") lists similar names)')
    if checkpoint is None and not random_init:
        raise ValueError('--checkpoint is required with a timm model name (a compressed random model is '
                         'meaningless; pass --random-init for timing only)')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f'--checkpoint {checkpoint!r}: no such file')
    net = timm.create_model(model, **model_kwargs)
    if checkpoint is not None:
        if _is_torchscript(checkpoint):
            try:
                state = torch.jit.load(checkpoint, map_location='cpu').state_dict()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f'--checkpoint {checkpoint!r} could not be read as TorchScript '
                                 f'({type(e).__name__}: {e})') from None
        else:
            state = _state_dict_of(_torch_load(checkpoint, '--checkpoint'), checkpoint)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f'--checkpoint {checkpoint!r} does not fit --model {model!r} with model kwargs '
                             f'{model_kwargs}: {str(e).splitlines()[0]} ... (check --num-classes / '
                             f'--model-kwargs)\n{e}') from None
    return net.eval(), {'arch': model, 'model_kwargs': model_kwargs,
                        'source': None if checkpoint is None else os.path.abspath(checkpoint)}


def is_compressed_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is an fnl-compress ``compressed.pth`` (arch, model kwargs, ranks, state dict)."""
    return isinstance(obj, dict) and all(k in obj for k in ('arch', 'model_kwargs', 'ranks', 'state_dict'))


def load_compressed(path: Union[str, Dict[str, Any]], device: str = 'cpu') -> nn.Module:
    """Rebuild a compressed timm model from ``compressed.pth`` (arch + kwargs + ranks + state dict).

    ``path`` may also be the already loaded checkpoint dict.
    """
    if isinstance(path, dict):
        ckpt, path = path, '<dict>'
    else:
        if not os.path.isfile(path):
            raise ValueError(f'path {path!r}: no such file')
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if not is_compressed_checkpoint(ckpt):
        raise ValueError(f'path {path!r} is not an fnl-compress checkpoint (no arch / ranks)')
    net = timm.create_model(ckpt['arch'], **ckpt['model_kwargs'])
    fnl.apply_ranks(net, ckpt['ranks'])
    if ckpt.get('form') == 'inference':  # two plain layers per factorized one
        fnl.to_inference_form(net)
    # layers collapsed after fine-tuning are not in 'ranks': they stay dense
    net.load_state_dict(ckpt['state_dict'])
    mark_factors(net)
    return net.to(device).eval()

