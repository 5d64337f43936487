"""The terms a DEQ's training objective may add to the loss, evaluated at its solution z*.

A DEQ trained on its loss alone is free to use the transient of its solver: the iterate at
``max_steps`` may be good while the fixed point it approaches is not, and then more steps
at inference make it worse. These terms make the solution an equilibrium the solver
actually reaches (``res_reg``) or keep f contractive around it (``jac_reg``).
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


def residual_penalty(f: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """The mean over sequences of ||f(z) - z||^2 / ||f(z)||^2 at the solution z (the squared
    relative residual the solver reports), differentiable through f and through z (the
    DEQ's own gradient): it asks the model to be at a fixed point after its max_steps."""
    z = z.to(x.dtype)
    fz = f(z, x)
    sq = lambda t: t.float().pow(2).flatten(1).sum(1)  # noqa: E731
    return (sq(fz - z) / sq(fz).clamp_min(1e-12)).mean()
