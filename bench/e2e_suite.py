"""End-to-end training step of a transformer-block DEQ: `python bench/throughput.py --suite e2e`.

f is the language model's block (revdeq_kernels.lm.Block), batch x seq x width settable.
For each method (bench/e2e_methods.py: reversible, reversible_ck, reversible_exact, unrolled, implicit, broyden,
phantom, explicit, and torchdeq's IFT and phantom modes when torchdeq is installed) and
each N in --steps, with the same forward budget of 1 + 2N block evaluations for all:
training-step time (median over timed rounds after --warmup; all methods at one N in one
process, one step of each per round, so that load from other processes hits them alike),
tokens/s, peak memory (CPU: peak RSS of a fresh process per point; GPU:
torch.cuda.max_memory_allocated), f evaluations in the forward and backward call and VJPs
in the backward call (counted by hooks), and the gradient error against autograd through
the same computation in float64 on a small copy (bench/e2e_accuracy.py); see
bench/e2e_point.py for the measurements. Outputs: a Markdown table, the target checks,
--json, and two PNG plots in --plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields

import torch

from bench_env import header, print_header
from e2e_accuracy import count_and_compare
from e2e_methods import METHODS, Setup, build, torchdeq_status
from revdeq_kernels.lm.block import BLOCKS
from e2e_report import plot, print_targets, table, targets
from result_file import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
POINT_SCRIPT = os.path.join(HERE, "e2e_point.py")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Setup()
    g = parser.add_argument_group("e2e suite")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--seq", type=int, default=d.seq)
    g.add_argument("--width", type=int, default=d.width)
    g.add_argument("--heads", type=int, default=d.heads)
    g.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio)
    g.add_argument("--block", choices=tuple(BLOCKS), default=d.block,
                   help="the LM block used as f (residual: the original; normed: the LM's default)")
    g.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=d.dtype,
                   help="parameters, inputs and DEQ states")
    g.add_argument("--autocast", choices=("off", "bf16"), default=d.autocast,
                   help="bf16: the forward under bf16 autocast, states kept in --dtype (the LM on CUDA)")
    g.add_argument("--device", default=d.device, help="cpu or cuda[:i]")
    g.add_argument("--steps", type=_ints, default=[2, 4, 8, 16, 32], help="comma-separated N")
    g.add_argument("--methods", type=_methods, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    g.add_argument("--beta", type=float, default=d.beta, help="reversible coupling")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="K of reversible_ck")
    g.add_argument("--baseline-solver", choices=("fixed_point", "anderson"), default=d.baseline_solver)
    g.add_argument("--damping", type=float, default=d.damping, help="damping of the baselines' solver")
    g.add_argument("--m", type=int, default=d.m, help="Anderson window")
    g.add_argument("--lam", type=float, default=d.lam, help="Anderson regularisation")
    g.add_argument("--broyden-m", type=int, default=d.broyden_m, help="Broyden's stored pairs (method broyden)")
    g.add_argument("--phantom-steps", type=int, default=d.phantom_steps)
    g.add_argument("--phantom-beta", type=float, default=d.phantom_beta)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=5, help="at least this many timed rounds per N")
    g.add_argument("--min-seconds", type=float, default=5.0,
                   help="keep timing rounds at one N until this much time has passed (at most 100 rounds)")
    g.add_argument("--threads", type=int, default=0, help="torch threads per point (0: torch's default)")
    g.add_argument("--grad-copy", type=_ints, default=[2, 8, 16, 2],
                   help="batch,seq,width,heads of the float64 copy for gradient errors")
    g.add_argument("--json", help="write the header, rows and target checks here")
    g.add_argument("--plots", default=os.path.join(HERE, "results"), help="folder for the PNGs ('' = none)")
    g.add_argument("--point-timeout", type=float, default=900.0, help="seconds per point")
    g.add_argument("--memory-jobs", type=int, default=1,
                   help="memory points measured at once, each in its own process (a peak per process does "
                        "not depend on the others; the timing runs alone first)")
    g.add_argument("--check-targets", action="store_true", help="exit 1 if a target is not met")


def _setup(args) -> Setup:
    names = {f.name for f in fields(Setup)}
    return Setup(**{k: v for k, v in vars(args).items() if k in names})


def _child(mode: str, config: dict, timeout: float) -> dict:
    """Run bench/e2e_point.py in a fresh process; its last stdout line is the JSON result."""
    try:
        done = subprocess.run([sys.executable, POINT_SCRIPT, mode, json.dumps(config)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"{mode}: timed out after {timeout:.0f} s")
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"{mode}: exit {done.returncode}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> int:
    if len(args.grad_copy) != 4:
        raise SystemExit(f"--grad-copy takes batch,seq,width,heads; got {args.grad_copy}")
    setup = _setup(args)
    device = torch.device(setup.device)
    if args.threads:  # the header reports it, and the gradient checks here use no more
        torch.set_num_threads(args.threads)
    methods = list(args.methods)
    skipped = torchdeq_status()
    if skipped and any(m.startswith("torchdeq") for m in methods):
        methods = [m for m in methods if not m.startswith("torchdeq")]
        print(f"# torchdeq rows omitted: {skipped}")
    info = header(device)
    info["load_average_start"] = os.getloadavg()
    info["threads"] = args.threads or torch.get_num_threads()
    print_header(info, "e2e: one training step (zero grads, forward, MSE loss, backward) of a transformer-block DEQ")
    print(f"# block: {setup.block}, width {setup.width}, {setup.heads} heads, MLP {int(setup.mlp_ratio * setup.width)}; "
          f"batch {setup.batch} x seq {setup.seq}, {setup.dtype}"
          f"{', bf16 autocast' if setup.autocast == 'bf16' else ''}; reversible beta {setup.beta}, "
          f"reversible_ck K={setup.checkpoint_every}; baselines: {setup.baseline_solver} damping {setup.damping}, "
          f"phantom k={setup.phantom_steps} t={setup.phantom_beta}; tol 0; time: median of >= {args.repeats} "
          f"interleaved rounds and >= {args.min_seconds:g} s per N after {args.warmup} warm-up; "
          f"{info['threads']} torch thread(s) per measuring process; "
          f"load average {info['load_average_start']}")
    small = setup.small(width=args.grad_copy[2], seq=args.grad_copy[1], batch=args.grad_copy[0],
                        heads=args.grad_copy[3])
    for method in methods:  # bad settings fail here, before any point runs
        build(method, 1, small)
    rows, failed, started = [], False, time.time()
    base = dict(setup=asdict(setup), warmup=args.warmup, threads=args.threads)
    times = {}
    for steps in args.steps:
        timing = dict(methods=methods, steps=steps, repeats=args.repeats, min_seconds=args.min_seconds)
        times[steps] = _child("time", base | timing, args.point_timeout * len(methods))
    points = [(steps, method) for steps in args.steps for method in methods]
    with ThreadPoolExecutor(max(1, args.memory_jobs)) as pool:
        memories = pool.map(lambda p: _child("memory", base | dict(method=p[1], steps=p[0]), args.point_timeout),
                            points)
        for (steps, method), memory in zip(points, memories):
            errors = [e for e in (times[steps].get("error"), memory.pop("error", None)) if e]
            row = dict(method=method, steps=steps, **times[steps].get(method, {}), **memory)
            row.update(count_and_compare(method, steps, small))
            if errors:
                row["error"] = "; ".join(errors)
                failed = True
            rows.append(row)
            shown = (f"{row['time_ms']:.1f} ms, step {row['step_mb']:.1f} MB"
                     if not errors else row["error"])
            print(f"  N={steps:<3} {method:<17} {shown}", flush=True)
    rows.sort(key=lambda r: (methods.index(r["method"]), r["steps"]))
    backends = sorted({r["backend"] for r in rows if r.get("backend")})
    info["state_update_backend"] = ", ".join(backends) or "-"
    info["load_average_end"] = os.getloadavg()
    info["wall_s"] = time.time() - started
    print(f"\n# state-update backend used by the DEQ methods: {info['state_update_backend']}; "
          f"sweep took {info['wall_s']:.0f} s; load average at the end {info['load_average_end']}")
    print(table(rows))
    for row in rows:
        if "error" in row:
            print(f"# {row['method']} N={row['steps']} failed: {row['error']}")
    checks = targets(rows)
    print_targets(checks)
    if args.plots:
        title = (f"{info['device']} | torch {info['torch']} | commit {info['commit']}\n"
                 f"LM block, batch {setup.batch} x seq {setup.seq} x width {setup.width}, {setup.dtype}"
                 f"{' + bf16 autocast' if setup.autocast == 'bf16' else ''}, "
                 f"state updates: {info['state_update_backend']}")
        for path in plot(rows, args.plots, title):
            print(f"# wrote {path}")
    if args.json:
        write_json(args.json, dict(header=info, setup=asdict(setup), args={k: v for k, v in vars(args).items()},
                                   rows=rows, targets=checks))
        print(f"# wrote {args.json}")
    if failed:
        return 1
    return 1 if args.check_targets and not all(c["met"] for c in checks) else 0
