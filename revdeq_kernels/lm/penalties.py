"""The terms a DEQ's training objective may add to the loss, evaluated at its solution z*.

A DEQ trained on its loss alone is free to use the transient of its solver: the iterate at
``max_steps`` may be good while the fixed point it approaches is not, and then more steps
at inference make it worse. These terms make the solution an equilibrium the solver
actually reaches (``res_reg``), keep f contractive around it (``jac_reg``), or forbid the
loss to rise with one more evaluation of f (``depth_reg``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def jacobian_penalty(f: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """||J||_F^2 / n of f in z at the solution, n = z.numel(): the mean squared singular value
    of the Jacobian, estimated without bias by one Hutchinson probe, ||v^T J||^2 / n with
    v ~ N(0, I) (Bai, Koltun & Kolter 2021, "Stabilizing equilibrium models by Jacobian
    regularization"). Below 1 means f contracts on average around z*, so the solver
    converges there and more steps keep it there. Differentiable in the parameters and x;
    the solution itself is a constant here (its gradient is the DEQ's own)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    z = z.detach().to(x.dtype).requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        fz = f(z, x)
        probe = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(fz, z, probe, create_graph=True)
    return vjp.float().pow(2).sum() / vjp.numel()


def residual_penalty(z: Tensor, fz: Tensor) -> Tensor:
    """The mean over sequences of ||f(z) - z||^2 / ||f(z)||^2 at the solution z, given
    ``fz = f(z, x)`` (the squared relative residual the solver reports), differentiable
    through f and through z (the DEQ's own gradient): it asks the model to be at a fixed
    point after its max_steps."""
    sq = lambda t: t.float().pow(2).flatten(1).sum(1)  # noqa: E731
    return (sq(fz - z.to(fz.dtype)) / sq(fz).clamp_min(1e-12)).mean()


def depth_penalty(loss: Tensor, deeper_loss: Tensor) -> Tensor:
    """``relu(deeper_loss - loss)``: the loss read out at f(z*) may not exceed the loss at z*.

    Both sides keep their gradients, on purpose. Near the fixed point f(z*) - z* ~ (J - I) e
    with e = z* - z_inf, and J contracting along e, so "one more evaluation does not raise the
    loss" means, to first order, that the trained iterate is no better than the fixed point
    it approaches. The loss at z* alone rewards the opposite: an iterate tuned to the
    solver's transient, which more steps at inference then undo. With the weight w, a model
    that uses the transient pays about w * (1 - rho) per unit of loss gained, rho the
    contraction along e (~0.8 per evaluation on `tiny`), so w above 1 / (1 - rho) makes it a
    loss. Measured (bench/RESULTS.md): it flattens the depth curve but costs more perplexity
    than the rise it removes, erratically across seeds; hence off by default."""
    return torch.relu(deeper_loss - loss)
