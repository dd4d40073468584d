"""In-process tests of the fairseq plugin: model structure, spectral QK/OV, FD optimizer steps, refusals."""
import argparse
import io
import os
from types import SimpleNamespace

import pytest
import torch

fairseq = pytest.importorskip("fairseq")

import fnl  # noqa: E402
import fnl_fairseq  # noqa: E402
from fairseq import optim, options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fnl_fairseq.modules import FactorizedLearnedPositionalEmbedding, TiedFactorizedOutput, attention_layers  # noqa: E402
from fnl_fairseq.optim import FDOptimizer  # noqa: E402

USER_DIR = fnl_fairseq.user_dir()
ALL_FD = ["--wd2fd", "--wd2fd-quekey", "--wd2fd-outval"]
ALL_SPECTRAL = ["--spectral", "--spectral-quekey", "--spectral-outval"]


def _dictionary(size: int = 40) -> Dictionary:
    d = Dictionary()
    for i in range(size):
        d.add_symbol(f"w{i}")
    return d


def _args(extra, arch="fnl_transformer_small", optimizer="fd_sgd"):
    parser = options.get_training_parser()
    argv = ["/nonexistent-data", "--user-dir", USER_DIR, "--arch", arch, "--optimizer", optimizer, "--lr", "0.1",
            "--cpu"] + list(extra)
    return options.parse_args_and_arch(parser, input_args=argv)


def _build(extra, seed=0, arch="fnl_transformer_small", optimizer="fd_sgd", vocab=40, small=True):
    dims = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
            "--decoder-ffn-embed-dim", "48", "--encoder-layers", "1", "--decoder-layers", "1"] if small else []
    args = _args(dims + list(extra), arch=arch, optimizer=optimizer)
    d = _dictionary(vocab)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    torch.manual_seed(seed)
    from fairseq import models
    return models.build_model(args, task), args


def _batch(vocab=40, bsz=3, src_len=7, tgt_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab + 4, (bsz, src_len), generator=g)
    prev = torch.randint(4, vocab + 4, (bsz, tgt_len), generator=g)
    prev[:, 0] = 2  # eos starts decoding
    return src, torch.full((bsz,), src_len), prev


def test_user_dir_path_and_main():
    assert os.path.isfile(os.path.join(USER_DIR, "__init__.py"))
    assert os.path.basename(USER_DIR) == "fnl_fairseq"


@pytest.mark.parametrize("rel", sorted(
    f for f in os.listdir(os.path.join(os.path.dirname(fnl_fairseq.__file__), "models"))
    if f.endswith(".py") and not f.startswith("_")))
