"""Training words/s and generation sentences/s: factorized vs dense ``fnl_transformer_small``.

Both models are built through the plugin (fairseq's model registry), side by side in one run:

- dense: ``fnl_transformer_small`` without ``--rank-scale`` (fairseq's Transformer of that shape),
  trained with fairseq's ``nag``;
- factorized: ``--rank-scale 0.5`` with spectral init, QK/OV rebalancing and Frobenius decay on
  factors, QK and OV forms, trained with ``fd_nag`` (the paper's setting, docs/experiments.md#translation).

Training: label-smoothed cross-entropy, backward, fairseq's clip-norm 0.1, optimizer step, on
random batches of ``--max-tokens`` target tokens (``--tgt-len`` tokens per sentence); words/s
counts target tokens, like fairseq's ``wps``. Generation: fairseq's ``SequenceGenerator`` with
beam 5, every hypothesis forced to ``--gen-len`` tokens so both models decode the same number of
steps. Prints a table and the factorized/dense ratios, per second of wall time and, as on a
shared CPU load from other processes distorts wall time, per second of this process's CPU time.

    python bench/bench_fairseq.py                  # CPU, small defaults
    python bench/bench_fairseq.py --device cuda --steps 50 --gen-batches 10
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fnl  # noqa: E402
import fnl_fairseq  # noqa: E402
from fairseq import models, optim, options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

FACTORIZED = ["--rank-scale", "0.5", "--spectral", "--spectral-quekey", "--spectral-outval",
              "--wd2fd", "--wd2fd-quekey", "--wd2fd-outval"]


def _build(extra, optimizer, vocab, device, seed=0, amp=False):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        "/nonexistent-data", "--user-dir", fnl_fairseq.user_dir(), "--arch", "fnl_transformer_small",
        "--share-all-embeddings", "--optimizer", optimizer, "--lr", "0.25", "--weight-decay", "0.0001",
        "--dropout", "0.2"] + (["--amp"] if amp else []) + extra)
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    torch.manual_seed(seed)
    model = models.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d)).to(device)
    cfg = convert_namespace_to_omegaconf(args)
    params = [p for p in model.parameters() if p.requires_grad]
    # --amp: fairseq's AMPOptimizer (float16 autocast, a GradScaler, unscaling in clip_grad_norm), as fairseq-train
    opt = optim.AMPOptimizer.build_optimizer(cfg, params) if amp else optim.build_optimizer(cfg.optimizer, params)
    return model, opt, d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(vocab, bsz, src_len, tgt_len, device, g):
    src = torch.randint(4, vocab, (bsz, src_len), generator=g).to(device)
    tgt = torch.randint(4, vocab, (bsz, tgt_len), generator=g).to(device)
    prev = torch.cat([torch.full((bsz, 1), 2, device=device), tgt[:, :-1]], dim=1)
    return src, torch.full((bsz,), src_len, device=device), prev, tgt


def bench_train(model, opt, vocab, a, device):
    g = torch.Generator().manual_seed(1)
    bsz = max(1, a.max_tokens // a.tgt_len)
    batches = [_batch(vocab, bsz, a.src_len, a.tgt_len, device, g) for _ in range(4)]
    model.train()

    def step(i):
        src, lengths, prev, tgt = batches[i % len(batches)]
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16 if a.amp else torch.bfloat16,
                            enabled=a.bf16_autocast or a.amp):
            logits = model(src, lengths, prev)[0]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1), label_smoothing=0.1,
                               reduction="sum")
        opt.backward(loss)
        opt.multiply_grads(1.0 / tgt.numel())
        opt.clip_grad_norm(0.1)
        opt.step()

    for i in range(a.warmup):
        step(i)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.steps):
        step(i)
    _sync(device)
    words = a.steps * bsz * a.tgt_len
    return words / (time.perf_counter() - t0), words / (time.process_time() - c0)


def fd_ms_per_step(opt, device, calls: int = 20):
    """Milliseconds of one Frobenius-decay gradient pass (every factor and QK/OV form) of ``opt``."""
    inner = getattr(getattr(opt, "fp32_optimizer", opt), "_optimizer", None)  # under --amp: inside AMPOptimizer
    if not isinstance(inner, fnl.FrobeniusDecay):
        return None
    inner.apply_frobenius_decay()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        inner.apply_frobenius_decay()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / calls


@torch.no_grad()
def bench_generate(model, d, vocab, a, device):
    model.eval()
    gen = SequenceGenerator([model], d, beam_size=5, max_len_a=0, max_len_b=a.gen_len, min_len=a.gen_len)
    g = torch.Generator().manual_seed(2)
    samples = []
    for _ in range(a.gen_batches + 1):
        src, lengths, _, _ = _batch(vocab, a.gen_batch_size, a.src_len, a.tgt_len, device, g)
        samples.append({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    gen.generate([model], samples[0])  # warm-up
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in samples[1:]:
        gen.generate([model], s)
    _sync(device)
    n = a.gen_batches * a.gen_batch_size
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--vocab", type=int, default=10000, help="joined vocabulary size (IWSLT'14 BPE: ~10k)")
    p.add_argument("--max-tokens", type=int, default=1000, help="target tokens per training batch")
    p.add_argument("--src-len", type=int, default=25, help="source tokens per sentence (default 25)")
    p.add_argument("--tgt-len", type=int, default=25, help="target tokens per sentence (default 25)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--gen-batches", type=int, default=2, help="timed generation batches")
    p.add_argument("--gen-batch-size", type=int, default=16, help="sentences per generation batch (default 16)")
    p.add_argument("--gen-len", type=int, default=20, help="tokens generated per sentence (forced)")
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements per model; best kept")
    p.add_argument("--bf16-autocast", action="store_true", help="train under torch.autocast(bfloat16)")
    p.add_argument("--amp", action="store_true",
                   help="fairseq's --amp: train under torch.autocast(float16) with fairseq's AMPOptimizer (loss scaling)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    for name in ("repeats", "vocab", "max_tokens", "src_len", "tgt_len", "steps", "gen_batches", "gen_batch_size",
                 "gen_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.amp and a.bf16_autocast:
        p.error("--amp (float16) and --bf16-autocast exclude each other; give one")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    built = {name: _build(extra, optimizer, a.vocab, device, amp=a.amp)
             for name, extra, optimizer in (("dense", [], "nag"), ("factorized", FACTORIZED, "fd_nag"))}
    keys = ("train_words_per_s", "train_words_per_cpu_s", "gen_sentences_per_s", "gen_sentences_per_cpu_s")
    rows = {name: dict({"params": sum(q.numel() for q in m.parameters())}, **{k: 0.0 for k in keys})
            for name, (m, _, _) in built.items()}
    # alternate the two models and keep each one's best, so that load from other processes hits both alike;
    # on CPU the per-CPU-second rates (process time) are the ones that load does not distort
    for _ in range(a.repeats):
        for name, (model, opt, d) in built.items():
            r = rows[name]
            got = bench_train(model, opt, len(d), a, device) + bench_generate(model, d, len(d), a, device)
            for k, v in zip(keys, got):
                r[k] = max(r[k], v)
    print(f"device {device} ({torch.get_num_threads()} threads), vocab {a.vocab}, {a.max_tokens} tokens/batch, "
          f"beam 5, {a.gen_len} tokens/sentence, training precision "
          f"{'amp (float16 autocast)' if a.amp else 'bfloat16 autocast' if a.bf16_autocast else 'float32'}")
    cols = [("params", "params", ",.0f")] + [(k, k.replace("_per_", "/").replace("_", " "), ".1f") for k in keys]
    print(f"{'model':<12}" + "".join(f"{title:>24}" for _, title, _ in cols))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{r[k]:>24{fmt}}" for k, _, fmt in cols))
    f, dn = rows["factorized"], rows["dense"]
    ratios = {k: f[k] / dn[k] for k, _, _ in cols}
    print(f"{'ratio f/d':<12}" + "".join(f"{ratios[k]:>24.3f}" for k, _, _ in cols))
    # the share of a factorized training step spent adding the FD gradients (kernel launches on a GPU)
    fd = fd_ms_per_step(built["factorized"][1], device)
    step_ms = 1000 * (a.max_tokens // a.tgt_len) * a.tgt_len / f["train_words_per_s"]
    f["fd_ms_per_step"], f["step_ms"] = fd, step_ms
    print(f"factorized training step {step_ms:.1f} ms, of which the Frobenius-decay gradients {fd:.2f} ms "
          f"({100 * fd / step_ms:.1f}%)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": str(device), "args": vars(a), "rows": rows, "ratios": ratios}, fh, indent=2)
    return rows, ratios


if __name__ == "__main__":
    main()
