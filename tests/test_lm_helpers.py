"""Shared pieces of the language-model tests (no tests here): a small local corpus and
a model/config small enough that a training step takes milliseconds on a CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from revdeq_kernels.lm import LMConfig

WORDS = ("the king and queen walk to the castle where a knight waits with his sword "
         "while the fool sings of love and war under the old moon").split()


def write_corpus(folder: Path, n_docs: int = 6, lines_per_doc: int = 120, seed: int = 0) -> Path:
    """``n_docs`` text files of simple, learnable English-like lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for d in range(n_docs):
        lines = []
        for _ in range(lines_per_doc):
            start = rng.randrange(len(WORDS) - 8)
            lines.append(f"{rng.choice(['KING', 'QUEEN', 'FOOL'])}: " + " ".join(WORDS[start:start + 8]) + ".\n")
        (folder / f"doc{d}.txt").write_text("".join(lines), encoding="utf-8")
    return folder


def small_config(tmp: Path, **overrides) -> LMConfig:
    """A 2-head, width-32 model on ``tmp/corpus``, caching under ``tmp`` (never the user's cache)."""
    corpus = tmp / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    values = dict(
        dataset="files", data_files=[str(corpus)], data_dir=str(tmp / "cache"), out_dir=str(tmp / "run"),
        tokenizer="bpe", vocab_size=320, seq_len=32, d_model=32, n_heads=2, n_layers=2, max_steps=3,
        beta=0.8, tol=0.0, batch_size=8, max_iters=30, lr=3e-3, min_lr=3e-4, warmup_iters=3,
        eval_interval=10, eval_batches=2, checkpoint_interval=10, log_interval=1, device="cpu",
        val_fraction=0.2, test_fraction=0.2, progress=False, tensorboard=False, seed=0,
    )
    values.update(overrides)
    return LMConfig(**values)


@pytest.fixture(autouse=True)
def single_thread():
    """Models this small run fastest on one thread, and a busy machine cannot stall a
    second one (an OpenMP barrier waiting on a descheduled thread costs 10-100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