def test_every_model_file_imports_on_its_own(rel):
    import subprocess
    import sys
    name = f"fnl_fairseq.models.{rel[:-3]}"
    out = subprocess.run([sys.executable, "-c", f"import {name}; print('ok')"], capture_output=True, text=True,
                         cwd=os.path.dirname(USER_DIR), timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_small_architecture_shapes_and_ranks():
    model, _ = _build(["--rank-scale", "0.5", "--share-all-embeddings"], small=False)
    enc_layer = model.encoder.layers[0]
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 2
    # FFN 256 -> 1024 factorized at rank round(0.5 * 256) = 128
    assert isinstance(enc_layer.fc1, fnl.FactorizedLinear) and enc_layer.fc1.rank == 128
    assert tuple(enc_layer.fc1.U.shape) == (1024, 128) and tuple(enc_layer.fc2.V.shape) == (1024, 128)
    # attention: d_h = int(0.5 * 256 / 4) = 32, projections 256 -> 4 * 32
    attn = enc_layer.self_attn
    assert attn.head_dim == 32 and attn.num_heads == 4
    assert tuple(attn.q_proj.weight.shape) == (128, 256) and tuple(attn.out_proj.weight.shape) == (256, 128)
    # joined vocabulary 40 + 4 specials, embedding rank round(0.5 * min(44, 256)) = 22, tied output
    emb = model.encoder.embed_tokens
    assert isinstance(emb, fnl.FactorizedEmbedding) and emb.rank == 22
    assert model.decoder.embed_tokens is emb
    assert isinstance(model.decoder.output_projection, TiedFactorizedOutput)


def _expected_small_params(vocab, d=256, ffn=1024, heads=4, layers=2, rank_scale=0.5):
    """Closed-form parameter count of fnl_transformer_small with --share-all-embeddings."""
    inner = heads * int(rank_scale * d / heads)
    r_e, r_f = max(1, round(rank_scale * min(vocab, d))), max(1, round(rank_scale * min(d, ffn)))
    attn = 3 * (d * inner + inner) + inner * d + d
    ffn_p = (ffn + d) * r_f + ffn + (d + ffn) * r_f + d
    ln = 2 * d
    enc = attn + ffn_p + 2 * ln
    dec = 2 * attn + ffn_p + 3 * ln
    return (vocab + d) * r_e + layers * (enc + dec)


def test_parameter_count_closed_form_and_dense_parity():
    model, _ = _build(["--rank-scale", "0.5", "--share-all-embeddings"], small=False)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_small_params(44), n
    # without --rank-scale the plugin's model is fairseq's transformer of the same shape, parameter for parameter
    shape = ["--encoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--encoder-attention-heads", "4",
             "--encoder-layers", "2", "--decoder-layers", "2", "--decoder-attention-heads", "4",
             "--share-all-embeddings"]
    dense, _ = _build(["--share-all-embeddings"], small=False)
    ref, _ = _build(shape, small=False, arch="transformer", optimizer="nag")
    dense_shapes = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert dense_shapes == ref_shapes
    assert n / sum(p.numel() for p in dense.parameters()) < 0.6


def test_incremental_decoding_matches_full_forward():
    model, _ = _build(["--rank-scale", "0.5", "--encoder-learned-pos", "--decoder-learned-pos"] + ALL_SPECTRAL)
    assert isinstance(model.decoder.embed_positions, FactorizedLearnedPositionalEmbedding)
    model.eval()
    src, lengths, prev = _batch()
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full, _ = model.decoder(prev, encoder_out=enc)
        state: dict = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0] for t in range(prev.size(1))]
    inc = torch.cat(steps, dim=1)
    assert torch.allclose(full, inc, atol=1e-5), f"{(full - inc).abs().max()}"


def test_tied_factorized_output_is_exact():
    model, _ = _build(["--rank-scale", "0.5", "--share-decoder-input-output-embed"])
    x = torch.randn(2, 3, 32)
    logits = model.decoder.output_layer(x)
    ref = x @ model.decoder.embed_tokens.dense_weight().T
    assert torch.allclose(logits, ref, atol=1e-5), f"{(logits - ref).abs().max()}"
    names = [n for n, _ in model.named_parameters() if "output_projection" in n]
    assert names == []


def test_spectral_quekey_outval_keeps_outputs_and_balances_heads():
    base, _ = _build(["--rank-scale", "0.5"], seed=3)
    bal, _ = _build(["--rank-scale", "0.5", "--spectral-quekey", "--spectral-outval"], seed=3)
    base.eval(), bal.eval()
    src, lengths, prev = _batch(seed=1)
    with torch.no_grad():
        out_a = base(src, lengths, prev)[0]
        out_b = bal(src, lengths, prev)[0]
    assert torch.allclose(out_a, out_b, atol=1e-4), f"{(out_a - out_b).abs().max()}"
    moved = 0.0
    for a, b in zip(attention_layers(base), attention_layers(bal)):
        h, dh = b.num_heads, b.head_dim
        moved = max(moved, (a.q_proj.weight - b.q_proj.weight).abs().max().item())
        q, k = b.q_proj.weight.view(h, dh, -1).double(), b.k_proj.weight.view(h, dh, -1).double()
        o, v = b.out_proj.weight.T.reshape(h, dh, -1).double(), b.v_proj.weight.view(h, dh, -1).double()
        for left, right in ((q, k), (o, v)):
            s_l, s_r = torch.linalg.svdvals(left), torch.linalg.svdvals(right)
            assert torch.allclose(s_l, s_r, rtol=1e-6, atol=1e-8), f"{(s_l - s_r).abs().max()}"
            # and their product's singular values are the squares
            s_prod = torch.linalg.svdvals(left.transpose(1, 2) @ right)[:, :dh]
            assert torch.allclose(s_l ** 2, s_prod, rtol=1e-6, atol=1e-8)
    assert moved > 1e-3  # the rebalancing did change the projections


