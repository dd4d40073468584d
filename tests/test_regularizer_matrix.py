"""The regulariser matrix: every way this project applies Frobenius decay (FD) or weight decay, one step each.

Paper section 3: FD ``(coef/2) ||W||_F²`` on every factorized layer's product (factors U, S, V and the
tensor cores of the TT / Tucker convs) and on every per-head query-key / output-value form of the
fairseq Transformer, ordinary weight decay on every other parameter the optimizer decays.

Each cell takes one optimizer step and checks every parameter against the closed form. The task
gradient is known exactly: ``loss = 0 * output.sum() + sum_p <G_p, p>`` gives every parameter the
gradient ``G_p`` (entries +-1/32, exact in fp16 and bf16 after loss scaling), so a missed or doubled
unscale shows, and clipping (to a norm below ``||G||``) acts on it. The expected step is one step of the
stock optimizer of the same kind (plain for-loop implementation, no loss scaling) on clones whose
gradients are set by hand: the (clipped) task gradient plus, for the parameters FD regularises, the FD
gradient (autograd of the penalty on the dense products and d x d forms, in float64); the reference
optimizer's own weight decay acts on the decayed parameters. For the Adam family FD is decoupled by
default (``core``, ``timm``, ``fairseq`` cells of adam / adamw / fdadam / fdadamw / fd_adam): the reference
moves the FD parameters by ``-lr * dFD/dp`` at their pre-step values, where AdamW applies its decay, and
their gradient is the task gradient alone; the ``*-coupled`` cells ask for coupled FD. Which parameter gets FD, weight decay or
nothing is stated here from the documented rules, never read from the optimizer under test. One
factorized layer and one bias have their gradient dropped (``grad = None``: a layer unused this
step): they must not move.

A combination that cannot be supported must be refused when the optimizer is built; those cells assert
the refusal and its message.
"""
from __future__ import annotations

import copy
import itertools
import socket
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnl

LR_SGD, LR_ADAM = 0.5, 0.01
WD, COEF = 0.1, 0.3  # core: the FD coefficient is separate; timm and fairseq: FD coefficient = weight decay
MOMENTUM = 0.9
SCALE = 1000.0  # the loss scale: not a power of two, so a missed or doubled unscale cannot cancel
CLIP = 0.5  # below the task gradient's norm: clipping acts
ATOL = 1e-6
# Adam's first step is lr * g / (|g| + eps): with a large eps it stays proportional to g, so a wrongly scaled
# FD gradient shows (with eps = 1e-8 it would be lr * sign(g), blind to the scale)
ADAM_EPS = 1e-3

KINDS = {  # name -> (torch class, hyper-parameters); the reference step uses the same
    "sgd": (torch.optim.SGD, dict(lr=LR_SGD)),
    "momentum": (torch.optim.SGD, dict(lr=LR_SGD, momentum=MOMENTUM)),
    "nesterov": (torch.optim.SGD, dict(lr=LR_SGD, momentum=MOMENTUM, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=LR_ADAM, eps=ADAM_EPS)),
    "adamw": (torch.optim.AdamW, dict(lr=LR_ADAM, eps=ADAM_EPS)),
}
IMPLS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
TIMM_KIND = {"fdsgd": "nesterov", "fdmomentum": "momentum", "fdadam": "adam", "fdadamw": "adamw",
             "sgd": "nesterov", "momentum": "momentum", "adamw": "adamw"}
FAIRSEQ_MODES = ["fp32", "amp", "memory-efficient-fp16", "fp16-no-flatten-grads", "bf16", "fp16-flat"]
# FD for the Adam family is decoupled by default (p -= lr * coef * dFD/dp, where AdamW applies its decay);
# "coupled" cells ask for the FD gradient to be added to the gradient instead (the paper's, SGD's default)
ADAM_FAMILY = {"adam", "adamw", "fdadam", "fdadamw", "fd_adam"}

