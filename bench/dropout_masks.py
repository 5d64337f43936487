"""Dropout inside f: one mask per solve (rng="per_solve") against a mask per evaluation.

`python bench/dropout_masks.py [--checkpoint runs/tiny/last.pt] [--json PATH]` prints, for
each ``rng`` mode:
- on a contractive block with dropout 0.1 (tanh(W drop(z) + x), width 64, batch 8, float64,
  tol 1e-9, at most 60 steps), for the reversible iteration, Anderson and the damped fixed
  point: the steps taken, the largest relative residual at the end, and the relative error
  of dL/dx against autograd through the same iteration (the unrolled adjoint): reversible
  for the reversible iteration, implicit for the other two;
- with ``--checkpoint``, on a trained language model in training mode (its own dropout;
  ``--dropout`` sets it when the model was trained without), on ``--windows`` validation
  windows: the residual after 4, 8, 16 and 32 steps (tol 0).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn

import revdeq_kernels as rk
from bench_env import header, print_header
from result_file import write_json

WIDTH, BATCH, DROPOUT, MAX_STEPS, TOL = 64, 8, 0.1, 60, 1e-9
MODES = ("per_solve", "per_evaluation")
SOLVERS = {"reversible": dict(solver="reversible", adjoint="reversible"),
           "anderson": dict(solver="anderson", adjoint="implicit", backward_tol=1e-12),
           "fixed_point": dict(solver="fixed_point", adjoint="implicit", backward_tol=1e-12)}


class DropoutBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin, self.drop = nn.Linear(width, width), nn.Dropout(DROPOUT)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.lin(self.drop(z)) + x)


def solve_and_differentiate(f, x: torch.Tensor, **settings) -> tuple[rk.SolverStats, torch.Tensor]:
    torch.manual_seed(1)  # the solve's seed: the same masks for the method and its unrolled reference
    x = x.clone().requires_grad_()
    deq = rk.DEQ(f, max_steps=MAX_STEPS, tol=TOL, **settings)
    z = deq(x)
    (grad,) = torch.autograd.grad(z.square().sum(), x)
    return deq.last_stats, grad


def block_rows() -> list[dict]:
    torch.manual_seed(0)
    f, x = DropoutBlock(WIDTH).double(), torch.randn(BATCH, WIDTH, dtype=torch.float64)
    print(f"# contractive block with dropout {DROPOUT}, width {WIDTH}, batch {BATCH}, float64, tol {TOL:g}, "
          f"max_steps {MAX_STEPS}; gradient error: dL/dx against the unrolled adjoint of the same iteration")
    print("| rng | solver | steps | max residual | gradient error |")
    print("|---|---|---|---|---|")
    rows = []
    for mode in MODES:
        for name, settings in SOLVERS.items():
            stats, grad = solve_and_differentiate(f, x, rng=mode, **settings)
            _, truth = solve_and_differentiate(f, x, rng=mode, solver=settings["solver"], adjoint="unrolled")
            error = float((grad - truth).norm() / truth.norm())
            row = dict(rng=mode, solver=name, steps=stats.steps, max_residual=stats.max_residual, gradient_error=error)
            rows.append(row)
            print(f"| {mode} | {name} | {stats.steps} | {stats.max_residual:.1e} | {error:.1e} |", flush=True)
    return rows


def trained_model_rows(checkpoint: str, windows: int, dropout: float | None) -> list[dict]:
    from revdeq_kernels.lm.batches import eval_starts, window_batch
    from revdeq_kernels.lm.checkpoint import load_model
    from revdeq_kernels.lm.data import prepare_data

    model, tokenizer, cfg, ckpt = load_model(checkpoint)
    if not model.is_deq:
        raise SystemExit(f"{checkpoint}: method={cfg.method} has no fixed point to solve for")
    p = cfg.dropout if dropout is None else dropout
    if p == 0:
        raise SystemExit(f"{checkpoint} was trained without dropout: give --dropout P")
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    tokens = prepare_data(cfg, tokenizer, log=lambda *args: None)["validation"]
    idx, _ = window_batch(tokens, eval_starts(len(tokens), cfg.seq_len, windows), cfg.seq_len)
    trained = f"dropout {cfg.dropout}" + (f" with rng={cfg.rng}" if cfg.dropout else "")
    print(f"# trained model: {checkpoint} (step {ckpt['step']}, block {cfg.block}, trained with {trained}), "
          f"training mode with dropout {p}, {len(idx)} validation windows; "
          "max relative residual after N steps (tol 0)")
    print("| rng | N = 4 | N = 8 | N = 16 | N = 32 |")
    print("|---|---|---|---|---|")
    rows, trained_settings = [], model.deq.settings
    for mode in MODES:
        residuals = {}
        for steps in (4, 8, 16, 32):
            model.deq.settings = dataclasses.replace(trained_settings, rng=mode, max_steps=steps, tol=0.0)
            torch.manual_seed(1)
            with torch.no_grad():
                model(idx)
            residuals[steps] = model.last_stats.max_residual
        rows.append(dict(model=checkpoint, rng=mode, dropout=p, residual_after=residuals))
        print(f"| {mode} | " + " | ".join(f"{residuals[n]:.2g}" for n in (4, 8, 16, 32)) + " |", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="also measure a trained language model in training mode")
    parser.add_argument("--windows", type=int, default=8, help="--checkpoint: validation windows in the batch")
    parser.add_argument("--dropout", type=float, help="--checkpoint: dropout to train-mode it with (default: its own)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = header(torch.device("cpu"))
    print_header(info, "dropout in f: rng='per_solve' (one mask per solve) against 'per_evaluation'")
    rows = block_rows()
    if args.checkpoint:
        rows += trained_model_rows(args.checkpoint, args.windows, args.dropout)
    if args.json:
        write_json(args.json, dict(header=info, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