def _fd_penalty(model):
    """(1/2) * sum of the squared Frobenius norms FD penalises, built densely (d x d forms) for autograd."""
    total = 0.0
    for layer in fnl.factorized_layers(model):
        total = total + layer.dense_weight().pow(2).sum()
    for a in attention_layers(model):
        h, dh = a.num_heads, a.head_dim
        q, k = a.q_proj.weight.view(h, dh, -1), a.k_proj.weight.view(h, dh, -1)
        o, v = a.out_proj.weight.T.reshape(h, dh, -1), a.v_proj.weight.view(h, dh, -1)
        total = total + (q.transpose(1, 2) @ k).pow(2).sum() + (o.transpose(1, 2) @ v).pow(2).sum()
    return 0.5 * total


def _optimizer(model, args):
    cfg = convert_namespace_to_omegaconf(args)
    params = [p for p in model.parameters() if p.requires_grad]
    return optim.build_optimizer(cfg.optimizer, params)


def test_plain_weight_decay_on_factors_without_wd2fd():
    lr, wd = 0.5, 0.1
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", str(wd), "--wd2fd-quekey"], optimizer="fd_sgd")
    args.lr = [lr]
    opt = _optimizer(model, args)
    assert len(opt.terms.layers) == 0 and len(opt.terms.quekey) == 3 and len(opt.terms.outval) == 0
    u = model.encoder.layers[0].fc1.U
    before = u.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(u.detach(), before * (1 - lr * wd), atol=1e-7)


@pytest.mark.parametrize("extra,optimizer,message", [
    (["--rank-scale", "0.5", "--wd2fd"], "nag", "--optimizer nag would silently ignore it"),
    (["--wd2fd-quekey"], "adam", "--optimizer adam would silently ignore it"),
    (["--wd2fd"], "fd_nag", "--wd2fd acts on factorized layers; it needs --rank-scale"),
    (["--spectral"], "nag", "--spectral acts on factorized layers; it needs --rank-scale"),
    (["--rank-scale", "0"], "nag",
     "--rank-scale must be a finite float > 0 (leave it unset for the dense model), got 0.0"),  # fnl/_validate.py
    (["--rank-scale", "0.5", "--adaptive-softmax-cutoff", "10"], "nag",
     "--adaptive-softmax-cutoff is not supported together with --rank-scale"),
    (["--rank-scale", "0.001"], "nag", "--rank-scale must be >= 0.125"),
])
def test_refused_flag_combinations(extra, optimizer, message):
    with pytest.raises(ValueError) as err:
        _build(extra, optimizer=optimizer)
    assert message in str(err.value)


def test_unmatched_tensors_are_refused():
    """(The flat --fp16 copy's refusal is a cell of tests/test_regularizer_matrix.py.)"""
    model, args = _build(["--rank-scale", "0.5", "--wd2fd"], optimizer="fd_nag")
    cfg = convert_namespace_to_omegaconf(args)
    with pytest.raises(RuntimeError, match="neither the parameters of the model"):
        optim.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(3))] * 2)


