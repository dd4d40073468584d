"""Frobenius-decay optimizers registered in timm's optimizer registry (paper section 3).

``timm.optim.create_optimizer_v2(model, 'fdsgd', lr=0.1, momentum=0.9, weight_decay=1e-4)``
gives the paper's ``--wd2fd`` behaviour: every factor of a factorized layer is regularised by
Frobenius decay ``(lambda/2) ||U Vᵀ||_F²`` with ``lambda`` = the weight decay, and every other
parameter keeps timm's ordinary weight decay. timm's factory hands an optimizer only parameter
groups, never the model, so the optimizer finds the layer that owns each factor through a
registry filled by :func:`mark_factors` (every ``fnl_*`` model calls it when it is built; call it
yourself for a model factorized with ``fnl.factorize``). The models' ``no_weight_decay()`` does
not name the factors: with a stock timm optimizer (``sgd``, ``momentum``, ``adamw``, ...) they keep
ordinary weight decay, the paper's baseline.

FD is applied inside ``step()`` by the core's one FD engine (``fnl.fd_engine``, shared with
``fnl.FrobeniusDecay`` and the fairseq plugin): after backward, after ``GradScaler.unscale_`` and
gradient clipping, right before the update. ``fdsgd`` / ``fdmomentum`` add the FD gradient to the
gradient (coupled, the paper's), exactly where ``torch.optim.SGD`` applies coupled L2 weight decay
(it goes through momentum the same way). ``fdadam`` / ``fdadamw`` decouple it by default, as AdamW
decouples weight decay: each factor moves by ``-lr * coef * dFD/dp`` at its pre-step value before
Adam's update, so Adam's normalisation does not rescale FD (``fd_decoupled=False``: coupled). With
``fused=True`` under ``torch.amp.GradScaler`` the scaler hands the optimizer still-scaled gradients
and the scale to divide out inside the kernel; the coupled FD gradient is then multiplied by that
scale first, so the update is the same as unscaled, and a decoupled step is skipped on inf/NaN as the
kernel skips its own. ``foreach`` and the for-loop implementations are unscaled by the scaler before
``step``. Factors whose ``.grad`` is None this step get no FD. Under DDP the gradients are already
averaged and the factors are identical on every rank, so every rank applies the same FD term.

A requested regulariser that would do nothing is an error at construction: ``wd2fd=True`` (the
default) with no registered factor among the parameters, or with an FD coefficient of 0 that
was not asked for explicitly (``weight_decay=0`` and no ``fd_coef``).

Extra keyword arguments understood by every FD optimizer (pass them through timm's
``--opt-kwargs``):

* ``fd_coef``: the FD coefficient; default = the largest weight decay among the groups (the
  ``weight_decay`` the user asked for). ``fd_coef=0`` is the paper's ``--no-frob`` (factors
  unregularised).
* ``wd2fd``: ``True`` (default) = factors get FD and no weight decay; ``False`` = factors get
  ordinary weight decay and no FD (the paper's baseline).
* ``fd_decoupled``: ``True`` = decoupled FD (default of ``fdadam`` / ``fdadamw``), ``False`` =
  coupled (default of ``fdsgd`` / ``fdmomentum``). Decoupled FD moves all the factors of a layer
  (and an attention's ``qkv`` and ``proj``) by one learning rate: groups that split them with
  different learning rates are an error.
* ``wd2fd_quekey`` / ``wd2fd_outval``: FD on the per-head query-key / output-value forms of every
  timm ``Attention`` registered by ``fnl_timm.models.mark_attention`` (``timm.create_model('fnl',
  base=..., attention='heads')`` does it), batched over heads on slices of the fused ``qkv`` weight
  (paper section 3.2); ``qkv.weight`` (and with ``wd2fd_outval`` ``proj.weight``) then gets no plain
  weight decay. A requested form on a model without a registered attention is an error.
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from fnl.fd_engine import FDEngine, FDTerm, factor_owner, layer_term, mark_factors

__all__ = [
    'mark_factors', 'factor_owner', 'FDSGD', 'FDAdamW', 'FDAdam', 'FD_OPTIMIZERS',
    'register_fd_optimizers',
]


def _attention_weights(p: torch.Tensor, quekey: bool, outval: bool) -> bool:
    """Whether ``p`` is a timm attention weight that the requested forms regularise: ``qkv.weight`` for
    either form (the fused weight holds W_Q, W_K and W_V), ``proj.weight`` (W_O) for the output-value form."""
    if not (quekey or outval):
        return False
    from .models._timm_attention import attention_owner
    attn = attention_owner(p)
    return attn is not None and (p is attn.qkv.weight or (outval and p is attn.proj.weight))


def _split_factor_groups(
        params: Any,
        weight_decay: float,
        fd_coef: Optional[float],
        wd2fd: bool,
        fd_decoupled: bool = False,
        quekey: bool = False,
        outval: bool = False,
) -> Tuple[List[Dict[str, Any]], float, float]:
    """Split every group into its factor, attention-form and other parameters.

    Returns (groups, wd, coef): wd the largest weight decay among the groups (the default FD coefficient).
    """
    if isinstance(params, torch.Tensor):
        raise TypeError('params must be an iterable of tensors or of dicts, got a single tensor')
    groups = list(params)
    if len(groups) == 0:
        raise ValueError('params is empty: the optimizer got no parameters')
    if not isinstance(groups[0], dict):
        groups = [{'params': groups}]
    wd = max([weight_decay] + [float(g.get('weight_decay', weight_decay)) for g in groups])
    if fd_coef is None:
        coef = wd
    else:
        coef = float(fd_coef)
        if not coef >= 0.0 or coef != coef or coef == float('inf'):
            raise ValueError(f'fd_coef must be a finite float >= 0, got {fd_coef!r}')
        if coef > 0 and not (wd2fd or quekey or outval):
            raise ValueError(f'fd_coef={fd_coef!r} with wd2fd=False: the factors get weight decay, not '
                             'Frobenius decay; drop fd_coef or set wd2fd=True')
    out = []
    n_factors = n_forms = 0
    for g in groups:
        ps = g['params']
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        rest = {k: v for k, v in g.items() if k != 'params'}
        factors = [p for p in ps if factor_owner(p) is not None]
        forms = [p for p in ps if factor_owner(p) is None and _attention_weights(p, quekey, outval)]
        form_ids = {id(p) for p in forms}
        others = [p for p in ps if factor_owner(p) is None and id(p) not in form_ids]
        if others:
            out.append(dict(rest, params=others, fd_coef=0.0))
        if forms:  # Frobenius decay on the attention forms instead of weight decay on these weights
            out.append(dict(rest, params=forms, weight_decay=0.0, fd_coef=coef, fd_decoupled=fd_decoupled))
            n_forms += len(forms)
        n_factors += len(factors)
        if factors:
            if wd2fd:
                out.append(dict(rest, params=factors, weight_decay=0.0, fd_coef=coef, fd_decoupled=fd_decoupled))
            else:  # each group's own weight decay, as a stock optimizer given the same groups applies it
                out.append(dict(rest, params=factors, fd_coef=0.0))
    if (quekey or outval) and n_forms == 0:
        asked = ' and '.join(n for n, on in (('wd2fd_quekey', quekey), ('wd2fd_outval', outval)) if on)
        raise ValueError(f'{asked}: no registered timm attention among the parameters, so Frobenius decay on the '
                         'attention forms would do nothing; use a ViT-style model built by fnl '
                         "(timm.create_model('fnl', base=..., attention='heads'), which calls "
                         'fnl_timm.models.mark_attention) or drop the flag')
    if wd2fd and n_factors == 0:
        raise ValueError('Frobenius-decay optimizer with wd2fd=True: no registered factor among the parameters, so '
                         'Frobenius decay would do nothing. Factorize the model (an fnl_* model with rank_scale > 0) '
                         'or call fnl_timm.mark_factors(model) before creating the optimizer; for a dense model use '
                         'a stock optimizer (sgd, momentum, adamw) or wd2fd=False')
    if (wd2fd or quekey or outval) and coef == 0 and fd_coef is None:
        raise ValueError('Frobenius-decay optimizer: the FD coefficient (default: the weight decay) is 0, so Frobenius '
                         'decay would do nothing. Give weight_decay > 0 (or fd_coef > 0); for factors without any '
                         'regulariser (the paper\'s --no-frob) pass fd_coef=0.0 explicitly')
    return out, wd, coef


class _FrobeniusDecayMixin:
    """Applies the FD of every factorized layer owning a factor in a group with ``fd_coef > 0``
    right before the parent optimizer's update, through the core's FD engine (``fnl.fd_engine``)."""

    def _init_fd(self, params: Iterable, lr: float, weight_decay: float, fd_coef: Optional[float], wd2fd: bool,
                 fd_decoupled: bool, wd2fd_quekey: bool = False, wd2fd_outval: bool = False,
                 **optimizer_kwargs: Any) -> None:
        """Check the arguments, split the factors into their own groups and build the torch optimizer."""
        _check_common(lr, weight_decay)
        for name, value in (('fd_decoupled', fd_decoupled), ('wd2fd_quekey', wd2fd_quekey),
                            ('wd2fd_outval', wd2fd_outval)):
            if not isinstance(value, bool):
                raise TypeError(f'{name} must be True or False, got {value!r}')
        groups, _, _ = _split_factor_groups(params, weight_decay, fd_coef, bool(wd2fd), fd_decoupled,
                                            wd2fd_quekey, wd2fd_outval)
        super().__init__(groups, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)
        self.wd2fd = bool(wd2fd)
        self.wd2fd_quekey, self.wd2fd_outval = wd2fd_quekey, wd2fd_outval
        self._check_decoupled_lr()
        _check_maximize(self.param_groups)

    def _check_decoupled_lr(self) -> None:
        """Decoupled FD moves all the weights of one FD term (a layer's factors, an attention's ``qkv`` and
        ``proj``) by one learning rate: refuse them in FD groups whose learning rates differ."""
        from .models._timm_attention import attention_owner
        first: Dict[int, Any] = {}
        for g in self.param_groups:
            if not (g.get('fd_decoupled', False) and g['fd_coef']):
                continue
            for p in g['params']:
                owner = factor_owner(p)
                owner = attention_owner(p) if owner is None else owner
                lr = first.setdefault(id(owner), g['lr'])
                if float(lr) != float(g['lr']):
                    raise ValueError(f'decoupled Frobenius decay moves all the weights of one {type(owner).__name__} '
                                     f"by one learning rate, but they are in parameter groups with lr {lr} and "
                                     f"{g['lr']}: put them in groups with one lr, or pass fd_decoupled=False")

    def __getstate__(self) -> Dict[str, Any]:
        """torch's optimizer state plus the FD flags, so that a copy (``copy.deepcopy``, pickle) keeps them."""
        return dict(super().__getstate__(), wd2fd=self.wd2fd, wd2fd_quekey=self.wd2fd_quekey,
                    wd2fd_outval=self.wd2fd_outval)

    def _fd_terms(self) -> Tuple[FDEngine, List[Dict[str, Any]]]:
        """The FD engine over every factorized layer owning a factor, and each term's group; cached until
        the groups change (``add_param_group``, ``load_state_dict``), so a step does not walk every parameter."""
        key = tuple(id(g) for g in self.param_groups)
        cache = self.__dict__.get('_fd_cache')
        if cache is None or cache[0] != key:
            seen: Dict[int, List[Tuple[FDTerm, Dict[str, Any]]]] = {}
            quekey, outval = self.wd2fd_quekey, self.wd2fd_outval
            for g in self.param_groups:
                if not g.get('fd_coef', 0.0) and 'fd_decoupled' not in g:
                    continue  # neither a factor nor an attention-form group
                for p in g['params']:
                    layer = factor_owner(p)
                    if layer is not None and id(layer) not in seen:
                        seen[id(layer)] = [(layer_term(layer), g)]
                    elif layer is None and (quekey or outval):
                        from .models._timm_attention import attention_fd_terms, attention_owner
                        attn = attention_owner(p)
                        if attn is not None and id(attn) not in seen:
                            seen[id(attn)] = [(t, g) for t in attention_fd_terms(attn, quekey, outval)]
            terms = [t for ts in seen.values() for t in ts]
            cache = (key, FDEngine([t for t, _ in terms]), [g for _, g in terms])
            self._fd_cache = cache
        return cache[1], cache[2]

    @torch.no_grad()
    def add_frobenius_grads_(self) -> None:
        """Apply FD: add ``coef * dFD/dtheta`` to the ``.grad`` of every factor that has one (coupled), or
        move the factor by ``-lr * coef * dFD/dtheta`` (groups with ``fd_decoupled``).

        Under ``torch.amp.GradScaler`` with ``fused=True`` the scaler sets ``self.grad_scale`` (the
        gradients are still scaled, the kernel divides by it) and ``self.found_inf``; the coupled FD
        gradient is scaled to match, a decoupled step skipped on inf/NaN as the kernel skips its own.
        """
        engine, groups = self._fd_terms()
        if not len(engine):
            return
        coefs = [float(g.get('fd_coef', 0.0)) for g in groups]
        lrs = [g['lr'] if g.get('fd_decoupled', False) else None for g in groups]
        _check_maximize(groups)
        engine.apply_(coefs, lr=lrs, grad_scale=getattr(self, 'grad_scale', None),
                      found_inf=getattr(self, 'found_inf', None))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.add_frobenius_grads_()
        super().step()
        return loss


