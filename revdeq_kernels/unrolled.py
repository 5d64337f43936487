"""The RevDEQ iteration with plain autograd through every step.

Exact by construction and memory-hungry (every step's graph is kept): the reference the
reversible adjoint is tested against, and the ``adjoint="unrolled"`` baseline. It calls
f exactly as the reversible solver does (same dtypes, same random stream per
evaluation, same stop rule) and does its arithmetic like the kernels (float32, or float64
for float64 states), out of place so autograd can see it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .convergence import ConvergenceMonitor, Trajectory, relative_residual
from .ops.reference import relax, residual_norms
from .stats import SolverStats


def unrolled_solve(problem, x: Tensor, z0: Tensor | None, start: Tensor,
                   keep: tuple[int, ...] = ()) -> tuple[Tensor, SolverStats, list]:
    """Returns (z_N, the stats, [z after each step of ``keep``; past the stop, z_N]) with the
    whole iteration in the autograd graph. Every state is a tensor of its own, as the
    reversible adjoint returns them: none aliases z_N or another state."""
    b = problem.beta
    z = start if z0 is None else z0.to(problem.state_dtype)  # keeps the graph to z0
    y = z
    F = problem.call_f(z, x, 0)
    monitor = ConvergenceMonitor(problem)
    steps = problem.max_steps
    trajectory = Trajectory(keep, copy=False)
    for n in range(problem.max_steps):
        if n > 0:
            with torch.no_grad():
                if monitor.converged(n, *residual_norms(z, F)):
                    steps = n
                    break
        y = relax(y, F, b)
        z = relax(z, problem.call_f(y, x, 2 * n + 1), b)
        F = problem.call_f(z, x, 2 * n + 2)
        trajectory.visit(n + 1, z)
    else:
        with torch.no_grad():
            monitor.converged(steps, *residual_norms(z, F))
    monitor.finish(steps)
    with torch.no_grad():  # as the reversible solve reports it: y = f(z) != z at a 2-cycle of f
        problem.stats.pair_residual = relative_residual(*residual_norms(y, F))
    problem.stats.nfe_forward = 1 + 2 * steps
    return z, problem.stats, trajectory.states(z)
