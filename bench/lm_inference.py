"""The solver at inference: the training iteration against ``inference_solver=anderson``,
on a trained checkpoint, at each ``max_steps:tol`` setting.

    python bench/lm_inference.py --checkpoint runs/tiny/last.pt [--settings 32:1e-3,64:1e-4]
                                 [--solvers reversible,anderson] [--windows 4] [--new-tokens 120]
                                 [--repeats 2] [--json out.json]

Per row: the steps and block evaluations a solve of ``--windows`` validation windows took
to meet ``tol`` and its residual; the cache kind ``auto`` chose; the equilibrium cache's
max |p_cached - p_full| over those windows (prompt 16 tokens, then one decode step per
token); and tokens/s of ``generate`` from "ROMEO:" (``--new-tokens``, seed 0, top-k 50),
cached and by full recomputation, ``--repeats`` runs each, on one thread; and, from one
more cached run, the solver steps and block evaluations per solve (the prompt's, then one
per generated token).
"""

from __future__ import annotations

import argparse
import json
import sys


def measure(checkpoint: str, solver: str, max_steps: int, tol: float, windows: int, new_tokens: int,
            repeats: int) -> dict:
    import torch

    from revdeq_kernels.lm import cache_parity, generate, load_model, prepare_data
    from revdeq_kernels.lm.batches import eval_starts, window_batch

    overrides = {"max_steps": max_steps, "tol": tol, "threads": 1,
                 **({"inference_solver": solver} if solver != "reversible" else {})}
    model, tokenizer, cfg, _ = load_model(checkpoint, overrides)
    validation = prepare_data(cfg, tokenizer, log=lambda *a: None)["validation"]
    ids, _ = window_batch(validation, eval_starts(len(validation), cfg.seq_len, windows), cfg.seq_len)
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    sampling = dict(temperature=1.0, top_k=50, seed=0)
    cached = [generate(model, prompt, new_tokens, **sampling) for _ in range(repeats)]
    full = [generate(model, prompt, new_tokens, use_cache=False, **sampling) for _ in range(repeats)]
    evaluations = []  # counted apart from the timed runs
    hook = (model.deq.f if model.is_deq else model.blocks[0]).register_forward_hook(lambda *a: evaluations.append(1))
    counted = generate(model, prompt, new_tokens, **sampling)
    hook.remove()
    with torch.no_grad():
        model(ids)
    stats = model.last_stats
    parity = max(cache_parity(model, ids[i:i + 1], 16, "equilibrium") for i in range(len(ids)))
    return dict(solver=solver, max_steps=max_steps, tol=tol, window_steps=stats.steps,
                window_evals=stats.nfe_forward, window_residual=stats.max_residual, auto_cache=cached[0].cache_kind,
                parity_equilibrium=parity, cached_tokens_per_s=[round(g.tokens_per_s, 1) for g in cached],
                full_tokens_per_s=[round(g.tokens_per_s, 1) for g in full],
                same_tokens=all(torch.equal(c.ids, f.ids) for c, f in zip(cached, full)),
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
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        settings = [(int(steps), float(tol)) for steps, tol in (item.split(":") for item in args.settings.split(","))]
    except ValueError:
        parser.error(f"--settings {args.settings!r}: expected max_steps:tol[,max_steps:tol...], e.g. 32:1e-3")
    rows = []
    for max_steps, tol in settings:
        for solver in args.solvers.split(","):
            rows.append(measure(args.checkpoint, solver, max_steps, tol, args.windows, args.new_tokens, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        from revdeq_kernels.lm.io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
