"""Terms a DEQ's training loss may add at its solution z*, to keep it an equilibrium the
solver reaches: the Jacobian penalty (f contracts around z*) and the residual penalty
(z* is a fixed point after the solver's steps)."""

from __future__ import annotations

import torch
from torch import Tensor

from .f_module import BufferSnapshot
from .jacobian import as_last_solved, block_at, evaluate_at


def jacobian_penalty(f, z, x, *, probes: int = 1, **context) -> Tensor:
    """||J||_F^2 / n of f in z at the solution, n = z.numel(): the mean squared singular value
    of f's Jacobian, estimated without bias by Hutchinson probes, ||v^T J||^2 / n with
    v ~ N(0, I), averaged over ``probes`` of them (Bai, Koltun & Kolter 2021, "Stabilizing
    equilibrium models by Jacobian regularization"). Below 1 means f contracts on average
    around z*, so the solver converges there and more steps keep it there.

    ``f`` is the block, or the ``ReversibleDEQ``/``DEQ`` holding it; ``context`` its keywords,
    as for the layer's call; z and x may be tuples of tensors, as for the layer. Given the
    layer, f draws the random numbers (dropout masks) of the layer's last solve
    (``replaying_rng``), so the penalty is of the f whose fixed point z is. Differentiable
    in f's parameters, x and the context; z* is a constant here (its gradient is the DEQ's own).
    f's buffers (BatchNorm's running statistics) are left as they were: this evaluation is not
    a forward pass of the model. Attention runs on PyTorch's math kernel, the only one with a
    double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    block, z, x = block_at(f, z, x, context)
    with torch.enable_grad(), BufferSnapshot(block), sdpa_kernel(SDPBackend.MATH):
        with as_last_solved(f):
            fz = evaluate_at(block, z, x, "the penalty")
        total = None
        for _ in range(probes):
            (vjp,) = torch.autograd.grad(fz, z, torch.randn_like(fz), create_graph=True)
            square = vjp.to(torch.promote_types(vjp.dtype, torch.float32)).pow(2).sum()
            total = square if total is None else total + square
    return total / (probes * z.numel())


def residual_penalty(z: Tensor, fz: Tensor) -> Tensor:
    """The mean over samples of ||f(z) - z||^2 / ||f(z)||^2 at the solution z, given
    ``fz = f(z, x)`` (the squared relative residual the solver reports), differentiable
    through f and through z (the DEQ's own gradient): it asks the model to be at a fixed
    point after its max_steps."""
    def sq(t: Tensor) -> Tensor:
        return t.float().pow(2).flatten(1).sum(1)

    return (sq(fz - z.to(fz.dtype)) / sq(fz).clamp_min(1e-12)).mean()
