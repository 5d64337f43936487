"""The implicit-function-theorem adjoint of a fixed point z* = f(z*, x).

Differentiating z* = f(z*, x) gives dL/dtheta = u^T df/dtheta at z*, where u solves the
adjoint fixed point  u = dL/dz* + J^T u  (J = df/dz at z*). The backward pass rebuilds
f(z*, x) with a graph once, solves for u by the fixed-point or Anderson iteration
(one vector-Jacobian product through that graph per evaluation), then takes one last
VJP for x and the parameters (at_equilibrium.py). Saved for backward: x and z* only.

Exact for the equilibrium only when the forward solve converged and the adjoint solve
converged; it is not the gradient of the finite iteration that produced z*. z0 gets no
gradient (the equilibrium does not depend on the starting point).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ops.reference import accumulation_dtype
from ..stats import SolverStats
from .at_equilibrium import vjps_or_zeros


@dataclass(frozen=True)
class ImplicitAdjoint:
    """How the adjoint fixed point is solved; ``iterate(problem, evaluate, start)`` is
    fixed_point_solve or anderson_solve with their settings bound. ``stats`` receives the
    adjoint solve's steps and residuals; its nfe_forward counts that solve's VJPs."""

    iterate: Callable
    beta: float
    max_steps: int
    tol: float
    stats: SolverStats

    def backward_output(self, problem, z_star: Tensor, x_in: Tensor, grad_z: Tensor):
        acc = accumulation_dtype(problem.state_dtype)
        cotangent = grad_z.to(acc).contiguous()
        z_in = z_star.detach().to(problem.f_dtype).requires_grad_(True)
        # Under rng="per_solve" every index draws the solve's masks. Under "per_evaluation", index `steps` is the
        # forward's last evaluation for the one-evaluation-per-step solvers (not the reversible one's, 2 * steps).
        out = problem.call_f(z_in, x_in, problem.stats.steps)

        def adjoint_map(u: Tensor, index: int) -> Tensor:
            (vjp,) = vjps_or_zeros(out, [z_in], u.to(out.dtype), retain_graph=True)
            return cotangent if vjp is None else cotangent + vjp.to(acc)

        # The adjoint solve raises on a non-finite u; report_nonfinite_gradient then decides.
        adjoint_problem = dataclasses.replace(problem, beta=self.beta, max_steps=self.max_steps, tol=self.tol,
                                              state_dtype=acc, stats=self.stats, on_nonfinite="raise")
        try:
            u = self.iterate(adjoint_problem, adjoint_map, cotangent.clone())
        except FloatingPointError:
            arrived = not bool(torch.isfinite(cotangent).all())
            problem.report_nonfinite_gradient(
                "" if arrived else "the implicit adjoint's solve of u = dL/dz* + J^T u went non-finite: f's "
                "vector-Jacobian product overflowed, or the solve diverged")
            u = torch.full_like(cotangent, math.nan)
        self.stats.nfe_forward = 1 + self.stats.steps  # VJPs in the solve
        problem.stats.nfe_backward = 1
        return out, u