CELLS = (
    [("core", k, impl, scaler, clip) for k, impl, scaler, clip in itertools.product(
        ["sgd", "momentum", "adam", "adamw"], IMPLS, ["-", "scaler"], ["-", "clip"])]
    + [("core-coupled", k, impl, scaler, clip) for k, impl, scaler, clip in itertools.product(
        ["adam", "adamw"], IMPLS, ["-", "scaler"], ["-", "clip"])]
    + [("timm", k, impl, scaler, clip) for k, impl, scaler, clip in itertools.product(
        ["fdsgd", "fdmomentum", "fdadam", "fdadamw"], IMPLS, ["-", "scaler"], ["-", "clip"])]
    + [("timm-coupled", k, impl, scaler, clip) for k, impl, scaler, clip in itertools.product(
        ["fdadam", "fdadamw"], ["loop", "fused"], ["-", "scaler"], ["-", "clip"])]
    + [("timm-vit", k, impl, scaler, "-") for k, impl, scaler in itertools.product(
        ["fdmomentum", "fdadamw"], ["loop", "fused"], ["-", "scaler"])]
    + [("timm-stock", k, impl, scaler, "-") for k, impl, scaler in itertools.product(
        ["sgd", "momentum", "adamw"], ["loop", "fused"], ["-", "scaler"])]
    + [("fairseq", k, mode, "-", "clip") for k, mode in itertools.product(["fd_nag", "fd_adam", "fd_sgd"],
                                                                         FAIRSEQ_MODES)]
    + [("fairseq-coupled", "fd_adam", mode, "-", "clip") for mode in ["fp32", "amp", "fp16-no-flatten-grads"]]
    + [pytest.param(*c, marks=pytest.mark.slow) for c in [("ddp-core", "momentum", "loop", "-", "clip"),
                                                           ("ddp-fairseq", "fd_nag", "fp32", "-", "clip")]]
)


# --- the closed form -------------------------------------------------------------------------------
def _fd_grads(model: nn.Module, coef: float, names: set[str], attention: bool = False,
              timm_attention: bool = False) -> dict[str, torch.Tensor]:
    """``{name: d/dp (coef/2) sum ||W||_F²}`` for the parameters in ``names``, by autograd on the dense
    products (factorized layers, tensor cores) and d x d per-head forms, in float64."""
    twin = copy.deepcopy(model).double()
    params = dict(twin.named_parameters())
    total = sum(layer.matrix().pow(2).sum() for layer in fnl.factorized_layers(twin))
    if timm_attention:  # timm's fused qkv: the rows of W_Q, W_K, W_V one after the other; proj = W_O
        from fnl_timm.models import timm_attentions
        for _, a in timm_attentions(twin):
            h, dh = a.num_heads, a.head_dim
            q, k, v = a.qkv.weight.view(3, h, dh, -1).unbind(0)
            o = a.proj.weight.T.reshape(h, dh, -1)
            total = total + (q.transpose(1, 2) @ k).pow(2).sum() + (o.transpose(1, 2) @ v).pow(2).sum()
    if attention:
        from fnl_fairseq.modules import attention_layers
        for a in attention_layers(twin):
            h, dh = a.num_heads, a.head_dim
            q, k = a.q_proj.weight.view(h, dh, -1), a.k_proj.weight.view(h, dh, -1)
            o, v = a.out_proj.weight.T.reshape(h, dh, -1), a.v_proj.weight.view(h, dh, -1)
            total = total + (q.transpose(1, 2) @ k).pow(2).sum() + (o.transpose(1, 2) @ v).pow(2).sum()
    order = sorted(names)
    grads = torch.autograd.grad(0.5 * coef * total, [params[n] for n in order])
    return dict(zip(order, grads))


