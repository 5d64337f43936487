"""Equal wall-clock training of the reversible DEQ LM against its baselines.

    python bench/lm_compare.py --budget 120 [--config tiny] [--threads 1] [--json out.json] [key=value ...]

Methods (same block, embeddings, data, optimizer and seed): ``reversible`` (RevDEQ, exact
reversible adjoint), ``unrolled`` (the same iteration, autograd through every step),
``explicit-1`` (one block applied once) and ``explicit-L`` (``n_layers`` separately
weighted blocks). Each trains in a fresh process, one after another, for the same
training-time budget (validation and checkpoints are not counted), then its validation
perplexity is measured on the whole validation split.

The learning rate warms up and then stays at the peak (``max_iters`` is set far beyond
what the budget reaches, so the cosine never decays): every method sees the same schedule
per step, whatever its speed.

Memory, three ways: the peak resident set size (``ru_maxrss``) of each method's process;
how far it rose above the process's RSS just before ``train()`` was called (torch and the
package imported), i.e. the run's own memory (model, optimizer, data pages, activations);
and, exactly, the bytes autograd saves for the backward of one training batch (the
activation memory, measured with ``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "reversible": {"method": "reversible"},
    "unrolled": {"method": "unrolled"},
    "explicit-1": {"method": "explicit", "n_layers": 1},
    "explicit-L": {"method": "explicit"},  # the config's n_layers
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def saved_for_backward_mb(model, x, y) -> float:
    """Bytes autograd keeps for the backward of one training forward (activations; the
    parameters themselves are not counted): an exact, noise-free memory measure."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)[1]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def worker(args) -> None:
    """One method in this (fresh) process; writes its result as JSON to ``args.result``."""
    from revdeq_kernels.lm import load_config, train
    from revdeq_kernels.lm.batches import TrainSampler

    cfg = load_config(args.config, list(args.overrides) + [f"{k}={v}" for k, v in METHODS[args.method].items()])
    before = current_rss_mb()  # torch and the package imported; nothing of the run yet
    result = train(cfg, log=lambda *a, **k: None)
    val = result.val[result.step]  # eval_batches=0: the whole validation split
    data = prepare(cfg)
    x, y = TrainSampler(data["train"], cfg.seq_len, cfg.batch_size, seed=0).next_batch()
    saved_mb = saved_for_backward_mb(result.model.train(), x, y)
    Path(args.result).write_text(json.dumps({
        "method": args.method, "n_layers": cfg.n_layers if cfg.method == "explicit" else None,
        "parameters": result.model.num_parameters(), "steps": result.step, "stopped": result.stopped,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.step * cfg.batch_size * cfg.seq_len * cfg.grad_accum / result.train_seconds,
        "val_loss": val["loss"], "val_ppl": val["ppl"], "val_tokens": val["tokens"],
        "residual_mean": val.get("residual_mean"), "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": before, "rss_rise_mb": peak_rss_mb() - before, "saved_for_backward_mb": saved_mb,
    }))


def prepare(cfg):
    from revdeq_kernels.lm import prepare_data

    return prepare_data(cfg, log=lambda *a: None)


def header(args) -> list[str]:
    import torch

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if git("status", "--porcelain") else "")
    return [f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{args.threads} torch thread(s) per run; load average at start {os.getloadavg()[0]:.2f}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, commit {commit}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}",
            f"- config `{args.config}` {' '.join(args.overrides)}; budget {args.budget:g} s of training per method"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per method")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steadiest on a shared machine)")
    parser.add_argument("--out-dir", default="runs/lm_compare")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    if args.worker:
        args.method = args.worker
        worker(args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    from revdeq_kernels.lm import load_config

    common = [f"time_budget_s={args.budget}", "max_iters=1000000", "progress=false", "tensorboard=false",
              f"threads={args.threads}", "checkpoint_interval=1000000", "eval_interval=1000000", "eval_batches=0"]
    args.overrides = common + args.overrides
    prepare(load_config(args.config, args.overrides))  # download and tokenize outside the timed runs
    lines = header(args)
    rows = []
    for method in methods:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            cmd = [sys.executable, __file__, "--worker", method, "--result", result.name, "--config", args.config,
                   *args.overrides, f"out_dir={Path(args.out_dir) / method}"]
            print(f"{method}: training for {args.budget:g} s ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            rows.append(json.loads(Path(result.name).read_text()))
    lines += ["", "| method | parameters | steps | tokens/s | val loss | val ppl | peak RSS (MB) | RSS rise in the run (MB) "
              "| saved for backward per step (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = {"reversible": "reversible DEQ", "unrolled": "unrolled DEQ"}.get(r["method"], f"explicit, {r['n_layers']} layer(s)")
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['val_loss']:.3f} | {r['val_ppl']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_rise_mb']:.0f} | "
                     f"{r['saved_for_backward_mb']:.1f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": lines[:3], "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
