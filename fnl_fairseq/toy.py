"""A small synthetic parallel corpus, for smoke runs and tests of the translation pipeline.

The "source language" is random sentences over a small vocabulary; the "target" translates each
word through a fixed dictionary and swaps every adjacent pair of words, so that a model has to
learn both a lexicon and some reordering. Deterministic for a given seed.
"""
from __future__ import annotations

import os
import random
from typing import Dict

__all__ = ["make_toy_corpus", "toy_translate"]

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "do", "fu"]


def _lexicon(size: int, rng: random.Random) -> Dict[str, str]:
    words: set = set()
    while len(words) < 2 * size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    words_l = sorted(words)
    rng.shuffle(words_l)
    return dict(zip(words_l[:size], words_l[size:]))


def toy_translate(sentence: list[str], lexicon: Dict[str, str]) -> list[str]:
    """Translate word by word, then swap each adjacent pair."""
    out = [lexicon[w] for w in sentence]
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def make_toy_corpus(out_dir: str, n_train: int = 2000, n_valid: int = 100, n_test: int = 100,
                    vocab: int = 60, min_len: int = 3, max_len: int = 10, seed: int = 1) -> Dict[str, int]:
    """Write ``{train,valid,test}.{src,tgt}`` under ``out_dir``; returns the sentence counts.

    Args:
        out_dir: output folder (created).
        n_train: training sentence pairs.
        n_valid: validation pairs.
        n_test: test pairs.
        vocab: source vocabulary size (the target has as many words).
        min_len: shortest sentence, in words.
        max_len: longest sentence, in words.
        seed: random seed.
    """
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test), ("vocab", vocab),
                        ("min_len", min_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(max_len, int) or max_len < min_len:
        raise ValueError(f"max_len must be an int >= min_len={min_len}, got {max_len!r}")
    rng = random.Random(seed)
    lexicon = _lexicon(vocab, rng)
    source_words = sorted(lexicon)
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(os.path.join(out_dir, f"{split}.src"), "w") as fs, \
                open(os.path.join(out_dir, f"{split}.tgt"), "w") as ft:
            for _ in range(n):
                sent = [rng.choice(source_words) for _ in range(rng.randint(min_len, max_len))]
                fs.write(" ".join(sent) + "\n")
                ft.write(" ".join(toy_translate(sent, lexicon)) + "\n")
        counts[split] = n
    return counts