def _task_gradients(names: dict) -> dict[str, torch.Tensor]:
    """A fixed task gradient, entries +-1/32, the same on every process."""
    g = torch.Generator().manual_seed(7)
    return {n: (torch.randint(0, 2, tuple(p.shape), generator=g) * 2 - 1).float() / 32 for n, p in names.items()}


def _task_loss(out: torch.Tensor, names: dict, task: dict) -> torch.Tensor:
    """``0 * output.sum() + sum_p <G_p, p>``: every parameter's gradient is exactly ``G_p``."""
    return 0 * out.float().sum() + sum((p * task[n].to(p.dtype)).float().sum() for n, p in names.items())


def _reference(before: dict, task: dict, fd: dict, decayed: set, dropped: set, clip: bool, make_opt,
               decoupled_lr: Optional[float] = None) -> dict:
    """One step of the stock optimizer on clones of ``before``: the task gradient (clipped like
    ``clip_grad_norm_``) plus the FD gradient on the FD parameters, the optimizer's own weight decay on
    ``decayed``; ``dropped`` parameters have no gradient. ``decoupled_lr``: FD is decoupled instead, as
    AdamW applies its weight decay: the FD parameters first move by ``-lr * dFD/dp`` at their pre-step
    values (torch's AdamW multiplies by ``1 - lr * wd`` before its update, which does not read the
    parameters), and their gradient is the task gradient alone."""
    kept = [n for n in before if n not in dropped]
    coef = 1.0
    if clip:
        norm = torch.stack([task[n].double().norm() for n in kept]).norm()
        coef = min(1.0, CLIP / (float(norm) + 1e-6))
        assert coef < 0.9, "the task gradient must be long enough for clipping to act"
    clones = {n: t.detach().float().clone().requires_grad_(True) for n, t in before.items()}
    groups = {"fd": [], "wd": [], "none": []}
    for n in kept:
        c = clones[n]
        coupled_fd = fd[n] if n in fd and decoupled_lr is None else 0.0
        c.grad = (task[n].double() * coef + coupled_fd).float()
        if n in fd and decoupled_lr is not None:
            with torch.no_grad():
                c.copy_((c.double() - decoupled_lr * fd[n]).float())
        groups["fd" if n in fd else "wd" if n in decayed else "none"].append(c)
    # |task| + |FD| per entry: what the gradient's roundings scale with when it is held in fp16
    sizes = {n: (task[n].double().abs() * coef + (fd[n].abs() if n in fd and decoupled_lr is None else 0.0)).float()
             for n in kept}
    opt = make_opt([{"params": groups[k], "weight_decay": WD if k == "wd" else 0.0} for k in groups if groups[k]])
    opt.step()
    return {n: c.detach() for n, c in clones.items()}, sizes


def _check(after: dict, expected: dict, tol: Optional[dict] = None) -> None:
    """``|after - expected| <= ATOL`` (fp32), or ``<= tol[n]`` elementwise."""
    bad = []
    for n, e in expected.items():
        err = (after[n].float() - e).abs()
        if not bool((err <= (ATOL if tol is None else tol[n])).all()):
            bad.append(f"{n}: max |diff| {err.max():.3e}")
    assert not bad, "; ".join(bad[:6])


