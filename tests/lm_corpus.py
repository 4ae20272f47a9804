"""A small WikiText-style corpus for language-model tests, and the run config that trains on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_corpus(folder: Path, seed: int = 0) -> str:
    """WikiText-style files whose sentences follow a small grammar (learnable in a few rounds)."""
    rng = np.random.default_rng(seed)
    subjects, verbs, objects = ["the cat", "a dog", "the bird", "my friend"], ["sees", "likes", "finds"], ["the ball", "a tree", "the house"]

    def article(i: int) -> str:
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(12)]
        return f" = Article {i} = \n \n " + " ".join(sentences) + " \n \n"

    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 24), ("valid", 4), ("test", 6)):
        (folder / f"{split}.txt").write_text("".join(article(i) for i in range(count)))
    return str(folder)


def lm_config(corpus_dir: str, **overrides) -> dict:
    return {"server-data-fraction": 0.1, "distill-steps": 5, "distill-batch-size": 64,  # full-batch distillation
        "dataset": "wikitext-2", "model": "transformer", "partitioner": "contiguous", "data-dir": corpus_dir,
        "seq-len": 16, "batch-size": 8, "optimizer": "adam", "learning-rate": 0.003, "weight-decay": 0.0,
        "split-ratio": 0.25, "output-scaling": "scaler", **overrides,  # as the LM presets
    }  # fmt: skip
