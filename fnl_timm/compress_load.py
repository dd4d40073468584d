"""Loading for ``fnl-compress``: the model to compress (a timm name with its weights, or a saved
module) and the ``compressed.pth`` it writes (:func:`load_compressed` rebuilds the model).
"""
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

import timm

import fnl
from fnl._serialization import load_file as load_plain_file

from ._serialization import TRUST_HINT, is_torchscript, load_file, load_torchscript, state_dict_mismatch
from ._serialization import state_dict_of as _state_dict_of
from .optim import mark_factors

__all__ = ['is_compressed_checkpoint', 'load_compressed', 'load_model']

# timm.create_model keyword arguments that fetch or read other files: never taken from a compressed.pth
_FILE_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir')


def load_model(
        model: str,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        random_init: bool = False,
        trust_pickle: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the model to compress.

    Args:
        model: a timm model name, or the path of a ``torch.save``'d ``nn.Module`` (a whole pickled
            module: loads only with ``trust_pickle``).
        checkpoint: with a timm name, the weights: a state dict, a timm / fnl-train checkpoint, or
            (with ``trust_pickle``) a TorchScript file, whose weights are read into the eager timm model.
        model_kwargs: keyword arguments of ``timm.create_model`` (``num_classes``, ``in_chans``, ...).
        random_init: allow a timm name without a checkpoint (timing runs only).
        trust_pickle: allow files whose loading runs code from the file (a pickled module, TorchScript);
            only for files from a trusted source. Without it they are refused with an error naming the flag.

    Returns:
        (model in eval mode, provenance dict: 'arch', 'model_kwargs', 'source').

    Raises:
        ValueError: a bad name or file (``fnl_timm._serialization.UntrustedPickleError`` for a file
            that needs ``trust_pickle``), or weights that do not fit the model.
    """
    model_kwargs = dict(model_kwargs or {})
    looks_like_file = os.sep in model or model.endswith(('.pt', '.pth', '.ts', '.tar', '.pt2'))
    if not os.path.exists(model) and not timm.is_model(model) and looks_like_file:
        raise ValueError(f'--model {model!r}: no such file (and not a timm model name)')
    # a folder that is also a timm name (the generic 'fnl' model run from the repository root, where the
    # fnl/ package folder exists) is the model name: folders never hold a module
    if os.path.exists(model) and not (os.path.isdir(model) and timm.is_model(model)):
        if not os.path.isfile(model):
            raise ValueError(f'--model {model!r} is a folder, not a file holding a module')
        if checkpoint is not None:
            raise ValueError('--checkpoint goes with a timm model name; --model is already a file holding a module')
        if os.path.getsize(model) and is_torchscript(model):
            raise ValueError(f'--model {model!r} is a TorchScript module: its graph is frozen and its layers cannot '
                             'be factorized. Give the timm name as --model and a state dict as --checkpoint, or '
                             'torch.save the eager module')
        obj = load_file(model, '--model', trust_pickle=trust_pickle,
                        hint=f'{TRUST_HINT}. A state dict needs no unpickling: give the timm model name as --model '
                             'and the state dict as --checkpoint')
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
    state = None
    if checkpoint is not None:
        if os.path.isfile(checkpoint) and os.path.getsize(checkpoint) and is_torchscript(checkpoint):
            state = load_torchscript(checkpoint, '--checkpoint', trust_pickle=trust_pickle).state_dict()
        else:
            state = _state_dict_of(load_file(checkpoint, '--checkpoint', trust_pickle=trust_pickle), checkpoint)
    net = timm.create_model(model, **model_kwargs)
    if state is not None:
        mismatch = state_dict_mismatch(net, state)
        if mismatch:
            raise ValueError(f'--checkpoint {checkpoint!r} does not fit --model {model!r} with model kwargs '
                             f'{model_kwargs}: {mismatch} (another architecture? check --model, --num-classes, '
                             '--model-kwargs)')
        net.load_state_dict(state, strict=True)
    return net.eval(), {'arch': model, 'model_kwargs': model_kwargs,
                        'source': None if checkpoint is None else os.path.abspath(checkpoint)}


def is_compressed_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is an fnl-compress ``compressed.pth`` (arch, model kwargs, ranks, state dict)."""
    return isinstance(obj, dict) and all(k in obj for k in ('arch', 'model_kwargs', 'ranks', 'state_dict'))


def _check_compressed(ckpt: Dict[str, Any], path: str, arg_name: str) -> None:
    """The recipe in a compressed.pth comes from a file: a registered timm name, keyword arguments that
    read no other file, integer ranks."""
    arch, kwargs, ranks = ckpt['arch'], ckpt['model_kwargs'], ckpt['ranks']
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(f'{arg_name} {path!r}: arch {arch!r} is not a registered timm model')
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f'{arg_name} {path!r}: model_kwargs must be a dict with string keys')
    fetching = sorted(set(kwargs) & set(_FILE_KWARGS))
    if fetching:
        raise ValueError(f'{arg_name} {path!r}: model_kwargs {fetching} would make timm fetch or read other files; '
                         'a compressed.pth holds its own weights')
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in ranks.items()):
        raise ValueError(f'{arg_name} {path!r}: ranks must map layer names to integers')
    state = ckpt['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{arg_name} {path!r}: state_dict must be a dict of tensors')


def load_compressed(path: Union[str, Dict[str, Any]], device: str = 'cpu', arg_name: str = 'path') -> nn.Module:
    """Rebuild a compressed timm model from ``compressed.pth`` (arch + kwargs + ranks + state dict).

    The file loads weights-only (it holds only tensors, strings and numbers): no code from it runs.

    Args:
        path: the file, or the already loaded checkpoint dict.
        device: where the model goes.
        arg_name: the argument that named the file, for error messages.
    """
    if isinstance(path, dict):
        ckpt, path = path, '<dict>'
    else:
        path = os.fspath(path)
        ckpt = load_plain_file(path, arg_name)  # tensors, strings and numbers only: no extra type allowed
    if not is_compressed_checkpoint(ckpt):
        raise ValueError(f'{arg_name} {path!r} is not an fnl-compress checkpoint (no arch / ranks)')
    _check_compressed(ckpt, path, arg_name)
    net = timm.create_model(ckpt['arch'], **ckpt['model_kwargs'])
    try:
        fnl.apply_ranks(net, ckpt['ranks'])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f'{arg_name} {path!r}: its ranks do not fit {ckpt["arch"]!r} ({e})') from None
    if ckpt.get('form') == 'inference':  # two plain layers per factorized one
        fnl.to_inference_form(net)
    # layers collapsed after fine-tuning are not in 'ranks': they stay dense
    mismatch = state_dict_mismatch(net, ckpt['state_dict'])
    if mismatch:
        raise ValueError(f'{arg_name} {path!r}: its state dict does not fit {ckpt["arch"]!r} with its ranks: {mismatch}')
    net.load_state_dict(ckpt['state_dict'])
    mark_factors(net)
    return net.to(device).eval()
