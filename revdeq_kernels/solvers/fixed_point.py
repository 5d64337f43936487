"""Relaxed fixed-point iteration: z_{n+1} = (1-b) z_n + b g(z_n), b in (0, 1].

Generic over the map ``g(state, index)``: the forward solve passes ``f(z, x)``, the
implicit adjoint passes ``u -> grad + J^T u``. Without a graph the update runs in place
through the fused ``relax_`` op (the C++/CUDA/Triton kernel when one is selected); with
``differentiable=True`` it is out of place so autograd records every step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..convergence import ConvergenceMonitor
from ..ops.reference import relax

Evaluate = Callable[[Tensor, int], Tensor]
# visit(n, z_n) after step n, for states_at; z_n may be updated in place by later steps
Visit = Callable[[int, Tensor], None]


def residual_sums(problem, z: Tensor, g_z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample sums of (z - g(z))^2 and g(z)^2 for the stop test (never recorded)."""
    with torch.no_grad():
        return ops.residual_norms(z.detach(), g_z.detach(), backend=problem.backend)


def fixed_point_solve(problem, evaluate: Evaluate, start: Tensor, *, differentiable: bool = False,
                      visit: Visit | None = None) -> Tensor:
    """Iterate from ``start`` (mutated in place unless ``differentiable``); returns z_steps.

    Evaluation n is g(z_n): one per step plus g(z_0), so the stop test after step n reads
    g(z_n), which the next step needs anyway. Fills problem.stats' steps and residuals.
    """
    b = problem.beta
    monitor = ConvergenceMonitor(problem)
    z = start
    g_z = evaluate(z, 0)
    steps = problem.max_steps
    for n in range(problem.max_steps):
        if n > 0 and monitor.converged(n, *residual_sums(problem, z, g_z)):
            steps = n
            break
        if differentiable:
            z = relax(z, g_z, b)
        else:
            ops.relax_(z, g_z, b, backend=problem.backend)
        if visit is not None:
            visit(n + 1, z)
        g_z = evaluate(z, n + 1)
    else:
        monitor.converged(steps, *residual_sums(problem, z, g_z))
    monitor.finish(steps)
    return z
