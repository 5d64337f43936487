"""Run records: a JSONL file (one JSON object per record), TensorBoard scalars and a PNG
plot of the loss curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .io import atomic_path, atomic_write_text


def read_jsonl(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_jsonl(path: Path | str, last_step: int) -> None:
    """Drop records after ``last_step`` (written after the checkpoint a run resumes from)."""
    path = Path(path)
    records = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge_step)

    def log(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _new_figure():
    """A figure with one axes, drawn by the Agg canvas it is given: pyplot is never
    touched, so neither its backend nor the figures of a caller's notebook change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save_figure(fig, png: Path | str) -> Path:
    """Write ``fig`` to ``png`` atomically (a reader never sees half a file)."""
    fig.tight_layout()
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png


def plot_losses(jsonl: Path | str, png: Path | str, title: str = "") -> Path:
    """Training loss per step and validation loss per evaluation, to a PNG (Agg canvas)."""
    records = read_jsonl(jsonl)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = _new_figure()
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(jsonl).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, png)


def plot_depths(rows: list[dict], png: Path | str, title: str = "") -> Path:
    """Perplexity (and the solver's residual) against the number of solver steps."""
    steps = [r["steps"] for r in rows]
    fig, ax = _new_figure()
    ax.plot(steps, [r["ppl"] for r in rows], "o-", lw=1.5, color="C0", label="perplexity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("solver steps at inference (tol = 0)")
    ax.set_ylabel("perplexity", color="C0")
    ax.grid(alpha=0.3)
    residual = ax.twinx()
    residual.plot(steps, [r["residual_mean"] for r in rows], "s--", lw=1, color="C1", label="relative")
    residual.plot(steps, [r["abs_residual_mean"] for r in rows], "^:", lw=1, color="C2", label="absolute (RMS)")
    residual.set_yscale("log")
    residual.set_ylabel("solver residual (mean over batches)")
    residual.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, png)
