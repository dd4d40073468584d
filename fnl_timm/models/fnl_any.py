"""Any timm model, factorized: the registered model ``fnl`` (paper sections 2-3).

    model = timm.create_model('fnl', base='resnet50', rank_scale=0.25, spectral=True)

builds ``base`` with ``timm.create_model`` (every other keyword goes to it: ``pretrained``,
``pretrained_cfg_overlay``, ``num_classes``, ``in_chans``, ``features_only``, ``drop_rate``, ...),
then replaces its ``nn.Linear`` / ``nn.Conv2d`` layers by factorized ones in place with
``fnl.factorize`` and returns the base model itself. So everything timm knows about the base
keeps working: its ``pretrained_cfg`` (mean, std, input size), ``forward_features`` /
``forward_head``, ``reset_classifier``, ``set_grad_checkpointing``, ``no_weight_decay``,
``features_only``. With ``pretrained=True`` timm loads the dense weights first and the layers are
then factorized by SVD (post-training factorization: the best rank-r approximation of each trained
layer); ``spectral`` defaults to True there.

Left dense, as the paper does for every vision model: the stem (``pretrained_cfg['first_conv']``)
and the classifier (``pretrained_cfg['classifier']``); grouped / depthwise convs and subclasses of
``nn.Linear`` / ``nn.Conv2d`` (whose forward may use the weight differently) cannot be factorized.
Why each dense layer stayed dense is in ``model.fnl_kept_dense`` ({layer name: reason}).

The factors are registered for the ``fd*`` optimizers (``fnl_timm.mark_factors``) when the model
is built.
"""
import fnmatch
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Union

from torch import nn

import timm
from timm.models import generate_default_cfgs, register_model

# the core by name: this module's entrypoint is called ``fnl``
from fnl._validate import check_rank_choice
from fnl import adopt_on_load, factorize, solve_rank_scale

from ..optim import mark_factors
from ._timm_attention import balance_attention_, mark_attention, shrink_heads_, timm_attentions

__all__ = ['factorize_timm_model']

Patterns = Union[None, str, Sequence[str]]

_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def _check_rank_args(rank: Optional[int], rank_scale: Optional[float],
                     target_ratio: Optional[float]) -> Optional[str]:
    """Validate the rank arguments by the core's one rule (docs/method.md#rank-settings); return
    which one is given (None: dense)."""
    return check_rank_choice(rank, rank_scale, target_ratio)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value


def _patterns(name: str, value: Patterns) -> List[str]:
    """``None``, a pattern, a comma-separated string (as timm's ``--model-kwargs exclude=a,b`` gives)
    or a list of fnmatch patterns over module names."""
    if value is None:
        return []
    items = value.split(',') if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in items):
        raise ValueError(f'{name} must be an fnmatch pattern over module names, a comma-separated string of them '
                         f'or a list of them, got {value!r}')
    return [p.strip() for p in items]


def _normalized(name: str) -> str:
    """A module name as both feature wrappers spell it: FeatureListNet flattens ``stem.0`` to ``stem_0``,
    FeatureGetterNet nests the model under ``model.``."""
    return (name[len('model.'):] if name.startswith('model.') else name).replace('.', '_')


def _names_of(cfg_value: Any) -> List[str]:
    if not cfg_value:
        return []
    return [cfg_value] if isinstance(cfg_value, str) else [n for n in cfg_value if isinstance(n, str)]


def _why_dense(name: str, module: nn.Module, ruled: Dict[str, str], inside_mha: Set[str]) -> Optional[str]:
    """Why a Linear / Conv2d is kept dense, None for one that can be factorized."""
    if name in ruled:
        return ruled[name]
    if name in inside_mha:
        return 'inside nn.MultiheadAttention (it reads the weight directly)'
    if type(module) not in _LAYER_TYPES:
        return f'{type(module).__name__} subclasses {module.__class__.__mro__[1].__name__}: its forward may use ' \
               'the weight differently'
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        kind = 'depthwise' if module.groups == module.in_channels else 'grouped'
        return f'{kind} conv (groups={module.groups}): the factorized conv has one group'
    if isinstance(module, nn.Conv2d) and module.padding_mode != 'zeros':
        return f"padding_mode={module.padding_mode!r}: the factorized conv pads with zeros"
    return None