@pytest.mark.parametrize("extra,message", [
    (["--rank-scale", "0.5", "--weight-decay", "0", "--wd2fd"],
     "--optimizer fd_nag with --weight-decay 0: --weight-decay is the Frobenius-decay coefficient"),
    (["--rank-scale", "0.5", "--weight-decay", "0.1"],
     "--optimizer fd_nag: the model asks for no Frobenius decay (no --wd2fd, --wd2fd-quekey or --wd2fd-outval)"),
])
def test_regulariser_that_would_do_nothing_is_refused(extra, message):
    model, args = _build(extra, optimizer="fd_nag")
    with pytest.raises(ValueError) as err:
        _optimizer(model, args)
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["fp16", "bf16", "memory-efficient-fp16"])
def test_fp16_wrappers_keep_fd_state(mode):
    """fairseq's fp16 wrappers: the FD optimizer under them matches the fp32 copies (--fp16/--bf16) or the
    model's own parameters, and its state round-trips. (Their steps are cells of the regulariser matrix.)"""
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.1", "--momentum", "0.0"] + ALL_FD,
                         optimizer="fd_nag")
    if mode == "bf16":
        args.bf16 = True
        model.bfloat16()
    else:
        args.fp16, args.fp16_no_flatten_grads = True, True
        args.memory_efficient_fp16 = mode == "memory-efficient-fp16"
        model.half()
    cfg = convert_namespace_to_omegaconf(args)
    params = list(model.parameters())
    if mode == "memory-efficient-fp16":
        opt = optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
        fd = opt.wrapped_optimizer
        assert fd._fd_ids == {id(p) for p in fd.terms.parameters()}
    else:
        opt = optim.FP16Optimizer.build_optimizer(cfg, params)
        fd = opt.fp32_optimizer
        copies = dict(zip([id(p) for p in params], opt.fp32_params))
        assert {id(copies[id(p)]) for p in fd.terms.parameters()} == fd._fd_ids
    assert isinstance(fd, FDOptimizer) and fd.coef == 0.1 and len(fd._fd_ids) > 0
    opt.zero_grad()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = opt.state_dict()
    assert state["fnl_frobenius_decay"]["coef"] == 0.1
    fd._optimizer.coef = 0.5
    opt.load_state_dict(state)  # fairseq's memory-efficient hack reads state['state'] and state['param_groups']
    assert fd.coef == 0.1


def _amp_optimizer(extra=()):
    """fairseq's own AMPOptimizer with a CPU GradScaler swapped in (torch.cuda.amp.GradScaler needs CUDA)."""
    import warnings
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.1", "--momentum", "0.0", "--fp16-init-scale",
                          "128"] + ALL_FD + list(extra), optimizer="fd_sgd")
    args.amp, args.lr = True, [1.0]
    cfg = convert_namespace_to_omegaconf(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optim.AMPOptimizer.build_optimizer(cfg, [p for p in model.parameters()])
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    return model, opt


@pytest.mark.parametrize("clip", [True, False])
def test_amp_unscales_once(clip):
    """--amp: AMPOptimizer unscales through the torch optimizer in clip_grad_norm, then GradScaler.step
    gets the FD optimizer; the gradients must be unscaled exactly once (with or without clip_grad_norm).
    A task gradient of 1 on one weight (lr 1, FD and weight decay off it) moves it by exactly 1."""
    model, opt = _amp_optimizer()
    w = model.encoder.layers[0].final_layer_norm.weight  # plain weight decay, no FD
    before = w.detach().clone()
    opt.backward(w.sum())  # gradient 1 per entry, times the loss scale
    if clip:
        opt.clip_grad_norm(0.0)
    opt.step()
    # SGD: w - lr * (grad + wd * w), lr = 1
    expected = before - (1.0 + 0.1 * before)
    assert torch.allclose(w.detach(), expected, atol=1e-6), f"{(w.detach() - expected).abs().max()}"
    assert opt.scaler.get_scale() == 128.0


def test_amp_overflow_skips_the_step_and_lowers_the_scale():
    model, opt = _amp_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    opt.backward(model.encoder.layers[0].fc1.U.sum() * float("inf"))
    opt.clip_grad_norm(0.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.scaler.get_scale() == 64.0


def test_optimizer_state_round_trip_keeps_fd_state():
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.01", "--momentum", "0.9"] + ALL_FD,
                         optimizer="fd_nag")
    opt = _optimizer(model, args)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    assert state["fnl_frobenius_decay"] == {"coef": 0.01, "layers": 7, "quekey": 3, "outval": 3}  # 4 FFN, 2 embeddings, output
    args.weight_decay = 0.5  # a fresh optimizer with another coefficient takes the checkpoint's back
    opt2 = _optimizer(model, args)
    opt2.load_state_dict(state)
    assert opt2.coef == 0.01
    bufs = [opt2.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    ref = [opt.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, ref))
    wrong, wargs = _build(["--rank-scale", "0.5", "--wd2fd", "--weight-decay", "0.01"], optimizer="fd_nag")
    with pytest.raises(ValueError, match="--reset-optimizer"):
        _optimizer(wrong, wargs).load_state_dict(state)


def test_optimizer_overrides_keep_weight_decay_off_the_fd_group():
    """fairseq's --optimizer-overrides on resume (load_state_dict(state, {"weight_decay": ...})): the new
    value is the FD coefficient and every other group's weight decay; the FD group keeps none. One SGD step
    with zero task gradients then moves a factor by exactly the FD step and a plain weight by its decay."""
    lr, wd = 0.5, 0.2
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.01"] + ALL_FD, optimizer="fd_sgd")
    args.lr = [lr]
    opt = _optimizer(model, args)
    state = opt.state_dict()
    opt.load_state_dict(state, {"weight_decay": wd})
    assert opt.coef == wd
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, wd]
    fc1, norm = model.encoder.layers[0].fc1, model.encoder.layers[0].final_layer_norm.weight
    u, v, w = fc1.U.detach().clone(), fc1.V.detach().clone(), norm.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(fc1.U.detach(), u - lr * wd * u @ (v.T @ v), atol=1e-7)
    assert torch.allclose(norm.detach(), w * (1 - lr * wd), atol=1e-7)


