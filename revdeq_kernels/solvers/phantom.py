"""The phantom-gradient adjoint (Geng et al., NeurIPS 2021): backpropagate through k
damped steps taken from the fixed point instead of through the solver.

The forward pass returns the solver's z* unchanged and saves x and z*. The backward pass
recomputes  s_0 = z*,  s_{i+1} = (1-t) s_i + t f(s_i, x)  for i < k with a graph, and
returns the vector-Jacobian product of s_k with the incoming gradient: z* itself is
treated as a constant (no gradient flows through the solver, and none to z0). Costs k
evaluations of f and k VJPs in the backward pass; memory O(k) there, O(1) between passes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..problem import BufferSnapshot
from ..ops.reference import relax
from .implicit import input_grads, vjps_or_zeros


def phantom_steps(problem, z_star, x, steps: int, damping: float):
    """s_k from s_0 = z_star (detached) under the current grad mode; evaluation i of the
    k uses the random stream after the forward solver's."""
    state = z_star.detach()
    first = problem.stats.steps + 1
    for i in range(steps):
        state = relax(state, problem.call_f(state, x, first + i), damping)
    return state


class PhantomFunction(torch.autograd.Function):
    """forward(problem, solve_forward, steps, damping, x, *params) -> z*."""

    @staticmethod
    def forward(ctx, problem, solve_forward, steps: int, damping: float, x, *params):
        z = solve_forward()
        ctx.problem, ctx.steps, ctx.damping = problem, steps, damping
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        problem = ctx.problem
        x, z = ctx.saved_tensors
        params = problem.params
        needs_x = ctx.needs_input_grad[4]
        with torch.enable_grad(), problem.autocast_context(), BufferSnapshot(problem.f):
            x_in = x.detach().requires_grad_(needs_x)
            out = phantom_steps(problem, z, x_in, ctx.steps, ctx.damping)
            inputs = ([x_in] if needs_x else []) + params
            grads = vjps_or_zeros(out, inputs, grad_z.to(out.dtype), retain_graph=False)
        problem.stats.nfe_backward = ctx.steps
        return (None, None, None, None, *input_grads(grads, needs_x, x, params))
