"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the config, the model, the optimizer and scheduler states, every
rank's RNG states, the step, the data position and the tokenizer (so evaluation and
generation need nothing else). It is written atomically: a temporary file in the same
folder, flushed to disk, then ``os.replace``d over ``last.pt``. A crash mid-write leaves
the previous checkpoint as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import LMConfig, config_from_dict
from .io import atomic_path
from .model import TransformerLM
from .tokenizer import Tokenizer

FORMAT = 1
# Keys an evaluation or generation may change on a trained model: inference-time solver
# settings and where/how it runs.
INFERENCE_KEYS = ("max_steps", "tol", "beta", "state_dtype", "backend", "device", "amp", "batch_size",
                  "data_dir", "threads", "eval_batches")


def save_checkpoint(path: Path | str, payload: dict) -> None:
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a revdeq_kernels LM checkpoint (format {FORMAT})")
    return ckpt


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