@pytest.mark.parametrize("extra,decoupled", [([], True), (["--fd-coupled"], False)])
def test_fd_adam_decoupled_by_default(extra, decoupled):
    """fd_adam decouples FD like fairseq's adam decouples weight decay; --fd-coupled adds it to the
    gradient. (Both steps are cells of tests/test_regularizer_matrix.py.)"""
    model, args = _build(["--rank-scale", "0.5", "--weight-decay", "0.01", "--wd2fd"] + extra, optimizer="fd_adam")
    assert _optimizer(model, args)._optimizer.decoupled is decoupled
    assert args.fd_coupled is (not decoupled)
    from fnl_fairseq.optim import FDAdamConfig
    assert "instead of the default decoupled step" in FDAdamConfig.__dataclass_fields__["fd_coupled"].metadata["help"]


def test_safe_globals_allow_fairseq_config_namespace():
    fnl_fairseq.checkpoint.register_safe_globals()  # done at import; a torch safe_globals context may have undone it
    buf = io.BytesIO()
    torch.save({"cfg": {"model": argparse.Namespace(arch="fnl_transformer_small", rank_scale=0.5)}}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["cfg"]["model"].rank_scale == 0.5
    assert fnl_fairseq.checkpoint.SAFE_GLOBALS == [argparse.Namespace]


def test_launch_worker_argv():
    from fnl_fairseq.launch import worker_argv
    argv = worker_argv(["data", "--cpu"], rank=1, local_rank=1, world_size=2)
    assert argv[argv.index("--distributed-rank") + 1] == "1"
    assert argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert argv[argv.index("--ddp-backend") + 1] == "legacy_ddp"
    with pytest.raises(ValueError, match="--distributed-rank is set by fnl_fairseq.launch"):
        worker_argv(["data", "--distributed-rank", "0"], rank=0, local_rank=0, world_size=2)


@pytest.mark.parametrize("training", [False, True])
def test_fused_shrunk_attention_matches_fairseq_path(training):
    from fnl_fairseq.modules.attention import ShrunkMultiheadAttention
    model, _ = _build(["--rank-scale", "0.5", "--attention-dropout", "0.0"])
    attns = attention_layers(model)
    assert all(type(a) is ShrunkMultiheadAttention for a in attns)
    model.train(training)
    src, lengths, prev = _batch(seed=4)
    src[0, :2] = 1  # left padding in one sentence
    with torch.no_grad():
        torch.manual_seed(0)
        enc = model.encoder(src, src_lengths=lengths)
        x = torch.randn(prev.size(1), prev.size(0), 32)
        kpm = src.eq(1)
        causal = model.decoder.buffered_future_mask(x)
        for attn in attns:
            if attn.self_attention:
                args = dict(query=x, key=x, value=x, attn_mask=causal)
            else:
                args = dict(query=x, key=enc["encoder_out"][0], value=enc["encoder_out"][0], key_padding_mask=kpm,
                            static_kv=True)
            fused, _ = attn(need_weights=False, **args)
            ref, _ = MultiheadAttentionForward(attn, need_weights=True, **args)
            assert torch.allclose(fused, ref, atol=1e-5), f"{(fused - ref).abs().max()}"


def MultiheadAttentionForward(attn, **kwargs):
    """fairseq's own (explicit) attention path, for reference."""
    from fairseq.modules import MultiheadAttention
    return MultiheadAttention.forward(attn, **kwargs)


FNL_ARCHS = sorted(a for a, m in fairseq.models.ARCH_MODEL_REGISTRY.items() if m.__name__ == "FNLTransformerModel")


def test_registered_architectures():
    assert FNL_ARCHS == ["fnl_transformer", "fnl_transformer_iwslt_de_en", "fnl_transformer_small"]


@pytest.mark.parametrize("arch", FNL_ARCHS)
def test_every_architecture_factorizes_and_runs(arch):
    model, args = _build(["--rank-scale", "0.25", "--spectral", "--encoder-layers", "1", "--decoder-layers", "1"],
                         arch=arch, small=False)
    dense, _ = _build(["--encoder-layers", "1", "--decoder-layers", "1"], arch=arch, small=False)
    heads, d = args.encoder_attention_heads, args.encoder_embed_dim
    assert model.encoder.layers[0].self_attn.head_dim == int(0.25 * d / heads)
    assert model.encoder.layers[0].fc1.rank == round(0.25 * min(d, args.encoder_ffn_embed_dim))
    n, n_dense = (sum(p.numel() for p in m.parameters()) for m in (model, dense))
    assert n < 0.5 * n_dense, (n, n_dense)
    src, lengths, prev = _batch()
    out = model(src, lengths, prev)[0]
    assert out.shape == (3, 5, 44) and torch.isfinite(out).all()


def _recipe():
    import importlib.util
    path = os.path.join(os.path.dirname(USER_DIR), "recipes", "iwslt14", "iwslt14.py")
    spec = importlib.util.spec_from_file_location("iwslt14_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_trains_with_the_papers_command():
    rec = _recipe()
    a = argparse.Namespace(work_dir="/w", weight_decay=1e-4, seed=1, smoke=False, cpu=False, extra=["--fp16"])
    cmd = rec.train_command(a)
    flags = dict(zip(cmd, cmd[1:]))
    # docs/experiments.md#translation: rank_scale 0.5, NAG lr 0.25, clip-norm 0.1, dropout 0.2, label smoothing 0.1, warm-up 4000,
    # max-tokens 4000, 100k updates
    expected = {"--arch": "fnl_transformer_small", "--rank-scale": "0.5", "--optimizer": "fd_nag", "--lr": "0.25",
                "--clip-norm": "0.1", "--dropout": "0.2", "--label-smoothing": "0.1", "--warmup-updates": "4000",
                "--max-tokens": "4000", "--max-update": "100000", "--lr-scheduler": "inverse_sqrt",
                "--warmup-init-lr": "0.25"}
    assert {k: flags[k] for k in expected} == expected
    assert {"--spectral", "--spectral-quekey", "--spectral-outval", "--wd2fd", "--wd2fd-quekey",
            "--wd2fd-outval"} <= set(cmd)
    assert cmd[-1] == "--fp16"
    with pytest.raises(SystemExit):
        rec.main(["all", "--work-dir", "/tmp/x", "--smoke", "--raw", "/tmp/y"])


def _iwslt_archive(path, n_train=50):
    """A de-en.tgz in the layout of fairseq's IWSLT'14 download (de-en/ with the WIT3 files)."""
    import io
    import tarfile
    train = {"de": [], "en": []}
    for lang in ("de", "en"):
        lines = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks</keywords>", "<talkid>1</talkid>",
                 f"<title>title {lang}</title>", f"<description>about {lang}</description>"]
        lines += [f"{lang} sentence {i}" for i in range(n_train)]
        train[lang] = "\n".join(lines) + "\n"
    files = {f"de-en/train.tags.de-en.{lang}": train[lang] for lang in ("de", "en")}
    rec = _recipe()
    for k, name in enumerate(rec.IWSLT14_TEST_SETS):
        for lang in ("de", "en"):
            segs = "".join(f'<seg id="{i}"> {name} {lang} {i} it\u2019s </seg>\n' for i in range(k + 2))
            files[f"de-en/{name}.de-en.{lang}.xml"] = f'<mteval>\n<doc docid="1">\n{segs}</doc>\n</mteval>\n'
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_recipe_download_and_split(tmp_path):
    """The download path (through a file:// URL after a failing one) and the split of the archive."""
    rec = _recipe()
    archive = tmp_path / "de-en.tgz"
    _iwslt_archive(archive)
    out = tmp_path / "text"
    rec.download_iwslt14(str(out), urls=[(tmp_path / "missing.tgz").as_uri(), archive.as_uri()])
    read = {f: (out / f).read_text().splitlines() for f in os.listdir(out)}
    # train: metadata lines dropped, title and description text kept; every 23rd pair is valid
    pairs = [("title de", "title en"), ("about de", "about en")] + [(f"de sentence {i}", f"en sentence {i}")
                                                                   for i in range(50)]
    assert list(zip(read["valid.src"], read["valid.tgt"])) == [pairs[22], pairs[45]]
    assert list(zip(read["train.src"], read["train.tgt"])) == [p for i, p in enumerate(pairs) if i not in (22, 45)]
    # test: the <seg> text of the five dev/test sets, in order, with \u2019 as '
    assert len(read["test.src"]) == len(read["test.tgt"]) == sum(k + 2 for k in range(5))
    assert read["test.src"][0] == "IWSLT14.TED.dev2010 de 0 it's" and read["test.tgt"][-1] == \
        "IWSLT14.TED.tst2012 en 5 it's"
    # --archive reads the same file without a download; a broken archive is a clear error
    out2 = tmp_path / "text2"
    rec.download_iwslt14(str(out2), archive=str(archive))
    assert (out2 / "train.src").read_text() == (out / "train.src").read_text()
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(SystemExit, match="not a tar file"):
        rec.download_iwslt14(str(tmp_path / "t3"), archive=str(bad))
    with pytest.raises(SystemExit, match="could not download"):
        rec.download_iwslt14(str(tmp_path / "t4"), urls=[(tmp_path / "missing.tgz").as_uri()])


def test_checkpoint_loads_after_a_safe_globals_context_removed_the_registration(tmp_path):
    """timm's load_checkpoint loads inside ``torch.serialization.safe_globals([argparse.Namespace])``,
    whose exit removes argparse.Namespace from the registry; a fairseq checkpoint loaded afterwards in
    the same process must still load (weights only, no unpickling of other types)."""
    from fairseq import checkpoint_utils
    path = tmp_path / "checkpoint.pt"
    torch.save({"cfg": {"model": argparse.Namespace(arch="fnl_transformer_small", rank_scale=0.5)},
                "model": {"w": torch.ones(2)}, "optimizer_history": [
                    {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqFDNAG",
                     "lr_scheduler_state": {"best": 1.0}, "num_updates": 0}],
                "extra_state": {"epoch": 1}}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        pass
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # what timm's loader leaves
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert state["cfg"]["model"].rank_scale == 0.5
