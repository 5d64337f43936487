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

import math

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


# ---------------------------------------------------------------- reversal="exact"
# Integer states h (int64, value h * 2**-frac_bits), digit planes B (int64, >= 0) and
# 1 - b = n/d (0 < |n| < d). Integer division and remainder are floor-rounded (remainders
# in [0, divisor)), as Python's // and %. Every backend quantises b * f the same way,
#     q = rint(float64(f) * scale),  scale = ldexp((d - n) / d, frac_bits)  (one IEEE multiply),
# so q, and with it every written bit, depends on f's bits only. Invalid lanes (f NaN/Inf,
# or |q| >= 2**62) add q = 0 and set a bit in flags[step]: 1 for a non-finite f, 2 for a
# value out of the range |h| < 2**62 (also set when an updated state leaves it).
#
# - ``exact_relax_(h, B, f, flags, step, n, d, F)``
#       h <- mul(h, B) + q          mul: B = B*d + (h mod d); h = h div d;
#                                        h = h*|n| + (B mod |n|); B = B div |n|; h = sign(n) h
# - ``exact_unrelax_(h, B, f, flags, step, n, d, F)``
#       h <- mul^-1(h - q, B)       (exact inverse: restores h and B bit for bit)
# - ``exact_relax_residual_(y, B, z, f, flags, step, n, d, F)``
#       exact_relax_ on y, and per sample the float64 sums of (z * 2**-F - f)^2 and f^2

_RANGE = 2**62


def _quantised(f_out: Tensor, numerator: int, denominator: int, frac_bits: int, flags: Tensor, step: int):
    scale = math.ldexp((denominator - numerator) / denominator, frac_bits)
    q = torch.round(f_out.to(torch.float64) * scale)
    nonfinite = ~torch.isfinite(q)
    out_of_range = ~nonfinite & (q.abs() >= float(_RANGE))  # float64: no wrap
    _flag(flags, step, nonfinite, out_of_range)
    return torch.where(nonfinite | out_of_range, 0.0, q).to(torch.int64)


def _outside(h: Tensor) -> Tensor:
    return (h >= _RANGE) | (h <= -_RANGE)  # not h.abs(): it wraps at -2**63


def _flag(flags: Tensor, step: int, nonfinite: Tensor, out_of_range: Tensor) -> None:
    bits = nonfinite.any().to(torch.int32) + 2 * out_of_range.any().to(torch.int32)
    flags[step] = flags[step] | bits


def _multiply(h: Tensor, digits: Tensor, numerator: int, denominator: int) -> Tensor:
    magnitude = abs(numerator)
    digits.mul_(denominator).add_(torch.remainder(h, denominator))
    h = torch.div(h, denominator, rounding_mode="floor")
    h = h * magnitude + torch.remainder(digits, magnitude)
    digits.copy_(torch.div(digits, magnitude, rounding_mode="floor"))
    return -h if numerator < 0 else h


def _divide(h: Tensor, digits: Tensor, numerator: int, denominator: int) -> Tensor:
    magnitude = abs(numerator)
    h = -h if numerator < 0 else h
    digits.mul_(magnitude).add_(torch.remainder(h, magnitude))
    h = torch.div(h, magnitude, rounding_mode="floor")
    h = h * denominator + torch.remainder(digits, denominator)
    digits.copy_(torch.div(digits, denominator, rounding_mode="floor"))
    return h


def exact_relax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int,
                 numerator: int, denominator: int, frac_bits: int) -> None:
    q = _quantised(f_out, numerator, denominator, frac_bits, flags, step)
    h = _multiply(state.clone(), digits, numerator, denominator) + q
    _flag(flags, step, torch.zeros((), dtype=torch.bool, device=h.device), _outside(h))
    state.copy_(h)


def exact_unrelax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int,
                   numerator: int, denominator: int, frac_bits: int) -> None:
    h = state - _quantised(f_out, numerator, denominator, frac_bits, flags, step)
    _flag(flags, step, torch.zeros((), dtype=torch.bool, device=h.device), _outside(h))
    state.copy_(_divide(h, digits, numerator, denominator))


def exact_residual_norms(z: Tensor, f_out: Tensor, frac_bits: int) -> tuple[Tensor, Tensor]:
    f_rows = rows(f_out).to(torch.float64)
    diff = rows(z).to(torch.float64) * math.ldexp(1.0, -frac_bits) - f_rows
    return diff.square().sum(dim=1), f_rows.square().sum(dim=1)


def exact_relax_residual_(y: Tensor, digits: Tensor, z: Tensor, f_out: Tensor, flags: Tensor, step: int,
                          numerator: int, denominator: int, frac_bits: int) -> tuple[Tensor, Tensor]:
    sums = exact_residual_norms(z, f_out, frac_bits)
    exact_relax_(y, digits, f_out, flags, step, numerator, denominator, frac_bits)
    return sums
