"""Checkpoints: everything a run needs to continue exactly where it stopped, kept safe from damage.

A checkpoint holds the config, the model, the optimizer and scheduler states, every
rank's RNG states, the step, the data position and the tokenizer (so evaluation and
generation need nothing else).

On disk it is a ``torch.save`` file of a small envelope: the format number, the library
version, and the payload (itself a ``torch.save`` of the dict above) as a uint8 tensor
with its SHA-256. Loading checks each layer and says in one line what is wrong: missing,
truncated, not a checkpoint, checksum mismatch, or an incompatible format.

Writing is atomic (a temporary file in the same folder, flushed to disk, then
``os.replace``d over the target), and :func:`save_rotating` keeps the previous good
checkpoint as ``prev.pt`` beside ``last.pt``: a damaged ``last.pt`` (a full disk, a bad
copy) still leaves one to resume from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from pathlib import Path

import torch

from .. import __version__
from .config import LMConfig, config_from_dict, upgrade_legacy
from .io import atomic_path
from .model import TransformerLM
from .tokenizer import Tokenizer

FORMAT = 2
LIBRARY = "revdeq_kernels"
LAST, PREVIOUS = "last.pt", "prev.pt"
# Keys an evaluation or generation may change on a trained model: inference-time solver
# settings and where/how it runs.
INFERENCE_KEYS = ("max_steps", "tol", "beta", "inference_solver", "state_dtype", "backend", "device", "amp",
                  "batch_size", "data_dir", "threads", "eval_batches")


# The file this process last wrote at each last.pt, by (device, inode, size, mtime): a file
# that still matches was written whole by us (atomically, then fsynced), so rotating it to
# prev.pt needs no second read and hash. Any other writer changes the inode or mtime.
_WRITTEN: dict[str, tuple[int, int, int, int]] = {}


def _signature(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _known_intact(path: Path) -> bool:
    try:
        return _WRITTEN.get(str(path.resolve())) == _signature(path)
    except FileNotFoundError:
        return False


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _envelope(payload: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    # A uint8 tensor, not bytes: torch.save stores tensors as raw zip records, while pickle
    # protocol 2 would store bytes as a latin-1 string, half again as large and slow to read.
    return {"format": FORMAT, "library": LIBRARY, "version": __version__,
            "sha256": hashlib.sha256(data).hexdigest(), "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def save_checkpoint(path: Path | str, payload: dict) -> None:
    envelope = _envelope(payload)
    with atomic_path(path) as tmp:
        torch.save(envelope, tmp)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _open_envelope(path: Path) -> dict:
    """The checked envelope of ``path``; raises :class:`CheckpointError` saying what is wrong."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (e.g. {path / LAST})")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04":  # every torch.save file is a zip archive
        raise CheckpointError(f"{path}: not a checkpoint (not a torch.save file)")
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses arbitrary objects
        raise CheckpointError(f"{path}: not a revdeq_kernels checkpoint (refused to unpickle: "
                              f"{_first_line(error)})") from None
    except Exception as error:  # the zip reader's errors for a cut or overwritten file vary
        raise CheckpointError(f"{path}: truncated or damaged ({_first_line(error)})") from None
    if not isinstance(envelope, dict) or envelope.get("library") != LIBRARY:
        old = isinstance(envelope, dict) and envelope.get("format") == 1 and "model" in envelope
        raise CheckpointError(f"{path}: written by an incompatible version (format 1; this version reads format "
                              f"{FORMAT})" if old else f"{path}: not a revdeq_kernels checkpoint")
    if envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by an incompatible version (format {envelope.get('format')!r}, "
                              f"revdeq_kernels {envelope.get('version')}; this version reads format {FORMAT})")
    data = envelope.get("payload")
    if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1) or (
            hashlib.sha256(data.numpy()).hexdigest() != envelope.get("sha256")):
        raise CheckpointError(f"{path}: checksum mismatch (the payload is damaged)")
    return envelope


def verify_checkpoint(path: Path | str) -> str | None:
    """None if ``path`` is a complete, intact checkpoint, else what is wrong with it."""
    try:
        _open_envelope(Path(path))
    except (CheckpointError, FileNotFoundError) as error:
        return str(error)
    return None


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    path = Path(path)
    data = _open_envelope(path)["payload"].numpy()
    try:
        payload = torch.load(io.BytesIO(data.tobytes()), map_location=map_location, weights_only=True)
    except Exception as error:  # the checksum matched, so the writer itself produced this
        raise CheckpointError(f"{path}: the payload does not load ({_first_line(error)})") from None
    if not isinstance(payload, dict) or not {"config", "model", "step"} <= set(payload):
        raise CheckpointError(f"{path}: not a revdeq_kernels LM checkpoint (no config/model/step)")
    payload["config"] = upgrade_legacy(payload["config"])
    return payload


def save_rotating(folder: Path | str, payload: dict) -> Path:
    """Write ``folder/last.pt``, first keeping the current one as ``prev.pt`` if it is intact.

    ``prev.pt`` is replaced by a hard link to the current ``last.pt`` (a copy where links are
    unsupported), so at every moment ``last.pt`` exists and each name holds a whole file.
    A ``last.pt`` this process wrote and nobody changed since is rotated unread; any other
    is verified first, and a damaged one is never rotated over ``prev.pt``."""
    folder = Path(folder)
    last, previous = folder / LAST, folder / PREVIOUS
    envelope = _envelope(payload)  # before touching any file: a failure here changes nothing
    for stale in [*folder.glob(f".{LAST}.tmp-*"), *folder.glob(f".{PREVIOUS}.link-*")]:
        with contextlib.suppress(FileNotFoundError):  # left by a writer that was killed
            stale.unlink()
    if _known_intact(last) or (last.exists() and verify_checkpoint(last) is None):
        link = folder / f".{PREVIOUS}.link-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        try:
            os.link(last, link)
        except OSError:
            with atomic_path(link) as tmp:
                tmp.write_bytes(last.read_bytes())
        os.replace(link, previous)
    with atomic_path(last) as tmp:
        torch.save(envelope, tmp)
    _WRITTEN[str(last.resolve())] = _signature(last)
    return last


def load_model(path: Path | str, overrides: dict | None = None, device="cpu"):
    """(model in eval mode, tokenizer, config, checkpoint dict) from a checkpoint file.

    ``overrides`` may change only :data:`INFERENCE_KEYS` (e.g. more solver steps)."""
    ckpt = load_checkpoint(path)
    values = dict(ckpt["config"])
    for key, value in (overrides or {}).items():
        if key not in INFERENCE_KEYS:
            raise ValueError(f"cannot override {key!r} on a trained model; allowed: {', '.join(INFERENCE_KEYS)}")
        values[key] = value
    cfg: LMConfig = config_from_dict(values, f"checkpoint {path}")
    model = TransformerLM(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Tokenizer.from_json(ckpt["tokenizer"]), cfg, ckpt
