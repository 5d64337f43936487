"""Forward solvers of rk.DEQ side by side: f evaluations and time to a tolerance.

    python bench/solvers.py [--widths 16,64,256] [--tols 1e-4,1e-8] [--seeds 4] [--json out.json]

f(z, x) = tanh(W z + x) with a symmetric W whose eigenvalues are spread evenly over
[-0.95, 0.95]: a contraction (tanh is 1-Lipschitz) that the plain iteration approaches
slowly, along the eigenvectors near +-0.95; float64, batch 4, x ~ 0.3 N(0, 1). Each cell
is the median over the seeds of the f evaluations (``nfe_forward``) the solver needed
until every sample met the relative tolerance, and its wall time. Solvers at their
defaults: fixed_point (beta 1), anderson (m=5, lam=1e-4), broyden (m=30). tests/test_broyden.py
imports this file and asserts its evaluation counts at width 16, tol 1e-10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import revdeq_kernels as rk
from bench_env import header, print_header
from result_file import write_json

SOLVERS = ("fixed_point", "anderson", "broyden")


class SpreadSpectrumBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
        eigenvalues = torch.linspace(-0.95, 0.95, width, dtype=torch.float64)
        self.weight = nn.Parameter(q @ torch.diag(eigenvalues) @ q.T)

    def forward(self, z, x):
        return torch.tanh(z @ self.weight.T + x)


def measure(solver: str, width: int, tol: float, seed: int) -> tuple[int, float]:
    torch.manual_seed(seed)
    f, x = SpreadSpectrumBlock(width), 0.3 * torch.randn(4, width, dtype=torch.float64)
    deq = rk.DEQ(f, solver=solver, adjoint="implicit", max_steps=5000, tol=tol)
    start = time.perf_counter()
    with torch.no_grad():
        deq(x)
    seconds = time.perf_counter() - start
    if deq.last_stats.max_residual > tol:
        raise RuntimeError(f"{solver} at width {width} did not reach tol {tol} in 5000 steps")
    return deq.last_stats.nfe_forward, seconds


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256])
    parser.add_argument("--tols", type=_floats, default=[1e-4, 1e-8])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = header(torch.device("cpu"))
    print_header(info, f"solvers: f evaluations (wall ms) to each tolerance, median of {args.seeds} seeds")
    rows = []
    print("| width | tol | " + " | ".join(f"{s} nfe (ms)" for s in SOLVERS) + " |")
    print("|---|---|" + "---|" * len(SOLVERS))
    for width in args.widths:
        for tol in args.tols:
            cells = {}
            for solver in SOLVERS:
                runs = [measure(solver, width, tol, seed) for seed in range(args.seeds)]
                cells[solver] = dict(nfe=statistics.median(r[0] for r in runs), nfe_per_seed=[r[0] for r in runs],
                                     ms=1e3 * statistics.median(r[1] for r in runs))
            rows.append(dict(width=width, tol=tol, **cells))
            print(f"| {width} | {tol:g} | " + " | ".join(f"{cells[s]['nfe']:g} ({cells[s]['ms']:.1f})"
                                                      for s in SOLVERS) + " |")
    if args.json:
        write_json(args.json, dict(header=info, seeds=args.seeds, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