def factorize_timm_model(
        model: nn.Module,
        *,
        rank: Optional[int] = None,
        rank_scale: Optional[float] = None,
        target_ratio: Optional[float] = None,
        spectral: bool = False,
        square: bool = False,
        include: Patterns = None,
        exclude: Patterns = None,
        factorize_stem: bool = False,
        factorize_classifier: bool = False,
        attention: str = 'linear',
        spectral_quekey: bool = False,
        spectral_outval: bool = False,
) -> nn.Module:
    """Factorize a timm model in place by the paper's vision rules; return it.

    Every ``nn.Linear`` / ``nn.Conv2d`` (exact types, one group, zero padding) is factorized but the
    stem and the classifier (named by the model's ``pretrained_cfg``), those ``exclude`` names and,
    with ``include``, those it does not name. The reason each remaining dense layer stayed dense goes
    to ``model.fnl_kept_dense``; the factors are registered for the ``fd*`` optimizers.

    Args:
        model: a timm model (or a ``features_only`` wrapper of one) with a ``pretrained_cfg``.
        rank: one rank for every layer (at most one of rank / rank_scale / target_ratio; none = dense).
        rank_scale: the paper's per-layer rank rule (``fnl.FactorizedLinear`` / ``fnl.FactorizedConv2d``).
        target_ratio: a whole-model parameter ratio (> 0); the rank_scale is solved.
        spectral: factorize the weights in the layers by SVD; else the factors get torch's default init.
        square: add the (r x r) factor S (deep distillation).
        include: fnmatch patterns (or one comma-separated string) of the layers to factorize.
        exclude: fnmatch patterns (or one comma-separated string) of layers to keep dense.
        factorize_stem: also factorize the first conv.
        factorize_classifier: also factorize the classifier.
        attention: how timm ``Attention`` layers are factorized: ``'linear'`` factorizes ``qkv`` and
            ``proj`` like any Linear; ``'heads'`` (the paper's Transformer method, with ``rank_scale``)
            shrinks every head to ``d_h = int(rank_scale * d / heads)`` dimensions instead, so the
            query-key and output-value forms have rank d_h (``spectral``: their best rank-d_h
            approximations, in balanced factors).
        spectral_quekey: rebalance each head's query-key factors by SVD (outputs unchanged).
        spectral_outval: rebalance each head's output-value factors by SVD (outputs unchanged).
    """
    given = _check_rank_args(rank, rank_scale, target_ratio)
    spectral, square = _check_flag('spectral', spectral), _check_flag('square', square)
    factorize_stem = _check_flag('factorize_stem', factorize_stem)
    factorize_classifier = _check_flag('factorize_classifier', factorize_classifier)
    spectral_quekey = _check_flag('spectral_quekey', spectral_quekey)
    spectral_outval = _check_flag('spectral_outval', spectral_outval)
    if attention not in ('linear', 'heads'):
        raise ValueError(f"attention must be 'linear' or 'heads', got {attention!r}")
    attns = timm_attentions(model)
    if attention == 'heads':
        if given != 'rank_scale':
            raise ValueError("attention='heads' shrinks each head by rank_scale: give rank_scale (not rank or "
                             "target_ratio)")
        if not attns:
            raise ValueError(f"attention='heads': {type(model).__name__} has no timm Attention layer")
    for flag, on in (('spectral_quekey', spectral_quekey), ('spectral_outval', spectral_outval)):
        if on and not attns:
            raise ValueError(f'{flag}: {type(model).__name__} has no timm Attention layer')
        if on and given is not None and attention == 'linear':
            raise ValueError(f"{flag} acts on dense query/key/value/output projections: with attention='linear' "
                             "they are factorized; use attention='heads'")
    includes, excludes = _patterns('include', include), _patterns('exclude', exclude)
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, _LAYER_TYPES)]
    for arg, patterns in (('include', includes), ('exclude', excludes)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n, _ in layers):
                raise ValueError(f'{arg} pattern {p!r} matches no nn.Linear / nn.Conv2d of the model (names look '
                                 f'like {", ".join(repr(n) for n, _ in layers[:3])})')

    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    ruled: Dict[str, str] = {}  # name -> why it is kept dense
    stems = {_normalized(n) for n in _names_of(cfg.get('first_conv'))}
    heads = {_normalized(n) for n in _names_of(cfg.get('classifier'))}
    get_classifier = getattr(model, 'get_classifier', None)
    head_modules = get_classifier() if callable(get_classifier) else ()
    head_ids = {id(m) for m in (head_modules if isinstance(head_modules, (tuple, list)) else [head_modules])}
    for name, module in layers:
        if not factorize_stem and _normalized(name) in stems:
            ruled[name] = 'stem (pretrained_cfg first_conv); factorize_stem=True factorizes it'
        elif not factorize_classifier and (_normalized(name) in heads or id(module) in head_ids):
            ruled[name] = 'classifier (pretrained_cfg classifier); factorize_classifier=True factorizes it'
        elif includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
            ruled[name] = 'not named by include'
        elif any(fnmatch.fnmatchcase(name, p) for p in excludes):
            ruled[name] = 'named by exclude'
    head_dims = {}
    if attention == 'heads':
        for name, attn in attns:
            head_dims[name] = int(rank_scale * attn.qkv.in_features / attn.num_heads)
            if not 1 <= head_dims[name] <= attn.head_dim:
                raise ValueError(f"attention='heads': rank_scale={rank_scale!r} gives {name!r} a head dimension of "
                                 f'{head_dims[name]}; it must be in [1, {attn.head_dim}]')
            for proj in ('qkv', 'proj'):
                ruled[f'{name}.{proj}'] = f"attention='heads': heads shrunk to d_h={head_dims[name]}"

    inside_mha: Set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.update(f'{name}.{c}' if name else c for c, _ in module.named_modules() if c)
    reasons = {n: _why_dense(n, m, ruled, inside_mha) for n, m in layers}
    if given is None:
        if spectral or square:
            raise ValueError('spectral / square need a factorized model: give rank, rank_scale > 0 or target_ratio')
        model.rank_scale = 0.0
    else:
        if not any(r is None for r in reasons.values()):
            raise ValueError(f'{type(model).__name__} has nothing to factorize: every nn.Linear / nn.Conv2d is the '
                             f'stem, the classifier, excluded, grouped or a subclass: {dict(list(reasons.items())[:6])}')
        kept = set(ruled)

        def keep(name: str, _: nn.Module) -> bool:
            return name in kept

        if given == 'target_ratio':
            rank_scale = solve_rank_scale(model, target_ratio, exclude=keep, square=square)
        factorize(model, rank=rank, rank_scale=rank_scale or None, spectral=spectral, square=square, exclude=keep)
        if given != 'rank':
            model.rank_scale = float(rank_scale)
        for name, attn in attns:
            if name in head_dims:
                shrink_heads_(attn, head_dims[name], spectral, name)
    for name, attn in attns:
        if spectral_quekey or spectral_outval:
            balance_attention_(attn, spectral_quekey, spectral_outval, name)
    model.fnl_kept_dense = {n: r for n, r in reasons.items() if r is not None}
    mark_factors(model)
    adopt_on_load(model, after=mark_factors)  # load_state_dict adopts a checkpoint's ranks (fnl/adopt.py)
    if attns and (given is None or attention == 'heads'):
        mark_attention(model)
    return model