# --- core (fnl.FrobeniusDecay around a torch optimizer) and timm ------------------------------------
class _Tiny(nn.Module):
    """Every core layer kind: factorized conv, TT and Tucker convs, square linear, embedding; dense stem,
    BatchNorm and head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = fnl.FactorizedConv2d(4, 8, 3, padding=1, rank=3)
        self.tt = fnl.TTConv2d(8, 8, 3, padding=1, rank_scale=0.5)
        self.tucker = fnl.TuckerConv2d(8, 8, 1, rank_scale=0.5)
        self.fc = fnl.FactorizedLinear(8, 6, rank=2, square=True)
        self.emb = fnl.FactorizedEmbedding(5, 6, rank=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tucker(F.relu(self.tt(F.relu(self.conv(F.relu(self.bn(self.stem(x))))))))
        h = self.fc(h.mean((2, 3))) + self.emb(torch.arange(2)).sum(0)
        return self.head(h)


def _factor_names(model: nn.Module) -> set[str]:
    ids = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _torch_cell(front: str, name: str, impl: str, scaler: bool, clip: bool, ddp: bool = False) -> None:
    torch.manual_seed(0)
    core = front.startswith(("core", "ddp-core"))
    kind = name if core else TIMM_KIND[name]
    cls, hyper = KINDS[kind]
    decoupled = name in ADAM_FAMILY and not front.endswith("coupled")
    if core:
        model = _Tiny()
        factors = _factor_names(model)
        fd_names, coef = factors, COEF
        decayed = {n for n, _ in model.named_parameters()} - factors  # fnl.param_groups: every non-factor
        # the default: decoupled for torch's Adam / AdamW, coupled otherwise
        opt = fnl.FrobeniusDecay(cls(fnl.param_groups(model, WD), **hyper, **IMPLS[impl]), model, COEF,
                                 **({"decoupled": False} if front.endswith("coupled") else {}))
        x = torch.randn(2, 1, 6, 6)
        drop = [model.fc, model.head.bias]
    else:
        import timm
        import fnl_timm  # noqa: F401  (registers the models and the FD optimizers)
        from timm.optim import create_optimizer_v2
        vit = front == "timm-vit"
        if vit:  # factorized MLPs, heads shrunk; FD on the factors and on every head's QK and OV forms
            model = timm.create_model("fnl", base="vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2,
                                      rank_scale=0.5, attention="heads", num_classes=3)
        else:
            model = timm.create_model("fnl_test_resnet", rank_scale=0.3)
        factors = _factor_names(model)
        if vit:
            factors |= {n for n in dict(model.named_parameters()) if n.endswith((".attn.qkv.weight", ".attn.proj.weight"))}
        stock = front == "timm-stock"
        fd_names, coef = (set(), 0.0) if stock else (factors, WD)
        # timm's factory: no weight decay on 1-d parameters, biases and the model's no_weight_decay() names;
        # the factors keep it with a stock optimizer
        skip = set(model.no_weight_decay())
        decayed = {n for n, p in model.named_parameters()
                   if p.ndim > 1 and not n.endswith(".bias") and n not in skip} - fd_names
        impl_kwargs = dict(IMPLS[impl])
        if "eps" in hyper:
            impl_kwargs["eps"] = hyper["eps"]
        if front.endswith("coupled"):
            impl_kwargs["fd_decoupled"] = False
        if vit:
            impl_kwargs.update(wd2fd_quekey=True, wd2fd_outval=True)
        opt = create_optimizer_v2(model, name, lr=hyper["lr"], weight_decay=WD, momentum=MOMENTUM,
                                  foreach=impl_kwargs.pop("foreach", None), **impl_kwargs)
        x = torch.randn(2, 3, 16, 16)
        drop = [fnl.factorized_layers(model)[0], model.get_classifier().bias]
    names = dict(model.named_parameters())
    dropped = set() if ddp else {n for n, p in names.items()
                                 if any(p is q for m in drop for q in ([m] if isinstance(m, torch.Tensor) else m.parameters()))}
    before = {n: p.detach().clone() for n, p in names.items()}
    fd = _fd_grads(model, coef, fd_names - dropped, timm_attention=front == "timm-vit") if fd_names else {}
    task = _task_gradients(names)
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if scaler else None
    loss = _task_loss(net(x), names, task)
    (grad_scaler.scale(loss) if scaler else loss).backward()
    for n in dropped:
        names[n].grad = None
    if scaler:
        if clip:
            grad_scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        grad_scaler.step(opt)
        grad_scaler.update()
    else:
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    expected, _ = _reference(before, task, fd, decayed, dropped, clip, lambda groups: cls(groups, **hyper, foreach=False),
                             decoupled_lr=hyper["lr"] if decoupled and not front.endswith("stock") else None)
    _check({n: p.detach() for n, p in names.items()}, expected)
    assert all(torch.equal(names[n], before[n]) and names[n].grad is None for n in dropped)


# --- fairseq: fd_nag / fd_adam / fd_sgd under fairseq's precision wrappers ---------------------------
def _fairseq_model(name: str, coupled: bool = False):
    from types import SimpleNamespace

    import fnl_fairseq
    from fairseq import models, options
    from fairseq.data import Dictionary
    extra = ["--adam-eps", str(ADAM_EPS)] if name == "fd_adam" else ["--momentum", str(MOMENTUM)]
    argv = ["/nonexistent-data", "--user-dir", fnl_fairseq.user_dir(), "--arch", "fnl_transformer_small",
            "--optimizer", name, "--lr", str(LR_ADAM if name == "fd_adam" else LR_SGD), "--cpu",
            "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "24",
            "--decoder-ffn-embed-dim", "24", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--encoder-learned-pos",
            "--max-source-positions", "8", "--max-target-positions", "8", "--share-all-embeddings",
            "--rank-scale", "0.5", "--weight-decay", str(WD), "--fp16-init-scale", str(int(SCALE)),
            "--wd2fd", "--wd2fd-quekey", "--wd2fd-outval"] + extra + (["--fd-coupled"] if coupled else [])
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    d = Dictionary()
    for i in range(12):
        d.add_symbol(f"w{i}")
    torch.manual_seed(0)
    return models.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d)), args


def _fairseq_reference_optimizer(name: str):
    from fairseq.optim.adam import Adam
    from fairseq.optim.nag import NAG
    if name == "fd_nag":
        return lambda groups: NAG(groups, lr=LR_SGD, momentum=MOMENTUM)
    if name == "fd_adam":
        return lambda groups: Adam(groups, lr=LR_ADAM, eps=ADAM_EPS)
    return lambda groups: torch.optim.SGD(groups, lr=LR_SGD, momentum=MOMENTUM, foreach=False)


def _fairseq_cell(name: str, mode: str, ddp: bool = False, coupled: bool = False) -> None:
    from fairseq import optim
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fnl_fairseq.modules import attention_layers
    model, args = _fairseq_model(name, coupled)
    if mode in ("fp16-no-flatten-grads", "fp16-flat", "memory-efficient-fp16"):
        args.fp16 = True
        args.fp16_no_flatten_grads = mode == "fp16-no-flatten-grads"
        args.memory_efficient_fp16 = mode == "memory-efficient-fp16"
        model.half()
    elif mode == "bf16":
        args.bf16 = True  # fairseq never flattens bf16 copies
        model.bfloat16()
    elif mode == "amp":
        args.amp = True
    cfg = convert_namespace_to_omegaconf(args)
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "fp16-flat":
        # FP16Optimizer's one flat fp32 copy (fairseq builds it only on a GPU): refused, naming the flag
        flat = nn.Parameter(torch.cat([p.detach().float().reshape(-1) for p in params]))
        with pytest.raises(RuntimeError, match="add --fp16-no-flatten-grads"):
            optim.build_optimizer(cfg.optimizer, [flat])
        return
    if mode == "memory-efficient-fp16" and name == "fd_sgd":
        # fairseq's own refusal: its sgd cannot step fp16 parameters
        with pytest.raises(ValueError, match="Unsupported optimizer: FairseqFDSGD"):
            optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
        return
    if mode == "amp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler without CUDA: replaced right below
            opt = optim.AMPOptimizer.build_optimizer(cfg, params)
        opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)  # fairseq's own AMP code, on the CPU
    elif mode == "memory-efficient-fp16":
        opt = optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    elif mode in ("fp16-no-flatten-grads", "bf16"):
        opt = optim.FP16Optimizer.build_optimizer(cfg, params)
    else:
        opt = optim.build_optimizer(cfg.optimizer, params)
    names = dict(model.named_parameters())
    fd_ids = {id(p) for layer in fnl.factorized_layers(model) for p in layer.factor_parameters()}
    fd_ids |= {id(getattr(a, f).weight) for a in attention_layers(model)
               for f in ("q_proj", "k_proj", "v_proj", "out_proj")}
    fd_names = {n for n, p in names.items() if id(p) in fd_ids}
    master = mode in ("fp16-no-flatten-grads", "bf16")  # fairseq steps fp32 copies; a missing grad is zero there
    dropped = set() if ddp or master else {"encoder.layers.0.fc1.U", "encoder.layers.0.fc1.V",
                                           "encoder.layers.0.fc1.bias", "encoder.layers.0.self_attn.q_proj.weight"}
    before = {n: p.detach().float().clone() for n, p in names.items()}
    fd = _fd_grads(model, WD, fd_names - dropped, attention=True)
    task = _task_gradients(names)
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 16, (2, 5), generator=g)
    prev = torch.randint(4, 16, (2, 4), generator=g)
    opt.zero_grad()
    opt.backward(_task_loss(net(src, torch.full((2,), 5), prev)[0], names, task))
    for n in dropped:
        names[n].grad = None
    opt.multiply_grads(1.0)  # fairseq's trainer: all-reduce, multiply, clip, step
    opt.clip_grad_norm(CLIP)
    opt.step()
    decoupled_lr = LR_ADAM if name == "fd_adam" and not coupled else None
    expected, sizes = _reference(before, task, fd, set(names) - fd_names, dropped, True,
                                 _fairseq_reference_optimizer(name), decoupled_lr)
    if master:
        copies = dict(zip(names, opt.fp32_params))
        _check({n: c.detach() for n, c in copies.items()}, expected)
        assert all(torch.equal(p.detach(), copies[n].detach().to(p.dtype)) for n, p in names.items())
    elif mode == "memory-efficient-fp16":
        # the gradients and the parameters are fp16: the clipped task gradient, the FD gradient and their sum
        # are each rounded (2^-11 relative), and so is the new value; an SGD-like step is lr (1 + momentum) g,
        # Adam's moves by at most lr
        eps16 = 2.0 ** -10
        step = {n: LR_ADAM * torch.ones_like(z) if name == "fd_adam" else LR_SGD * (1 + MOMENTUM) * z
                for n, z in sizes.items()}
        tol = {n: ATOL + eps16 * (e.abs() + step.get(n, 0.0)) for n, e in expected.items()}
        _check({n: p.detach() for n, p in names.items()}, expected, tol)
    else:
        _check({n: p.detach() for n, p in names.items()}, expected)
    assert all(torch.equal(names[n].float(), before[n]) for n in dropped)


# --- two processes ------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, front: str, name: str, mode: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if front == "ddp-core":
            _torch_cell("core", name, mode, False, True, ddp=True)
        else:
            _fairseq_cell(name, mode, ddp=True)
    finally:
        dist.destroy_process_group()


def _cell_id(cell) -> str:
    values = cell.values if hasattr(cell, "values") else cell
    return "-".join(v for v in values if v != "-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("front,name,mode,scaler,clip", CELLS, ids=[_cell_id(c) for c in CELLS])
def test_one_step_is_the_closed_form(front, name, mode, scaler, clip):
    if front.startswith("timm"):
        pytest.importorskip("timm")
    if front.endswith("fairseq"):
        pytest.importorskip("fairseq")
    if front.startswith("ddp"):
        torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), front, name, mode), nprocs=2)
    elif front.startswith("fairseq"):
        _fairseq_cell(name, mode, coupled=front.endswith("coupled"))
    else:
        _torch_cell(front, name, mode, scaler == "scaler", clip == "clip")
