"""The implicit-function-theorem adjoint of a fixed point z* = f(z*, x).

Differentiating z* = f(z*, x) gives dL/dtheta = u^T df/dtheta at z*, where u solves the
adjoint fixed point  u = dL/dz* + J^T u  (J = df/dz at z*). The backward pass rebuilds
f(z*, x) with a graph once, solves for u by the fixed-point or Anderson iteration
(one vector-Jacobian product through that graph per evaluation), then takes one last
VJP for x and the parameters. Saved for backward: x and z* only.

Exact for the equilibrium only when the forward solve converged and the adjoint solve
converged; it is not the gradient of the finite iteration that produced z*. z0 gets no
gradient (the equilibrium does not depend on the starting point).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops.reference import accumulation_dtype
from ..problem import BufferSnapshot
from ..stats import SolverStats


@dataclass(frozen=True)
class AdjointSolve:
    """How the adjoint fixed point is solved; ``iterate(problem, evaluate, start)``
    is fixed_point_solve or anderson_solve with their settings bound."""

    iterate: Callable
    beta: float
    max_steps: int
    tol: float


def vjps_or_zeros(out: Tensor, inputs: list[Tensor], cotangent: Tensor, retain_graph: bool) -> list:
    """VJPs of ``out`` for each input (None where unused); all None if nothing needs grad."""
    if not out.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(out, inputs, cotangent, retain_graph=retain_graph, allow_unused=True))


def input_grads(grads: list, needs_x: bool, x: Tensor, params: list) -> list:
    """[grad of x, *grads of params] from VJPs over ([x] if needs_x) + params, each in its input's dtype."""
    grad_x = grads.pop(0) if needs_x else None
    cast = [g if g is None else g.to(t.dtype) for g, t in zip(grads, params)]
    return [None if grad_x is None else grad_x.to(x.dtype), *cast]


class ImplicitFunction(torch.autograd.Function):
    """forward(problem, solve_forward, adjoint, adjoint_stats, x, *params) -> z*.

    ``solve_forward()`` runs the forward solver (no graph) and returns z*;
    ``adjoint_stats`` (a SolverStats) receives the adjoint solve's steps and residuals.
    """

    @staticmethod
    def forward(ctx, problem, solve_forward, adjoint: AdjointSolve, adjoint_stats: SolverStats, x, *params):
        z = solve_forward()
        ctx.problem, ctx.adjoint, ctx.adjoint_stats = problem, adjoint, adjoint_stats
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        problem, adjoint = ctx.problem, ctx.adjoint
        x, z = ctx.saved_tensors
        params = problem.params
        needs_x = ctx.needs_input_grad[4]
        acc = accumulation_dtype(problem.state_dtype)
        cotangent = grad_z.to(acc).contiguous()
        with torch.enable_grad(), problem.autocast_context(), BufferSnapshot(problem.f):
            z_in = z.detach().to(problem.f_dtype).requires_grad_(True)
            x_in = x.detach().requires_grad_(needs_x)
            # The forward's last evaluation was f(z*) with index `steps`: same random stream.
            out = problem.call_f(z_in, x_in, problem.stats.steps)

            def adjoint_map(u: Tensor, index: int) -> Tensor:
                (vjp,) = vjps_or_zeros(out, [z_in], u.to(out.dtype), retain_graph=True)
                return cotangent if vjp is None else cotangent + vjp.to(acc)

            adjoint_problem = dataclasses.replace(
                problem, beta=adjoint.beta, max_steps=adjoint.max_steps, tol=adjoint.tol,
                state_dtype=acc, stats=ctx.adjoint_stats)
            try:
                u = adjoint.iterate(adjoint_problem, adjoint_map, cotangent.clone())
            except FloatingPointError as error:
                raise FloatingPointError(f"implicit adjoint (backward pass): {error}") from error
            ctx.adjoint_stats.nfe_forward = 1 + ctx.adjoint_stats.steps  # VJPs in the solve
            inputs = ([x_in] if needs_x else []) + params
            grads = vjps_or_zeros(out, inputs, u.to(out.dtype), retain_graph=False)
        problem.stats.nfe_backward = 1
        return (None, None, None, None, *input_grads(grads, needs_x, x, params))