default_cfgs = generate_default_cfgs({
    # the returned model carries its base's pretrained_cfg; this entry only describes the wrapper
    'fnl': dict(url='', num_classes=1000, input_size=(3, 224, 224), paper_ids='arXiv:2105.01029', license='mit'),
})


@register_model
def fnl(
        pretrained: bool = False,
        *,
        base: Optional[str] = None,
        rank: Optional[int] = None,
        rank_scale: Optional[float] = None,
        target_ratio: Optional[float] = None,
        spectral: Optional[bool] = None,
        square: bool = False,
        include: Patterns = None,
        exclude: Patterns = None,
        factorize_stem: bool = False,
        factorize_classifier: bool = False,
        attention: str = 'linear',
        spectral_quekey: bool = False,
        spectral_outval: bool = False,
        pretrained_cfg: Any = None,
        **kwargs: Any,
) -> nn.Module:
    """Any timm model, factorized: ``timm.create_model('fnl', base='resnet50', rank_scale=0.25, spectral=True)``.

    Args:
        pretrained: load the base's pretrained weights (timm's loading: ``pretrained_cfg_overlay=
            dict(file=...)`` for a local file), then factorize them by SVD.
        base: the timm model to factorize (any registered name, with a pretrained tag if wanted).
        rank, rank_scale, target_ratio: at most one (docs/method.md#rank-settings); none = the dense base model.
        spectral: spectral init (SVD of the dense init, or of the pretrained weights); default: pretrained.
        square, include, exclude, factorize_stem, factorize_classifier, attention, spectral_quekey,
            spectral_outval: see :func:`factorize_timm_model`.
        pretrained_cfg: a tag or cfg for the base (the ``fnl`` entry's own cfg is ignored).
        **kwargs: for ``timm.create_model(base, ...)`` (``num_classes``, ``in_chans``, ``drop_rate``,
            ``pretrained_cfg_overlay``, ``features_only``, ``img_size``, ...).

    Returns:
        The base model itself, factorized in place.
    """
    if not isinstance(base, str) or not base:
        raise ValueError(f"base must be the name of a timm model, e.g. base='resnet50', got {base!r}")
    name = base.partition(':')[2] if ':' in base else base  # hf-hub: / local-dir: sources go to timm
    if ':' not in base and not timm.is_model(base):
        similar = timm.list_models(f'*{name.split(".")[0][:6]}*')[:8]
        raise ValueError(f'base {base!r} is not a timm model' + (f' (similar: {", ".join(similar)})' if similar else ''))
    if name.split('.')[0] == 'fnl':
        raise ValueError("base must be the model to factorize, not 'fnl' itself")
    if spectral is None:
        spectral = bool(pretrained)
    elif pretrained and spectral is False and _check_rank_args(rank, rank_scale, target_ratio) is not None:
        raise ValueError('spectral=False with pretrained=True would replace the pretrained weights of every '
                         'factorized layer by a random init; leave spectral out (True) or drop pretrained')
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get('architecture') == 'fnl':
        pretrained_cfg = None  # the wrapper's own entry, resolved by a timm script: the base has its own
    model = timm.create_model(base, pretrained=bool(pretrained), pretrained_cfg=pretrained_cfg, **kwargs)
    return factorize_timm_model(
        model, rank=rank, rank_scale=rank_scale, target_ratio=target_ratio, spectral=spectral, square=square,
        include=include, exclude=exclude, factorize_stem=factorize_stem, factorize_classifier=factorize_classifier,
        attention=attention, spectral_quekey=spectral_quekey, spectral_outval=spectral_outval)
