"""Pure-PyTorch reference for the RevDEQ state updates.

This file is the truth: the ``torch`` backend runs these functions, tests/test_ops.py
checks every fused kernel against them (evaluated on float64 copies of the inputs), the
unrolled solver and the solvers' out-of-place steps use ``relax``, and the ops benchmark
times them as its ``torch`` backend. They are written for readability, not speed:
upcast to the accumulation dtype, compute, cast back into the written tensor.

Accumulation dtype: float64 when the state is float64, float32 otherwise. The
per-sample statistics are returned in that dtype.

Semantics (``b`` is beta, all updates in place on the first argument):

- ``relax_(a, f, b)``                  a <- (1-b) a + b f
- ``unrelax_(a, f, b)``                a <- (a - b f) / (1-b)               (exact inverse)
- ``relax_residual_(y, z, f, b)``      y <- (1-b) y + b f, and per sample i
                                       returns (sum (z_i - f_i)^2, sum f_i^2)
- ``residual_norms(z, f)``             the same two sums, no update
- ``adjoint_accumulate_(g, v, c, b, scale_after)``
      scale_after=False:  g <- (1-b) g + v;        c <- b g      (z half-step)
      scale_after=True:   s = g + v; g <- (1-b) s; c <- b s      (y half-step)
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(state_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def rows(t: Tensor) -> Tensor:
    """View as (batch, elements per sample); works for 1-D and empty tensors."""
    batch = t.shape[0]
    return t.reshape(batch, t.numel() // batch if batch else 0)


def relax(state: Tensor, f_out: Tensor, beta: float) -> Tensor:
    """(1-beta) state + beta f_out, out of place (for autograd), rounded once into state's dtype."""
    acc = accumulation_dtype(state.dtype)
    return ((1.0 - beta) * state.to(acc) + beta * f_out.to(acc)).to(state.dtype)


def relax_(state: Tensor, f_out: Tensor, beta: float) -> None:
    acc = accumulation_dtype(state.dtype)
    state.copy_((1.0 - beta) * state.to(acc) + beta * f_out.to(acc))


def unrelax_(state: Tensor, f_out: Tensor, beta: float) -> None:
    acc = accumulation_dtype(state.dtype)
    state.copy_((state.to(acc) - beta * f_out.to(acc)) / (1.0 - beta))


def residual_norms(z: Tensor, f_out: Tensor) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(z.dtype)
    f_rows = rows(f_out).to(acc)
    diff = rows(z).to(acc) - f_rows
    return diff.square().sum(dim=1), f_rows.square().sum(dim=1)


def relax_residual_(y: Tensor, z: Tensor, f_out: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    sums = residual_norms(z, f_out)
    relax_(y, f_out, beta)
    return sums


def adjoint_accumulate_(
    grad: Tensor, vjp: Tensor, cotangent: Tensor, beta: float, scale_after: bool
) -> None:
    acc = accumulation_dtype(grad.dtype)
    g, v = grad.to(acc), vjp.to(acc)
    if scale_after:
        total = g + v
        grad.copy_((1.0 - beta) * total)
        cotangent.copy_(beta * total)
    else:
        total = (1.0 - beta) * g + v
        grad.copy_(total)
        cotangent.copy_(beta * total)
