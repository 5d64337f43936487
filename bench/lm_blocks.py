"""Which block makes the language model an equilibrium: train each variant, then evaluate
it at several solver depths.

    python bench/lm_blocks.py [--steps 400] [--depths 1,2,4,8,16] [--windows 128] [--config tiny]
                              [--variants name=key:value,key:value;...] [--json out.json]

Each variant trains ``--steps`` optimizer steps of ``--config`` (one thread, in this
process, one after another, the cosine schedule ending at ``--steps``, without the config's
deep tail unless a variant sets ``tail_fraction``: it compares blocks), then its
validation perplexity, relative residual and absolute residual are measured on the same
``--windows`` validation windows at every depth of ``--depths`` with ``tol=0``. A DEQ
worth its name gets no worse, and its residual keeps falling, as the depth grows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from bench_env import header, print_header
from result_file import write_json

# name -> overrides; explicit-1 is the reference a weight-tied DEQ of the same block must beat
VARIANTS = {
    "explicit-1": "method:explicit,n_layers:1,block:residual",
    "residual": "block:residual,res_reg:0",
    "postln": "block:postln,res_reg:0",
    "anchored": "block:anchored,res_reg:0",
    "normed": "block:normed,res_reg:0",
    "normed+jac_reg=0.01": "block:normed,res_reg:0,jac_reg:0.01",
    "normed+depth_jitter=4": "block:normed,res_reg:0,depth_jitter:4",
    "normed+res_reg=1": "block:normed,res_reg:1",
    "normed+res_reg=5": "block:normed,res_reg:5",
    "normed+res_reg=20": "block:normed,res_reg:20",
}


def parse_variants(text: str | None) -> dict[str, list[str]]:
    chosen = VARIANTS if text is None else dict(part.split("=", 1) for part in text.split(";") if part.strip())
    out = {}
    for name, spec in chosen.items():
        spec = VARIANTS.get(spec, spec)
        out[name] = [item.replace(":", "=", 1) for item in spec.split(",") if item.strip()]
    return out


def measure(config: str, overrides: list[str], steps: int, depths: list[int], windows: int) -> dict:
    from revdeq_kernels.lm import load_config, prepare_data, train
    from revdeq_kernels.lm.evaluation import evaluate, evaluate_depths

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [f"max_iters={steps}", f"eval_interval={steps}", "eval_batches=1", "threads=1",
                                   "tail_fraction=0", "progress=false", "tensorboard=false", f"checkpoint_interval={steps}",
                                   f"out_dir={out}", *overrides])
        result = train(cfg, log=lambda *a, **k: None)
    validation = prepare_data(cfg, log=lambda *a: None)["validation"]
    cpu = torch.device("cpu")
    if not result.model.is_deq:
        return {"train_loss": result.losses[result.step],
                "rows": [{"steps": 0, **evaluate(result.model, validation, cfg, cpu, max_windows=windows)}]}
    return {"train_loss": result.losses[result.step],
            "rows": evaluate_depths(result.model, validation, cfg, cpu, depths, max_windows=windows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--depths", default="1,2,4,8,16")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--variants", default=None,
                        help="name=key:value,...;... (a bare name picks a built-in variant); default: all built-in")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every run trains and evaluates with threads=1: the header says so
    info = header(torch.device("cpu"))
    print_header(info, f"lm_blocks: config {args.config}, {args.steps} training steps, {args.windows} validation "
                       "windows, perplexity at each solver depth")
    depths = [int(d) for d in args.depths.split(",")]
    results = {}
    print("| variant | " + " | ".join(f"ppl @{d}" for d in depths) + " | rel. residual | abs. residual (RMS) |")
    print("|---|" + "---|" * (len(depths) + 2))
    for name, overrides in parse_variants(args.variants).items():
        print(f"{name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        results[name] = measure(args.config, overrides, args.steps, depths, args.windows)
        rows = results[name]["rows"]
        if rows[0]["steps"] == 0:  # explicit: one figure
            cells = [f"{rows[0]['ppl']:.1f}"] + ["" for _ in depths[1:]] + ["-", "-"]
        else:
            cells = [f"{r['ppl']:.1f}" for r in rows]
            cells += [" / ".join(f"{r[key]:.2g}" for r in rows) for key in ("residual_mean", "abs_residual_mean")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        write_json(args.json, {"header": info, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
