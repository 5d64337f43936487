"""The solver at inference: the training iteration against ``inference_solver=anderson``,
on a trained checkpoint, at each ``max_steps:tol`` setting.

    python bench/lm_inference.py --checkpoint runs/tiny/last.pt [--settings 32:1e-3,64:1e-4]
                                 [--solvers reversible,anderson] [--windows 4] [--new-tokens 120]
                                 [--repeats 2] [--json out.json]

Per row: the steps and block evaluations a solve of ``--windows`` validation windows took
to meet ``tol`` and its residual; the cache kind ``auto`` chose; each cache's max
|p_cached - p_full| over those windows (prompt 16 tokens, then one decode step per token),
and the equilibrium cache's and the full solve's own max |p - p*| against a full solve at
``--reference-steps`` with tol 0 (which of the two paths the gap is in);
and tokens/s of ``generate`` from "ROMEO:" (``--new-tokens``, seed 0, top-k 50) with the
cache ``auto`` picks, with each cache forced, and by full recomputation, ``--repeats`` runs
each, on one thread; and, from one more cached run, the solver steps and block evaluations
per solve (the prompt's, then one per generated token) and how many of its solves missed
``tol`` and were redone by the iteration. The per-evaluation cache is the
iteration's only: an accelerated solver mixes positions and keeps the equilibrium cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from bench_env import header, print_header
from result_file import write_json

PROMPT_LEN = 16  # the cached path's prompt; each later token is one decode step


@functools.lru_cache(maxsize=1)
@torch.no_grad()
def reference_distributions(checkpoint: str, windows: int, steps: int) -> list[list]:
    """Per window, the next-token distribution (float64) after each prefix from PROMPT_LEN
    tokens on, by a full solve at ``steps`` with tol 0; made once for every row."""
    from revdeq_kernels.lm import load_model, prepare_data
    from revdeq_kernels.lm.batches import eval_starts, window_batch

    model, tokenizer, cfg, _ = load_model(checkpoint, {"max_steps": steps, "tol": 0.0, "threads": 1})
    validation = prepare_data(cfg, tokenizer, log=lambda *a: None)["validation"]
    ids, _ = window_batch(validation, eval_starts(len(validation), cfg.seq_len, windows), cfg.seq_len)
    model.eval()
    return [[model(ids[i:i + 1, :t])[:, -1].double().softmax(-1) for t in range(PROMPT_LEN, ids.shape[1] + 1)]
            for i in range(len(ids))]


def equilibrium_gaps(model, ids, reference: list[list]) -> dict:
    """Max |p - p*| of the cached and of the full path against ``reference``, the
    distributions of a full solve converged far past tol: which path the parity gap is in."""
    from revdeq_kernels.lm import prefix_distributions

    gaps = {"equilibrium_gap_cached": 0.0, "equilibrium_gap_full": 0.0}
    for i in range(len(ids)):
        for (cached, full), truth in zip(prefix_distributions(model, ids[i:i + 1], PROMPT_LEN, "equilibrium"),
                                         reference[i]):
            gaps["equilibrium_gap_cached"] = max(gaps["equilibrium_gap_cached"], float((cached - truth).abs().max()))
            gaps["equilibrium_gap_full"] = max(gaps["equilibrium_gap_full"], float((full - truth).abs().max()))
    return gaps


def measure(checkpoint: str, solver: str, max_steps: int, tol: float, windows: int, new_tokens: int,
            repeats: int, reference_steps: int) -> dict:
    from revdeq_kernels.lm import cache_parity, generate, load_model, prepare_data
    from revdeq_kernels.lm.batches import eval_starts, window_batch

    overrides = {"max_steps": max_steps, "tol": tol, "threads": 1,
                 **({"inference_solver": solver} if solver != "reversible" else {})}
    model, tokenizer, cfg, _ = load_model(checkpoint, overrides)
    validation = prepare_data(cfg, tokenizer, log=lambda *a: None)["validation"]
    ids, _ = window_batch(validation, eval_starts(len(validation), cfg.seq_len, windows), cfg.seq_len)
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    sampling = dict(temperature=1.0, top_k=50, seed=0)
    caches = ["equilibrium"] + (["per-evaluation"] if solver == "reversible" else [])
    cached = [generate(model, prompt, new_tokens, **sampling) for _ in range(repeats)]
    forced = {kind: [generate(model, prompt, new_tokens, cache=kind, **sampling) for _ in range(repeats)]
              for kind in caches}
    full = [generate(model, prompt, new_tokens, use_cache=False, **sampling) for _ in range(repeats)]
    evaluations = []  # counted apart from the timed runs
    hook = (model.deq.f if model.is_deq else model.blocks[0]).register_forward_hook(lambda *a: evaluations.append(1))
    counted = generate(model, prompt, new_tokens, **sampling)
    hook.remove()
    with torch.no_grad():
        model(ids)
    stats = model.last_stats
    parity = {kind: max(cache_parity(model, ids[i:i + 1], PROMPT_LEN, kind) for i in range(len(ids))) for kind in caches}
    gaps = equilibrium_gaps(model, ids, reference_distributions(checkpoint, windows, reference_steps)) \
        if reference_steps else {}
    rates = lambda runs: [round(g.tokens_per_s, 1) for g in runs]  # noqa: E731
    same = lambda runs, full: all(torch.equal(run.ids, f.ids) for run, f in zip(runs, full))  # noqa: E731
    return dict(solver=solver, max_steps=max_steps, tol=tol, window_steps=stats.steps,
                window_evals=stats.nfe_forward, window_residual=stats.max_residual, auto_cache=cached[0].cache_kind,
                parity_equilibrium=parity["equilibrium"], parity_per_evaluation=parity.get("per-evaluation"), **gaps,
                cached_tokens_per_s=rates(cached),
                **{f"{kind.replace('-', '_')}_tokens_per_s": rates(runs) for kind, runs in forced.items()},
                full_tokens_per_s=rates(full),
                same_tokens=same(cached, full),
                **{f"same_tokens_{kind.replace('-', '_')}": same(runs, full) for kind, runs in forced.items()},
                iteration_fallbacks=counted.iteration_fallbacks,
                decode_steps_mean=sum(counted.solver_steps) / max(len(counted.solver_steps), 1),
                decode_evals_mean=len(evaluations) / max(len(counted.solver_steps), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--settings", default="32:1e-3,64:1e-4", help="max_steps:tol,...")
    parser.add_argument("--solvers", default="reversible,anderson")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-steps", type=int, default=256,
                        help="also each path's gap to the equilibrium: a full solve at this many steps, tol 0 "
                             "(0: skip)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        settings = [(int(steps), float(tol)) for steps, tol in (item.split(":") for item in args.settings.split(","))]
    except ValueError:
        parser.error(f"--settings {args.settings!r}: expected max_steps:tol[,max_steps:tol...], e.g. 32:1e-3")
    info = header(torch.device("cpu"))
    print_header(info, f"lm_inference: {args.checkpoint}, {args.windows} windows, {args.new_tokens} new tokens")
    rows = []
    for max_steps, tol in settings:
        for solver in args.solvers.split(","):
            rows.append(measure(args.checkpoint, solver, max_steps, tol, args.windows, args.new_tokens, args.repeats,
                                args.reference_steps))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        write_json(args.json, dict(header=info, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