def _check_maximize(groups: Iterable[Dict[str, Any]]) -> None:
    """Refuse ``maximize=True`` in a group with coupled FD: the optimizer would negate the FD gradient
    with the task's, so the factors' product would grow instead of decay (decoupled FD moves the
    weights itself and still decays)."""
    for g in groups:
        if g.get('maximize', False) and g.get('fd_coef', 0.0) and not g.get('fd_decoupled', False):
            raise ValueError('maximize=True with coupled Frobenius decay: the optimizer would negate the FD gradient '
                             "and grow the factors' product instead of decaying it; pass fd_decoupled=True, or "
                             'minimize the negated objective')


def _check_common(lr: float, weight_decay: float) -> None:
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or lr < 0:
        raise ValueError(f'lr must be a float >= 0, got {lr!r}')
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f'weight_decay must be a float >= 0, got {weight_decay!r}')


class FDSGD(_FrobeniusDecayMixin, torch.optim.SGD):
    """``torch.optim.SGD`` with Frobenius decay on the factors (paper section 3, coupled).

    Args:
        params: parameters or parameter groups (as built by timm's optimizer factory).
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: ordinary (coupled) weight decay for the non-factor parameters.
        nesterov: Nesterov momentum.
        fd_coef: FD coefficient; None = the largest weight decay among the groups.
        wd2fd: True = factors get FD and no weight decay; False = weight decay and no FD.
        fd_decoupled: True = decoupled FD (``p -= lr * coef * dFD/dp``); False (default here) = coupled.
        wd2fd_quekey: FD on each timm attention's per-head query-key forms ``W_Q^hᵀ W_K^h`` (paper
            section 3.2), on slices of the fused ``qkv`` weight; ``qkv.weight`` then gets no plain
            weight decay.
        wd2fd_outval: FD on the per-head output-value forms ``W_O^h W_V^h``; ``qkv.weight`` and
            ``proj.weight`` then get no plain weight decay.
        **kwargs: passed on to ``torch.optim.SGD`` (dampening, foreach, ...).
    """

    def __init__(
            self,
            params: Iterable,
            lr: float = 0.1,
            momentum: float = 0.0,
            weight_decay: float = 0.0,
            nesterov: bool = False,
            *,
            fd_coef: Optional[float] = None,
            wd2fd: bool = True,
            fd_decoupled: bool = False,
            wd2fd_quekey: bool = False,
            wd2fd_outval: bool = False,
            **kwargs: Any,
    ):
        self._init_fd(params, lr, weight_decay, fd_coef, wd2fd, fd_decoupled, wd2fd_quekey, wd2fd_outval,
                      momentum=momentum, nesterov=nesterov, **kwargs)


