"""On a small float64 copy of the setup: how many times each method evaluates f, and how
far its gradient is from autograd through the computation it actually performed.

Counting: a forward hook on every Block counts evaluations (forward call vs backward call)
and wraps each output in an identity autograd node that counts the VJPs taken through it.

Gradient error: ||g - g_ref|| / ||g_ref|| over the gradients of x and every parameter, where
g_ref is autograd through the same forward iteration, same weights, same steps:
    reversible, reversible_ck, reversible_exact   the reversible iteration unrolled (adjoint="unrolled")
    implicit, phantom           the baseline solver unrolled (rk.DEQ adjoint="unrolled")
    broyden                     the Broyden iteration unrolled
    torchdeq_ift                the fixed-point iteration unrolled, then f once more (its output is f(z*))
    torchdeq_phantom            the fixed-point iteration unrolled, then its k damped steps
unrolled and explicit are plain autograd: they are the truth, no error is reported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import revdeq_kernels as rk
from e2e_methods import Setup, broyden_forward, build, inputs, loss_fn, seeded_block
from revdeq_kernels.lm import Block


class _CountVJP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, counter: dict, t: Tensor) -> Tensor:
        ctx.counter = counter
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.counter["vjp"] += 1
        return None, grad


def _counting_hook(counter: dict):
    def hook(module, args, output):
        counter["calls"] += 1
        if torch.is_grad_enabled() and output.requires_grad:
            return _CountVJP.apply(counter, output)
        return output
    return hook


class Unrolled(nn.Module):
    """z_0 = 0; `steps` damped steps z <- (1-b) z + b f(z, x); then `tail` steps damped by t."""

    def __init__(self, block: Block, steps: int, damping: float, tail: int, tail_damping: float):
        super().__init__()
        self.block, self.steps, self.damping, self.tail, self.tail_damping = block, steps, damping, tail, tail_damping

    def forward(self, x: Tensor) -> Tensor:
        z = torch.zeros_like(x)
        for b in [self.damping] * self.steps + [self.tail_damping] * self.tail:
            z = (1 - b) * z + b * self.block(z, x)
        return z


def reference(method: str, steps: int, setup: Setup) -> nn.Module | str | None:
    """The autograd truth for ``method`` (same weights), None if it is its own truth, or
    a string saying why there is none."""
    if method in ("unrolled", "explicit"):
        return None
    if method in ("reversible", "reversible_ck", "reversible_exact"):
        return build("unrolled", steps, setup)
    block = seeded_block(steps, setup)
    if method in ("implicit", "phantom"):
        return rk.DEQ(block, solver=setup.baseline_solver, adjoint="unrolled", max_steps=2 * steps, tol=0,
                      beta=setup.damping, **(dict(m=setup.m, lam=setup.lam)
                                              if setup.baseline_solver == "anderson" else {}))
    if method == "broyden":
        return rk.DEQ(block, **broyden_forward(steps, setup), adjoint="unrolled")
    if setup.baseline_solver != "fixed_point":
        return "n/a: torchdeq's Anderson writes its buffers in place; autograd cannot replay it"
    if method == "torchdeq_ift":
        return Unrolled(block, 2 * steps, setup.damping, 1, 1.0)
    return Unrolled(block, 2 * steps, setup.damping, setup.phantom_steps, setup.phantom_beta)


def gradients(model: nn.Module, setup: Setup) -> Tensor:
    x, target = inputs(setup)
    loss_fn(model(x), target).backward()
    grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return torch.cat([g.flatten() for g in grads])


def count_and_compare(method: str, steps: int, setup: Setup) -> dict:
    """f evaluations forward/backward, VJPs backward, and the gradient error vs the reference.
    For rk.DEQ methods the counts must agree with SolverStats' nfe_forward/nfe_backward."""
    model = build(method, steps, setup)
    counter = {"calls": 0, "vjp": 0}
    hooks = [m.register_forward_hook(_counting_hook(counter)) for m in model.modules() if isinstance(m, Block)]
    x, target = inputs(setup)
    z = model(x)
    forward_calls = counter["calls"]
    loss_fn(z, target).backward()
    for hook in hooks:
        hook.remove()
    row = dict(nfe_forward=forward_calls, nfe_backward=counter["calls"] - forward_calls, vjp_backward=counter["vjp"])
    stats = getattr(model, "last_stats", None)
    row["residual"] = stats.max_residual if stats is not None else None
    if stats is not None and (stats.nfe_forward, stats.nfe_backward) != (row["nfe_forward"], row["nfe_backward"]):
        raise RuntimeError(f"{method} at {steps} steps: SolverStats says nfe {stats.nfe_forward}/{stats.nfe_backward}, "
                           f"the hooks counted {row['nfe_forward']}/{row['nfe_backward']}")
    truth = reference(method, steps, setup)
    if truth is None or isinstance(truth, str):
        row["grad_error"], row["grad_error_note"] = None, truth or "autograd: the truth"
        return row
    got, want = gradients(build(method, steps, setup), setup), gradients(truth, setup)
    row["grad_error"] = float((got - want).norm() / want.norm())
    return row
