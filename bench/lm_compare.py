"""The language model against its baselines: several seeds, equal optimizer steps and equal
wall clock, from the same runs.

    python bench/lm_compare.py --steps 400 --budget 200 --seeds 3 [--rows a,b,...] [--config tiny]
                               [--parallel 1] [--json out.json] [key=value ...]

Rows (the same embeddings, data, optimizer and seeds; ``L`` = block evaluations per DEQ
forward, ``1 + 2 * max_steps``): ``explicit-1``, ``explicit-L`` and ``explicit-4``
(separately weighted pre-LN residual blocks, a standard transformer), and the DEQ of each block with the
reversible adjoint, exact and float reversal (``reversible-<block>-exact``,
``reversible-<block>-float``; the residual block without ``res_reg``, as in the original
code), and, with the config's block, the same iteration unrolled
(``unrolled``) and the classic ``implicit`` and ``phantom`` gradients, and ``broyden``, the
DEQ-Transformer recipe of locuslab/deq: Broyden's method forward and for the implicit
adjoint, ``2 * max_steps`` steps each (the same block evaluations).

Every run trains in a fresh process with the learning rate warmed up and then held at its
peak (``lr_decay_iters`` far beyond the run), so that every row sees the same schedule per
step whatever its speed, and validates every ``--eval-interval`` steps on the same
``--eval-windows`` validation windows. A run goes on until it has both taken ``--steps``
steps and trained for ``--budget`` seconds (validation not counted): the equal-steps table
reads its validation at step ``--steps``, the equal-wall-clock table the one at the step
where the training time reached ``--budget`` seconds (the fast rows take more steps). Each table gives the mean and
the standard deviation over the seeds.

Memory: the bytes autograd saves for the backward of one training batch (activations,
parameters excluded), measured exactly with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCKS = ("residual", "normed")
NEVER = 10**9  # a step count no run reaches: no cosine decay, no stop by max_iters


def rows_for(cfg) -> dict[str, dict]:
    """Row name -> config overrides."""
    evaluations = 1 + 2 * cfg.max_steps
    # the explicit stacks are standard pre-LN transformers (the residual block)
    rows = {f"explicit-{n}": {"method": "explicit", "n_layers": n, "block": "residual"}
            for n in dict.fromkeys((1, evaluations, 4))}
    for block in dict.fromkeys((cfg.block, *BLOCKS)):
        # the residual block as in the original code: no residual penalty
        extra = {"res_reg": 0} if block == "residual" else {}
        for reversal in ("exact", "float"):
            rows[f"reversible-{block}-{reversal}"] = {"method": "reversible", "block": block, "reversal": reversal,
                                                      **extra}
    # broyden: the classic DEQ-Transformer recipe (Broyden forward and backward, implicit
    # adjoint) at the same block evaluations as the reversible iteration
    for method in ("unrolled", "implicit", "phantom", "broyden"):
        rows[method] = {"method": method, "block": cfg.block}
    return rows


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
    """One (row, seed) in this fresh process; writes its validation curve as JSON."""
    from revdeq_kernels.lm import load_config, prepare_data, train
    from revdeq_kernels.lm.batches import TrainSampler
    from revdeq_kernels.lm.metrics import read_jsonl

    base = load_config(args.config, args.overrides)
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in rows_for(base)[args.row].items()]
    cfg = load_config(args.config, overrides + [f"time_budget_s={args.budget}"])
    quiet = dict(log=lambda *a, **k: None)
    result = train(cfg, **quiet)
    if result.step < args.steps and result.stopped == "time_budget":  # slow row: go on to --steps
        cfg = load_config(args.config, overrides + ["time_budget_s=0", f"max_iters={args.steps}"])
        result = train(cfg, resume=True, **quiet)
    data = prepare_data(cfg, log=lambda *a: None)
    x, y = TrainSampler(data["train"], cfg.seq_len, cfg.batch_size, seed=0).next_batch()
    Path(args.result).write_text(json.dumps({
        "row": args.row, "seed": cfg.seed, "parameters": result.model.num_parameters(),
        "stopped": result.stopped, "steps": result.step,
        "val": [{"step": r["step"], "ppl": r["val_ppl"], **r} for r in read_jsonl(result.out_dir / "metrics.jsonl")
                if r["kind"] == "val"],
        "saved_for_backward_mb": saved_for_backward_mb(result.model.train(), x, y),
    }))


def at_steps(run: dict, steps: int) -> dict | None:
    return next((v for v in run["val"] if v["step"] == steps), None)


def within_budget(run: dict, budget: float) -> dict | None:
    """The validation at the step where the training time reached the budget (a run stopped
    by its budget validates there); None for a run that stopped (non-finite) before."""
    return next((v for v in run["val"] if v["train_seconds"] >= budget), None)


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def table(runs: dict[str, list[dict]], pick, title: str) -> list[str]:
    """One row per entry of ``runs``; a seed whose run stopped early (a non-finite loss) is
    shown as such and left out of the mean."""
    lines = [f"**{title}**", "", "| row | parameters | steps | val ppl (mean ± sd) | per seed | "
             "solver residual (rel.) | saved for backward (MB) |", "|---|---|---|---|---|---|---|"]
    for row, seeds in runs.items():
        points = [pick(run) for run in seeds]
        good = [p for p in points if p is not None]
        per_seed = " / ".join(f"{p['ppl']:.1f}" if p is not None else f"stopped at step {run['steps']} ({run['stopped']})"
                              for p, run in zip(points, seeds))
        ppl = spread([p["ppl"] for p in good]) if good else "-"
        residual = [p.get("residual_mean") for p in good]
        res = f"{statistics.fmean(residual):.2e}" if good and None not in residual else "-"
        steps = sorted({p["step"] for p in good})
        span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else (str(steps[0]) if steps else "-")
        lines.append(f"| {row} | {seeds[0]['parameters'] / 1e6:.2f}M | {span} | {ppl} | {per_seed} | {res} "
                     f"| {seeds[0]['saved_for_backward_mb']:.1f} |")
    return lines + [""]


def setup_lines(args) -> list[str]:
    import torch

    from bench_env import commit

    return [f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{args.parallel} run(s) at a time, 1 torch thread each; load average at start {os.getloadavg()[0]:.2f}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, commit {commit()}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}",
            f"- config `{args.config}` {' '.join(args.user_overrides)}; seeds {args.seed_list}; "
            f"{args.steps} steps / {args.budget:g} s of training; validation on {args.eval_windows} windows "
            f"every {args.eval_interval} steps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=400, help="the equal-steps point")
    parser.add_argument("--budget", type=float, default=200.0, help="the equal-wall-clock point, training seconds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time, one thread each (more than the free cores distorts wall clock)")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--out-dir", default="runs/lm_compare")
    parser.add_argument("--json", default=None, help="also write every run's curve and the tables to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    if args.worker:
        args.row = args.worker
        worker(args)
        return 0
    from revdeq_kernels.lm import load_config, prepare_data

    cfg = load_config(args.config, args.overrides)
    if args.steps % args.eval_interval:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-interval {args.eval_interval}")
    every = rows_for(cfg)
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else list(every)
    unknown = [r for r in rows if r not in every]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(every)}")
    args.user_overrides = list(args.overrides)
    args.seed_list = [cfg.seed + i for i in range(args.seeds)]
    batches = math.ceil(args.eval_windows / cfg.batch_size)
    # a constant learning rate and no deep tail: the rows differ in their model and adjoint only
    common = ["max_iters=" + str(NEVER), f"lr_decay_iters={NEVER}", "tail_fraction=0", "progress=false",
              "tensorboard=false", "threads=1", f"checkpoint_interval={NEVER}", f"eval_interval={args.eval_interval}",
              f"eval_batches={batches}"]
    prepare_data(cfg, log=lambda *a: None)  # download and tokenize outside the timed runs
    lines = setup_lines(args)

    def run(job: tuple[str, int]) -> dict:
        row, seed = job
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            cmd = [sys.executable, __file__, "--worker", row, "--result", result.name, "--config", args.config,
                   "--steps", str(args.steps), "--budget", str(args.budget), *common, *args.overrides,
                   f"seed={seed}", f"out_dir={Path(args.out_dir) / f'{row}-seed{seed}'}"]
            print(f"{row}, seed {seed} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            return json.loads(Path(result.name).read_text())

    jobs = [(row, seed) for row in rows for seed in args.seed_list]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(run, jobs))
    runs: dict[str, list[dict]] = {}
    for (row, _), result in zip(jobs, results):
        runs.setdefault(row, []).append(result)
    lines += [""] + table(runs, lambda r: at_steps(r, args.steps), f"Equal optimizer steps ({args.steps})")
    lines += table(runs, lambda r: within_budget(r, args.budget), f"Equal wall clock ({args.budget:g} s of training)")
    print("\n".join(lines))
    if args.json:
        import torch

        from bench_env import header
        from result_file import write_json

        write_json(args.json, {"header": header(torch.device("cpu")), "setup": lines[:3], "tables": lines[3:],
                               "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
