"""timm's own folder for a model with its arguments: ``config.json`` + weights, as written by
``timm.models.save_for_hf`` and read by ``timm.create_model('local-dir:FOLDER', pretrained=True)``
(``--model local-dir:FOLDER`` in timm's scripts: ``validate.py``, ``inference.py``,
``benchmark.py``, ``train.py``), so no script needs ``--model-kwargs`` repeated.

``config.json`` names the architecture (e.g. ``fnl_resnet20``) and the model arguments that
``timm.create_model`` was given (``num_classes``, ``rank_scale``, ``spectral``, ...; timm records
them at creation), and the preprocessing the model was trained with; the weights are
``model.safetensors`` (no pickle). A model whose layers have ranks its arguments do not give (an
``fnl-compress`` model) loads when its architecture adopts a checkpoint's factor shapes
(:func:`fnl.adopt_on_load`, which every ``fnl_*`` model registers): the ranks are in the weights'
shapes. Every folder is checked by loading it with timm's loader and comparing the outputs; a
folder that would not reproduce the model is not written, and the reason is returned.
"""
import copy
import logging
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

import timm

__all__ = ['save_timm_folder']

def save_timm_folder(model: nn.Module, folder: str, input_size: Sequence[int],
                     state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     data_config: Optional[Dict[str, Any]] = None, atol: float = 1e-4) -> Optional[str]:
    """Write ``model`` (or ``state_dict`` in its architecture) as timm's ``local-dir`` folder ``folder``.

    The folder is written under a temporary name next to ``folder``, loaded back with
    ``timm.create_model('local-dir:...', pretrained=True)``, its outputs compared with the model's on a
    random batch, and only then renamed into place (an older ``folder`` is replaced).

    Args:
        model: a model made by ``timm.create_model`` (it carries its architecture and arguments).
        folder: the folder to write.
        input_size: one sample's shape (C, H, W), for the check.
        state_dict: the weights to write instead of the model's own (e.g. the best epoch's).
        data_config: the preprocessing to record (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``); default: the model's pretrained config.
        atol: the output tolerance of the check (also relative).

    Returns:
        None when the folder was written; otherwise why not (nothing is written then).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch or not timm.is_model(arch) or not hasattr(model, '_model_args'):
        return 'the model was not made by timm.create_model from a registered name (no architecture to record)'
    if 'base' in model._model_args:
        return ("a model made by timm.create_model('fnl', base=...) records its base's architecture, which "
                "takes none of fnl's arguments; reload it with timm.create_model('fnl', base=..., "
                "checkpoint_path=...) (the checkpoint's ranks are adopted)")
    src = copy.deepcopy(model).cpu().eval()  # the caller's model stays where and as it is
    if state_dict is not None:
        src.load_state_dict(state_dict)
    src.to(memory_format=torch.contiguous_format)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp-hf-', dir=parent)
    try:
        try:
            timm.models.save_for_hf(src, tmp, safe_serialization=True, data_config=data_config)
        except ValueError as e:  # a model argument that JSON cannot hold
            return f'timm.models.save_for_hf refused it: {str(e).splitlines()[0]}'
        except RuntimeError as e:  # safetensors refuses tensors that share memory; other errors (a full disk) rise
            if 'share memory' not in str(e):
                raise
            return f'timm.models.save_for_hf refused it: {str(e).splitlines()[0]}'
        reason = _check(src, tmp, input_size, atol)
        if reason is not None:
            return reason
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix='.old-hf-', dir=parent)
            os.replace(folder, os.path.join(old, 'hf'))
        os.replace(tmp, folder)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _check(model: nn.Module, folder: str, input_size: Sequence[int], atol: float) -> Optional[str]:
    """Load ``folder`` with timm's own loader; None when it reproduces ``model``, else why not."""
    timm_logger = logging.getLogger('timm')
    level = timm_logger.level
    timm_logger.setLevel(max(logging.WARNING, timm_logger.getEffectiveLevel()))  # its "Loading ..." lines
    try:
        with warnings.catch_warnings():  # adoption's note on rebuilt layers is for optimizers made before loading
            warnings.simplefilter('ignore')
            loaded = timm.create_model('local-dir:' + folder, pretrained=True).eval()
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # TypeError: an argument the class does not take
        return f"timm's loader cannot rebuild it from its architecture and arguments: {str(e).splitlines()[0]}"
    finally:
        timm_logger.setLevel(level)
    x = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))
    ref, got = model(x), loaded(x)
    if ref.shape != got.shape or not torch.allclose(ref, got, atol=atol, rtol=atol):
        diff = float((ref - got).abs().max()) if ref.shape == got.shape else float('nan')
        return f"timm's loader rebuilds it with other outputs (max |diff| {diff:.3g})"
    return None
