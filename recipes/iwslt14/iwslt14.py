"""IWSLT'14 De-En with the paper's factorized small Transformer (paper section 6, multi-head
attention; docs/experiments.md#translation).

Steps, each a subcommand over one work folder (``all`` runs the three):

- ``prepare``: the parallel text (download IWSLT'14 De-En when online, split as fairseq's
  ``prepare-iwslt14.sh`` does; or ``--archive de-en.tgz`` already on disk; or ``--raw DIR`` with
  ``train/valid/test.{src,tgt}``; or ``--smoke``'s generated corpus), a joint sentencepiece BPE,
  and ``fairseq-preprocess`` with a joined dictionary;
- ``train``: ``fairseq-train`` with the paper's command (``fnl_transformer_small``, rank_scale 0.5,
  spectral + Frobenius decay on linears, QK and OV; NAG lr 0.25, clip-norm 0.1, dropout 0.2,
  label smoothing 0.1, a constant 0.25 for 4000 warm-up updates then inverse-sqrt decay,
  max-tokens 4000, 100k updates), optionally over several processes (``--nproc``), printing
  fairseq's progress lines as they come (the full log goes to ``WORK/train.log``). The checkpoints
  record the BPE, and ``WORK/checkpoints`` also gets the dictionaries and the sentencepiece model,
  so that folder alone serves fairseq's hub (``FNLTransformerModel.from_pretrained``) and
  ``fairseq-interactive``;
- ``evaluate``: ``fairseq-generate`` with beam 5 and BPE removed; fairseq's BLEU and the
  detokenized sacrebleu score go to ``results.json``.

    python recipes/iwslt14/iwslt14.py all --work-dir runs/iwslt14            # the paper's run
    python recipes/iwslt14/iwslt14.py all --work-dir runs/smoke --smoke      # whole pipeline, ~2 min CPU
"""
import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Where fairseq's own IWSLT'14 preparation script fetches the TED talks (the WIT3 archive).
IWSLT14_URLS = ("https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz",
                "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz")
IWSLT14_TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
                     "IWSLT14.TED.tst2012")
SPLITS = ("train", "valid", "test")

# The paper's translation setting (docs/experiments.md#translation).
PAPER_MODEL = ["--arch", "fnl_transformer_small", "--share-decoder-input-output-embed",
               "--rank-scale", "0.5", "--spectral", "--spectral-quekey", "--spectral-outval",
               "--wd2fd", "--wd2fd-quekey", "--wd2fd-outval"]
PAPER_OPTIM = ["--optimizer", "fd_nag", "--lr", "0.25", "--clip-norm", "0.1", "--dropout", "0.2",
               "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
               "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--max-tokens", "4000",
               "--max-update", "100000",
               # the paper's code warms up from the peak rate: 0.25 for the first 4000 updates, then
               # inverse-sqrt decay (fairseq's default would ramp up linearly from 0)
               "--warmup-init-lr", "0.25"]
# --smoke: the same model flags on a narrow model with a short schedule, so the pipeline runs in minutes
# on CPU. The paper's NAG (clip-norm 0.1, 4000 warm-up steps) needs thousands of updates before it
# moves; the smoke run swaps in fd_adam, which exercises the same Frobenius-decay path.
SMOKE_OVERRIDES = ["--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "256",
                   "--decoder-ffn-embed-dim", "256", "--optimizer", "fd_adam", "--lr", "0.005",
                   "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0", "--warmup-updates", "100", "--warmup-init-lr", "0",
                   "--max-tokens", "2000", "--max-update", "300", "--dropout", "0.1",
                   # an epoch is 8 updates here: validate and save every 100 updates, not every epoch
                   "--validate-interval", "1000", "--save-interval", "1000", "--validate-interval-updates", "100",
                   "--save-interval-updates", "100", "--keep-interval-updates", "1"]


def _log(msg: str) -> None:
    print(f"[iwslt14] {msg}", flush=True)


# the lines of fairseq's log (--log-format simple) that show a run's progress: every --log-interval
# updates, the end of each epoch, each validation and checkpoint, and errors
PROGRESS = re.compile(r" \| (train_inner|train|valid) \| | \| ERROR \| |Saved checkpoint|done training")