class FDAdamW(_FrobeniusDecayMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` with Frobenius decay on the factors.

    The non-factor parameters keep AdamW's decoupled weight decay; FD is decoupled the same way
    (``p -= lr * coef * dFD/dp`` before the update) unless ``fd_decoupled=False`` adds the FD
    gradient to the gradient. Arguments as :class:`FDSGD`.
    """

    def __init__(
            self,
            params: Iterable,
            lr: float = 1e-3,
            betas: Tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8,
            weight_decay: float = 1e-2,
            *,
            fd_coef: Optional[float] = None,
            wd2fd: bool = True,
            fd_decoupled: bool = True,
            wd2fd_quekey: bool = False,
            wd2fd_outval: bool = False,
            **kwargs: Any,
    ):
        self._init_fd(params, lr, weight_decay, fd_coef, wd2fd, fd_decoupled, wd2fd_quekey, wd2fd_outval,
                      betas=betas, eps=eps, **kwargs)


class FDAdam(_FrobeniusDecayMixin, torch.optim.Adam):
    """``torch.optim.Adam`` (coupled L2 weight decay on the non-factors) with Frobenius decay on the
    factors, decoupled unless ``fd_decoupled=False``. Arguments as :class:`FDSGD`."""

    def __init__(
            self,
            params: Iterable,
            lr: float = 1e-3,
            betas: Tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8,
            weight_decay: float = 0.0,
            *,
            fd_coef: Optional[float] = None,
            wd2fd: bool = True,
            fd_decoupled: bool = True,
            wd2fd_quekey: bool = False,
            wd2fd_outval: bool = False,
            **kwargs: Any,
    ):
        self._init_fd(params, lr, weight_decay, fd_coef, wd2fd, fd_decoupled, wd2fd_quekey, wd2fd_outval,
                      betas=betas, eps=eps, **kwargs)


FD_OPTIMIZERS = ('fdsgd', 'fdmomentum', 'fdadam', 'fdadamw')


def register_fd_optimizers() -> None:
    """Register ``fdsgd`` (Nesterov, like timm's ``sgd``), ``fdmomentum`` (classical momentum,
    the paper's), ``fdadam`` and ``fdadamw`` in timm's default optimizer registry."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    infos = [
        OptimInfo(name='fdsgd', opt_class=FDSGD, has_eps=False, has_momentum=True,
                  description='SGD with Nesterov momentum, Frobenius decay on factorized layers',
                  defaults={'nesterov': True}),
        OptimInfo(name='fdmomentum', opt_class=FDSGD, has_eps=False, has_momentum=True,
                  description='SGD with classical momentum, Frobenius decay on factorized layers',
                  defaults={'nesterov': False}),
        OptimInfo(name='fdadam', opt_class=FDAdam, has_betas=True,
                  description='Adam, Frobenius decay on factorized layers'),
        OptimInfo(name='fdadamw', opt_class=FDAdamW, has_betas=True,
                  description='AdamW, Frobenius decay on factorized layers'),
    ]
    for info in infos:
        if info.name not in default_registry.list_optimizers():
            default_registry.register(info)
