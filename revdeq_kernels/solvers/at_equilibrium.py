"""The autograd frame of the adjoints that differentiate at the fixed point only
(implicit and phantom): the forward pass runs the solver without a graph and saves x and
z* alone; the backward pass rebuilds what the adjoint needs from them.

An adjoint is an object with ``backward_output(problem, z_star, x_in, grad_z)``, called
under autograd, which returns ``(out, cotangent)``: a tensor ``out`` computed from
``x_in`` and f's parameters with a graph, and the cotangent whose vector-Jacobian product
through ``out`` is the gradient of x and the parameters. The frame does the rest: grad
mode, autocast, f's buffers kept still, the VJP, and the casts back to the inputs' dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..first_order import first_order
from ..f_module import BufferSnapshot


def vjps_or_zeros(out: Tensor, inputs: list[Tensor], cotangent: Tensor, retain_graph: bool) -> list:
    """VJPs of ``out`` for each input (None where unused); all None if nothing needs grad."""
    if not out.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(out, inputs, cotangent, retain_graph=retain_graph, allow_unused=True))


class AtEquilibriumFunction(torch.autograd.Function):
    """forward(problem, versions, solved, adjoint, x, *params) -> z*, where ``solved()``
    returns z*, found without a graph (or a state on the way there: ``states_at``), and
    ``versions`` are the parameters' version counters from before that solve. z* is handed
    over by a callable, not as an input: autograd makes an input returned unchanged a view,
    which then refuses in-place updates."""

    @staticmethod
    def forward(ctx, problem, versions, solved, adjoint, x, *params):
        ctx.parameter_versions = versions
        z = solved()
        ctx.problem, ctx.adjoint = problem, adjoint
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    @first_order("DEQ's implicit or phantom adjoint")
    def backward(ctx, grad_z):
        problem = ctx.problem
        x, z = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[4]
        with (problem.as_solved(ctx.parameter_versions) as params, torch.enable_grad(), problem.autocast_context(),
              BufferSnapshot(problem.f)):
            x_in = x.detach().requires_grad_(needs_x)
            out, cotangent = ctx.adjoint.backward_output(problem, z, x_in, grad_z)
            problem.check_parameters_read_through(out, params)
            grads = vjps_or_zeros(out, ([x_in] if needs_x else []) + params, cotangent.to(out.dtype),
                                  retain_graph=False)
        grad_x = grads.pop(0) if needs_x else None
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
        return (None, None, None, None, None if grad_x is None else grad_x.to(x.dtype), *grad_params)