def _run(cmd: Sequence[str], log_path: str, show: Optional["re.Pattern[str]"] = None) -> str:
    """Run a command with its output going to ``log_path`` as it runs; return that output.

    The log's path is printed first; the output lines that match ``show`` are also printed as they come.
    """
    cmd = [str(c) for c in cmd]
    _log(" ".join(cmd))
    _log(f"log: {log_path}")
    # unbuffered: fairseq's lines reach the log (and the terminal) as they are written
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    lines = []
    with open(log_path, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                    text=True, errors="replace") as proc:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
            if show is not None and show.search(line):
                print(line, end="", flush=True)
        rc = proc.wait()
    text = "".join(lines)
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{text[-3000:]}\n(full log: {log_path})")
    return text


# --- prepare ---------------------------------------------------------------------------------------
def _clean_train_line(line: str) -> Optional[str]:
    """Drop the talks' metadata lines, keep the text of titles and descriptions (as fairseq's script)."""
    if any(tag in line for tag in ("<url>", "<talkid>", "<keywords>", "<speaker>", "<reviewer", "<translator",
                                   "<doc ", "</doc>")):
        return None
    return re.sub(r"</?(title|description)>", "", line).strip()


def _xml_segments(text: str) -> List[str]:
    """The text of each ``<seg id="n">`` element (fairseq's script also turns ’ into ')."""
    return [m.strip().replace("\u2019", "'") for m in re.findall(r"<seg[^>]*>(.*?)</seg>", text)]


def download_iwslt14(text_dir: str, urls: Sequence[str] = IWSLT14_URLS, archive: Optional[str] = None) -> None:
    """Fetch IWSLT'14 De-En (the first of ``urls`` that answers; or read ``archive``, a ``de-en.tgz``
    already on disk) and split it into ``text_dir`` with :func:`split_iwslt14`."""
    data = None
    if archive is not None:
        if not os.path.isfile(archive):
            raise SystemExit(f"--archive {archive}: no such file")
        with open(archive, "rb") as f:
            data = f.read()
    for url in () if archive is not None else urls:
        try:
            _log(f"downloading {url}")
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
            break
        except (OSError, ValueError) as e:
            _log(f"  failed: {e}")
    if data is None:
        raise SystemExit("could not download IWSLT'14 De-En (offline?). Give the archive with --archive de-en.tgz "
                         "or the text with --raw DIR holding train/valid/test.{src,tgt}, or run with --smoke")
    split_iwslt14(data, text_dir)


def split_iwslt14(data: bytes, text_dir: str) -> None:
    """Split the IWSLT'14 De-En archive as fairseq's ``prepare-iwslt14.sh`` does.

    Train: ``train.tags.de-en.{de,en}`` without the talks' metadata lines, every 23rd pair held
    out as valid; test: the ``<seg>`` lines of the TED dev2010, TEDX dev2012 and TED tst2010-2012
    XML files, concatenated. Writes ``train/valid/test.{src,tgt}`` (src German, tgt English).
    """
    try:
        outer = tarfile.open(fileobj=io.BytesIO(data))
        members = {m.name: m for m in outer.getmembers()}
    except tarfile.TarError as e:
        raise SystemExit(f"the IWSLT'14 archive is not a tar file ({e})") from None
    inner_name = next((n for n in members if n.endswith("de-en.tgz") and n != "de-en.tgz"), None)
    tar = tarfile.open(fileobj=io.BytesIO(outer.extractfile(members[inner_name]).read())) if inner_name else outer
    files = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
    needed = ["train.tags.de-en.de", "train.tags.de-en.en"] + [f"{n}.de-en.{l}.xml" for n in IWSLT14_TEST_SETS
                                                               for l in ("de", "en")]
    missing = [n for n in needed if n not in files]
    if missing:
        raise SystemExit(f"the IWSLT'14 archive lacks {', '.join(missing)}")

    def read(name: str) -> str:
        return tar.extractfile(files[name]).read().decode("utf-8")

    pairs = []
    de = read("train.tags.de-en.de").splitlines()
    en = read("train.tags.de-en.en").splitlines()
    if len(de) != len(en):
        raise SystemExit(f"the IWSLT'14 archive's train.tags files differ in length ({len(de)} vs {len(en)} lines)")
    for s, t in zip(de, en):
        s, t = _clean_train_line(s), _clean_train_line(t)
        if s and t:
            pairs.append((s, t))
    valid = [p for i, p in enumerate(pairs) if (i + 1) % 23 == 0]  # awk 'NR % 23 == 0'
    train = [p for i, p in enumerate(pairs) if (i + 1) % 23 != 0]
    test = []
    for name in IWSLT14_TEST_SETS:
        src, tgt = (_xml_segments(read(f"{name}.de-en.{l}.xml")) for l in ("de", "en"))
        if len(src) != len(tgt):
            raise SystemExit(f"the IWSLT'14 archive's {name} has {len(src)} German and {len(tgt)} English segments")
        test += list(zip(src, tgt))
    _log(f"IWSLT'14 De-En: {len(train)} train, {len(valid)} valid, {len(test)} test pairs")
    _write_pairs(text_dir, {"train": train, "valid": valid, "test": test})


def _write_pairs(text_dir: str, splits: dict) -> None:
    os.makedirs(text_dir, exist_ok=True)
    for split, pairs in splits.items():
        with open(os.path.join(text_dir, f"{split}.src"), "w") as fs, \
                open(os.path.join(text_dir, f"{split}.tgt"), "w") as ft:
            for s, t in pairs:
                fs.write(s + "\n")
                ft.write(t + "\n")


def _read_pairs(raw_dir: str, split: str) -> list:
    paths = [os.path.join(raw_dir, f"{split}.{side}") for side in ("src", "tgt")]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"--raw {raw_dir}: missing {p} (need train/valid/test.{{src,tgt}})")
    with open(paths[0]) as fs, open(paths[1]) as ft:
        src, tgt = fs.read().splitlines(), ft.read().splitlines()
    if len(src) != len(tgt):
        raise SystemExit(f"--raw {raw_dir}: {split}.src has {len(src)} lines but {split}.tgt has {len(tgt)}")
    return list(zip(src, tgt))


def prepare(a: argparse.Namespace) -> None:
    w = a.work_dir
    text_dir, bpe_dir, bin_dir = (os.path.join(w, d) for d in ("text", "bpe", "bin"))
    if a.smoke:
        from fnl_fairseq.toy import make_toy_corpus
        make_toy_corpus(os.path.join(w, "raw"), n_train=2000, n_valid=100, n_test=200, vocab=40, min_len=3,
                        max_len=8, seed=a.seed)
        raw = os.path.join(w, "raw")
    elif a.raw:
        raw = a.raw
    else:
        download_iwslt14(os.path.join(w, "downloaded"), a.url or IWSLT14_URLS, a.archive)
        raw = os.path.join(w, "downloaded")
    splits = {}
    for split in SPLITS:
        pairs = _read_pairs(raw, split)
        if a.lowercase:
            pairs = [(s.lower(), t.lower()) for s, t in pairs]
        if split == "train":  # as fairseq's recipe: 1-175 words, length ratio <= 1.5
            pairs = [(s, t) for s, t in pairs if 0 < len(s.split()) <= 175 and 0 < len(t.split()) <= 175
                     and max(len(s.split()), len(t.split())) <= 1.5 * min(len(s.split()), len(t.split())) + 1]
        splits[split] = pairs
        _log(f"{split}: {len(pairs)} sentence pairs")
    _write_pairs(text_dir, splits)

    import sentencepiece as spm
    os.makedirs(bpe_dir, exist_ok=True)
    model_prefix = os.path.join(bpe_dir, "spm")
    joint = os.path.join(bpe_dir, "train.joint")
    with open(joint, "w") as f:
        for s, t in splits["train"]:
            f.write(s + "\n" + t + "\n")
    bpe_size = a.bpe_size if a.bpe_size else (200 if a.smoke else 10000)
    spm.SentencePieceTrainer.train(input=joint, model_prefix=model_prefix, vocab_size=bpe_size, model_type="bpe",
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=2,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    for split, pairs in splits.items():
        for side, idx in (("src", 0), ("tgt", 1)):
            with open(os.path.join(bpe_dir, f"{split}.{side}"), "w") as f:
                for pieces in sp.encode([p[idx] for p in pairs], out_type=str):
                    f.write(" ".join(pieces) + "\n")
    _run([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
          "--trainpref", os.path.join(bpe_dir, "train"), "--validpref", os.path.join(bpe_dir, "valid"),
          "--testpref", os.path.join(bpe_dir, "test"), "--destdir", bin_dir, "--joined-dictionary",
          "--workers", str(a.workers)], log_path=os.path.join(w, "preprocess.log"))
    _log(f"binarized data in {bin_dir}")


# --- train -----------------------------------------------------------------------------------------
# what fairseq's hub (from_pretrained) reads from a model folder besides the checkpoint: the
# dictionaries (its default data folder is the model's) and the sentencepiece model under this name
HUB_SPM = "sentencepiece.bpe.model"
HUB_FILES = ("dict.src.txt", "dict.tgt.txt", HUB_SPM)


def train_command(a: argparse.Namespace) -> List[str]:
    """The fairseq-train arguments of the paper's run (or the smoke run).

    The checkpoints record the language pair and the BPE (``--bpe sentencepiece`` with the model copied
    into the checkpoint folder by :func:`copy_hub_files`), so the hub's ``translate`` takes and returns
    plain text with only that folder.
    """
    import fnl_fairseq
    save_dir = os.path.join(a.work_dir, "checkpoints")
    args = [os.path.join(a.work_dir, "bin"), "--user-dir", fnl_fairseq.user_dir()] + PAPER_MODEL + PAPER_OPTIM + [
        "--weight-decay", str(a.weight_decay), "--save-dir", save_dir,
        "--source-lang", "src", "--target-lang", "tgt",
        "--bpe", "sentencepiece", "--sentencepiece-model", os.path.join(save_dir, HUB_SPM),
        "--seed", str(a.seed), "--log-format", "simple", "--log-interval", "50" if not a.smoke else "20",
        "--keep-last-epochs", "2"]
    if a.smoke:
        args += SMOKE_OVERRIDES + ["--no-epoch-checkpoints"]
    if a.cpu:
        args.append("--cpu")
    return args + list(a.extra)


def copy_hub_files(work_dir: str) -> str:
    """Copy the dictionaries and the sentencepiece model into ``WORK/checkpoints`` (returned), which
    makes that folder a model for fairseq's hub and ``fairseq-interactive`` on its own."""
    import shutil
    save_dir = os.path.join(work_dir, "checkpoints")
    os.makedirs(save_dir, exist_ok=True)
    sources = {"dict.src.txt": os.path.join(work_dir, "bin", "dict.src.txt"),
               "dict.tgt.txt": os.path.join(work_dir, "bin", "dict.tgt.txt"),
               HUB_SPM: os.path.join(work_dir, "bpe", "spm.model")}
    for name in HUB_FILES:
        if not os.path.isfile(sources[name]):
            raise SystemExit(f"{sources[name]} is missing: run the prepare step first")
        shutil.copyfile(sources[name], os.path.join(save_dir, name))
    return save_dir


def train(a: argparse.Namespace) -> None:
    args = train_command(a)
    save_dir = copy_hub_files(a.work_dir)
    log = os.path.join(a.work_dir, "train.log")
    if a.nproc > 1:
        _run([sys.executable, "-m", "fnl_fairseq.launch", "--nproc-per-node", str(a.nproc), "--"] + args, log,
             show=PROGRESS)
    else:
        _run([sys.executable, "-m", "fairseq_cli.train"] + args, log, show=PROGRESS)
    _log(f"trained; checkpoints, dictionaries and the BPE model in {save_dir} (log: {log}). Translate with\n"
         f"    FNLTransformerModel.from_pretrained({save_dir!r}, checkpoint_file='checkpoint_best.pt')"
         f".translate('...')\n"
         f"  (from fnl_fairseq import FNLTransformerModel), or fairseq-interactive {save_dir} --path "
         f"{os.path.join(save_dir, 'checkpoint_best.pt')} --user-dir $(python -m fnl_fairseq) --source-lang src "
         f"--target-lang tgt --bpe sentencepiece --sentencepiece-model {os.path.join(save_dir, HUB_SPM)}")


# --- evaluate --------------------------------------------------------------------------------------
def evaluate(a: argparse.Namespace) -> dict:
    import sacrebleu
    w = a.work_dir
    ckpt = os.path.join(w, "checkpoints", a.checkpoint)
    import fnl_fairseq
    cmd = [sys.executable, "-m", "fairseq_cli.generate", os.path.join(w, "bin"), "--user-dir", fnl_fairseq.user_dir(),
           "--path", ckpt, "--beam", "5", "--remove-bpe", "sentencepiece", "--batch-size", "128",
           "--gen-subset", "test"]
    if a.cpu:
        cmd.append("--cpu")
    out = _run(cmd, log_path=os.path.join(w, "generate.log"))
    m = re.search(r"BLEU4 = (\d+\.\d+)", out)
    if m is None:
        raise SystemExit(f"no BLEU line in fairseq-generate's output; see {os.path.join(w, 'generate.log')}")
    hyps = {}
    for line in out.splitlines():
        if line.startswith("D-"):
            idx, _, text = line.split("\t", 2)
            hyps[int(idx[2:])] = text
    with open(os.path.join(w, "text", "test.tgt")) as f:
        refs = f.read().splitlines()
    order = sorted(hyps)
    sys_out = [hyps[i] for i in order]
    ref_out = [refs[i] for i in order]
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(sys_out, [ref_out])
    params = None
    train_log = os.path.join(w, "train.log")
    if os.path.isfile(train_log):
        with open(train_log) as f:
            pm = re.search(r"num\. shared model params: ([\d,]+)", f.read())
        params = int(pm.group(1).replace(",", "")) if pm else None
    results = {"checkpoint": ckpt, "fairseq_bleu4": float(m.group(1)), "fairseq_bleu_line": m.group(0),
               "sacrebleu": round(bleu.score, 2), "sacrebleu_detail": str(bleu),
               "sacrebleu_signature": str(metric.get_signature()),
               "test_sentences": len(sys_out), "num_params": params, "smoke": bool(a.smoke)}
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _log(f"results: fairseq BLEU4 {results['fairseq_bleu4']}, sacrebleu {results['sacrebleu']} "
         f"-> {os.path.join(w, 'results.json')}")
    return results


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (arguments after ``--`` are not parsed here: they go to fairseq-train)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s {prepare,train,evaluate,all} --work-dir DIR [options] "
                                      "[-- fairseq-train options]")
    p.add_argument("step", choices=("prepare", "train", "evaluate", "all"),
                   help="what to run: prepare (text, BPE, binarized data), train, evaluate, or all three")
    p.add_argument("--work-dir", required=True, help="folder for the data, checkpoints, logs and results.json")
    p.add_argument("--smoke", action="store_true", help="generated small corpus, narrow model, short schedule")
    p.add_argument("--raw", default=None, help="folder with train/valid/test.{src,tgt} (instead of downloading)")
    p.add_argument("--archive", default=None, help="IWSLT'14 de-en.tgz already on disk (instead of downloading)")
    p.add_argument("--url", action="append", default=None,
                   help=f"where to download de-en.tgz (repeat for fall-backs; default {' then '.join(IWSLT14_URLS)})")
    p.add_argument("--no-lowercase", dest="lowercase", action="store_false",
                   help="keep case (the usual IWSLT'14 recipe lowercases)")
    p.add_argument("--bpe-size", type=int, default=0, help="sentencepiece vocabulary (default 10000; smoke 200)")
    p.add_argument("--workers", type=int, default=2, help="fairseq-preprocess workers")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay = Frobenius decay coefficient")
    p.add_argument("--seed", type=int, default=1, help="fairseq-train's --seed (default 1)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (fnl_fairseq.launch)")
    p.add_argument("--cpu", action="store_true", help="train and generate on CPU")
    p.add_argument("--checkpoint", default="checkpoint_best.pt",
                   help="checkpoint file to evaluate, in WORK/checkpoints (default checkpoint_best.pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after '--': more fairseq-train arguments
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.extra = extra
    if a.nproc < 1:
        p.error(f"--nproc must be >= 1, got {a.nproc}")
    if a.bpe_size < 0:
        p.error(f"--bpe-size must be >= 0, got {a.bpe_size}")
    if a.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {a.weight_decay}")
    sources = [flag for flag, v in (("--smoke", a.smoke), ("--raw", a.raw), ("--archive", a.archive),
                                    ("--url", a.url)) if v]
    if len(sources) > 1:
        p.error(f"give one source of the text, not {' and '.join(sources)}")
    if a.smoke and not a.cpu:
        import torch
        a.cpu = not torch.cuda.is_available()
    os.makedirs(a.work_dir, exist_ok=True)
    if a.step in ("prepare", "all"):
        prepare(a)
    if a.step in ("train", "all"):
        train(a)
    if a.step in ("evaluate", "all"):
        evaluate(a)


if __name__ == "__main__":
    main()
