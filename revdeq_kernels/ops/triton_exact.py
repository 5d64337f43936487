"""Triton backend of reversal="exact": the kernels and launchers of ``exact_relax_``,
``exact_unrelax_`` and ``exact_relax_residual_``, registered into ``revdeq_triton``
(CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``). The autotuning and its
configs are ``triton_launch.py``'s, as for the float ops of ``triton_ops.py``.

The arithmetic is ``reference.py``'s, bit for bit (int64 states h, digit planes B,
1 - beta = n/d, an = |n|; see ``fixed_point.py``):

- Quantisation: q = rint(float64(f) * scale), one IEEE multiply and a round half to even.
  Triton has no rint that runs both compiled and under the interpreter (libdevice is
  compiled only), so it is built from IEEE additions: for |x| < 2**52, (|x| + 2**52) - 2**52
  rounds |x| to the nearest integer, ties to even (the sum lies in [2**52, 2**53), where the
  spacing is 1, and 2**52 is even); larger |x| are integers already. The same code runs in
  both modes, so the CPU tests check the bits the GPU writes. An FMA contraction of the
  multiply into that addition would round once instead of twice and change q, so the
  kernels are launched with ``enable_fp_fusion=False`` (and |x| stands between the
  multiply and the add anyway); ``tests/test_triton.py`` checks the compiled PTX.
- Floor division: Triton's integer ``//`` truncates (C semantics, compiled and
  interpreted alike), the reference floors. ``_floor_divmod`` takes the truncated
  quotient and moves a negative remainder into [0, d) explicitly, which is right under
  either semantics. Powers of two use an arithmetic shift and a mask (floor by
  construction); the common ratios {1/2, 1/4, 3/4, 1/5, 4/5, 1/10} and every power-of-two
  d are compile-time constants (division by a constant compiles to a multiply-high),
  any other ratio takes runtime divisors. an == 1 skips the second step.
- Integer arithmetic wraps (two's complement, no UB) on corrupted inputs, as torch's does.
- Flags: each lane computes its bits (1: f non-finite, 2: |q| or the new |h| >= 2**62),
  the program reduces them over its block and does one ``atomic_or`` on flags[step].
- Row sums (``exact_relax_residual_``): float64 partials per (row, chunk), no atomics,
  added in a fixed order by ``triton_kernels.sum_partials_kernel``, as ``triton_ops``
  does for the float ops.

Autotuning restores every tensor a kernel writes (state/y, digits, flags) after each
trial, so only the final launch changes the data (``tests/test_triton.py`` checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import check_aliasing, check_exact, check_read
from .triton_kernels import row_tile_of_program, store_row_partials, sum_partials_kernel
from .triton_launch import (PARTIALS_BLOCK, bucket, check_device, default_configs, device_guard, register, row_tile,
                            tuned)

# (|n|, d) pairs whose divisors are compiled in as constants (besides every power-of-two d).
SPECIALISED_RATIOS = frozenset({(1, 2), (1, 4), (3, 4), (1, 5), (4, 5), (1, 10)})
# Compile options of every launch: no FMA contraction (LLVM emits mul.rn / add.rn, ptxas
# gets --fmad=false), so the quantisation multiply is rounded on its own. The interpreter
# ignores them (numpy never fuses).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# ---------------------------------------------------------------------------- kernels

@triton.jit
def _to_float64(f):
    # Through float32 (exact for every 16-bit and 32-bit float): the interpreter converts
    # bfloat16 correctly only to float32.
    if f.dtype == tl.float64:
        return f
    else:
        return f.to(tl.float32).to(tl.float64)


@triton.jit
def _quantise(f, scale):
    """q = rint(float64(f) * scale) (int64, 0 on invalid lanes) and each lane's flag bits:
    1 where q is not finite, 2 where |q| >= 2**62."""
    x = _to_float64(f) * scale  # the one multiply; nothing may fuse into it
    magnitude = tl.abs(x)
    # Round half to even for |x| < 2**52 (see the module docstring); larger ones are integers.
    rounded = tl.where(magnitude < 4503599627370496.0,
                       (magnitude + 4503599627370496.0) - 4503599627370496.0, magnitude)
    in_range = rounded < 4611686018427387904.0  # 2**62; False for NaN and Inf
    nonfinite = ~(magnitude <= 1.7976931348623157e308)  # NaN or Inf (the float64 maximum)
    magnitude_q = tl.where(in_range, rounded, 0.0).to(tl.int64)
    q = tl.where(x < 0, -magnitude_q, magnitude_q)
    code = tl.where(nonfinite, 1, tl.where(in_range, 0, 2))
    return q, code


@triton.jit
def _out_of_range(h):
    # |h| >= 2**62 as the reference computes it (int64 abs, wrapping at -2**63).
    return tl.where(tl.abs(h) >= 4611686018427387904, 2, 0)


@triton.jit
def _floor_divmod(x, divisor, CONST: tl.constexpr, SHIFT: tl.constexpr):
    """x div divisor and x mod divisor, floor-rounded (remainder in [0, divisor)), for
    int64 x and divisor > 0: the constant CONST when CONST > 0, 2**SHIFT when SHIFT >= 0,
    else the runtime ``divisor``."""
    if SHIFT >= 0:
        quotient = x >> SHIFT  # arithmetic shift: floor
        remainder = x & ((1 << SHIFT) - 1)
    else:
        if CONST > 0:
            quotient = x // CONST  # truncates toward zero (C semantics)
            remainder = x - quotient * CONST
            negative = remainder < 0
            quotient = tl.where(negative, quotient - 1, quotient)
            remainder = tl.where(negative, remainder + CONST, remainder)
        else:
            wide = divisor.to(tl.int64)
            quotient = x // wide
            remainder = x - quotient * wide
            negative = remainder < 0
            quotient = tl.where(negative, quotient - 1, quotient)
            remainder = tl.where(negative, remainder + wide, remainder)
    return quotient, remainder


@triton.jit
def _times(x, factor, CONST: tl.constexpr):
    if CONST > 0:
        return x * CONST
    else:
        return x * factor.to(tl.int64)


@triton.jit
def _multiply(h, digits, d, an, NEGATIVE: tl.constexpr, D: tl.constexpr, D_SHIFT: tl.constexpr,
              AN: tl.constexpr, AN_SHIFT: tl.constexpr):
    """h * n/d with the remainder kept in the digits (reference ``_multiply``)."""
    h, remainder = _floor_divmod(h, d, D, D_SHIFT)
    digits = _times(digits, d, D) + remainder
    if AN_SHIFT != 0:  # an == 1: B mod 1 = 0, B div 1 = B
        digits, remainder = _floor_divmod(digits, an, AN, AN_SHIFT)
        h = _times(h, an, AN) + remainder
    if NEGATIVE:
        h = -h
    return h, digits


@triton.jit
def _divide(h, digits, d, an, NEGATIVE: tl.constexpr, D: tl.constexpr, D_SHIFT: tl.constexpr,
            AN: tl.constexpr, AN_SHIFT: tl.constexpr):
    """The exact inverse of ``_multiply`` (reference ``_divide``)."""
    if NEGATIVE:
        h = -h
    if AN_SHIFT != 0:
        h, remainder = _floor_divmod(h, an, AN, AN_SHIFT)
        digits = _times(digits, an, AN) + remainder
    digits, remainder = _floor_divmod(digits, d, D, D_SHIFT)
    h = _times(h, d, D) + remainder
    return h, digits


@triton.jit
def _flag(flags_ptr, step, code):
    """flags[step] |= the OR of the lanes' bits: one atomic per program, none when clear
    (relaxed: an OR commutes, and nothing else is ordered by it)."""
    bits = tl.max(code & 1, axis=None) | tl.max(code & 2, axis=None)
    tl.atomic_or(flags_ptr + step, bits, mask=bits != 0, sem="relaxed")


@triton.jit(do_not_specialize=["step", "tuning_bucket", "d", "an"])
def exact_kernel(
    state_ptr, digits_ptr, f_ptr, flags_ptr, step, n, tuning_bucket, d, an, scale: tl.float64,
    INVERSE: tl.constexpr, NEGATIVE: tl.constexpr, D: tl.constexpr, D_SHIFT: tl.constexpr,
    AN: tl.constexpr, AN_SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    """exact_relax_ (h <- mul(h, B) + q), or with INVERSE exact_unrelax_ (h <- mul^-1(h - q, B))."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    h = tl.load(state_ptr + offsets, mask=mask, other=0)
    digits = tl.load(digits_ptr + offsets, mask=mask, other=0)
    q, code = _quantise(tl.load(f_ptr + offsets, mask=mask, other=0.0), scale)
    if INVERSE:
        h = h - q
        code = code | _out_of_range(h)
        h, digits = _divide(h, digits, d, an, NEGATIVE, D, D_SHIFT, AN, AN_SHIFT)
    else:
        h, digits = _multiply(h, digits, d, an, NEGATIVE, D, D_SHIFT, AN, AN_SHIFT)
        h = h + q
        code = code | _out_of_range(h)
    tl.store(state_ptr + offsets, h, mask=mask)
    tl.store(digits_ptr + offsets, digits, mask=mask)
    _flag(flags_ptr, step, code)


@triton.jit(do_not_specialize=["step", "tuning_bucket", "d", "an"])
def exact_row_sums_kernel(
    y_ptr, digits_ptr, z_ptr, f_ptr, flags_ptr, residual_partials_ptr, f_partials_ptr, step,
    n_rows, row_len, chunks_per_row, tuning_bucket, d, an, scale: tl.float64, unscale: tl.float64,
    NEGATIVE: tl.constexpr, D: tl.constexpr, D_SHIFT: tl.constexpr, AN: tl.constexpr,
    AN_SHIFT: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """exact_relax_ on y, and from the same load of f the float64 partial sums of
    (z * 2**-F - f)^2 and f^2, one per (row, chunk). Programs are laid out as in
    ``triton_kernels.row_sums_kernel``."""
    chunk, rows, row_mask, chunk_start, chunk_end, row_offsets = row_tile_of_program(
        n_rows, row_len, chunks_per_row, CHUNK, ROWS)
    residual_acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    f_acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    code_acc = tl.zeros([ROWS, COLS], dtype=tl.int32)
    for start in range(chunk_start, chunk_end, COLS):
        columns = start + tl.arange(0, COLS)
        mask = row_mask[:, None] & (columns < chunk_end)[None, :]
        offsets = row_offsets[:, None] + columns[None, :]
        f = tl.load(f_ptr + offsets, mask=mask, other=0.0)
        z = tl.load(z_ptr + offsets, mask=mask, other=0)
        h = tl.load(y_ptr + offsets, mask=mask, other=0)
        digits = tl.load(digits_ptr + offsets, mask=mask, other=0)
        f64 = _to_float64(f)
        diff = z.to(tl.float64) * unscale - f64  # exact product: a power-of-two scaling
        residual_acc += diff * diff
        f_acc += f64 * f64
        q, code = _quantise(f, scale)
        h, digits = _multiply(h, digits, d, an, NEGATIVE, D, D_SHIFT, AN, AN_SHIFT)
        h = h + q
        code_acc = code_acc | code | _out_of_range(h)
        tl.store(y_ptr + offsets, h, mask=mask)
        tl.store(digits_ptr + offsets, digits, mask=mask)
    store_row_partials(residual_partials_ptr, f_partials_ptr, residual_acc, f_acc, rows, row_mask, chunk,
                       chunks_per_row)
    _flag(flags_ptr, step, code_acc)


# ---------------------------------------------------------------------------- tuned launchers

@dataclass(frozen=True)
class ExactKernels:
    """The tuned launchers of one config set, and how the row sums are split."""

    elementwise: object
    row_sums: object
    row_chunk: int  # columns per partial sum of a long row
    partials_block: int = PARTIALS_BLOCK


def build_exact_kernels(elementwise_configs, row_configs, row_chunk: int, *,
                        partials_block: int = PARTIALS_BLOCK, restore_written: bool = True) -> ExactKernels:
    """Autotuned launchers. ``restore_written=False`` exists only so the tests can show
    that the in-place bug it prevents is real; never pass it elsewhere."""
    ratio_key = ["NEGATIVE", "D", "AN"]
    return ExactKernels(
        elementwise=tuned(exact_kernel, elementwise_configs, ["tuning_bucket", "INVERSE", *ratio_key],
                          ["state_ptr", "digits_ptr", "flags_ptr"], restore_written),
        row_sums=tuned(triton.heuristics(row_tile)(exact_row_sums_kernel), row_configs,
                       ["tuning_bucket", *ratio_key], ["y_ptr", "digits_ptr", "flags_ptr"], restore_written),
        row_chunk=row_chunk,
        partials_block=partials_block,
    )


DEFAULT_EXACT_KERNELS = build_exact_kernels(*default_configs())


def ratio_constants(numerator: int, denominator: int) -> dict:
    """The compile-time constants of 1 - beta = numerator/denominator: the sign, and each
    divisor as a constant (D, AN > 0) and a shift (D_SHIFT, AN_SHIFT >= 0, powers of two),
    or 0 and -1 where the kernel divides by the runtime value."""
    magnitude = abs(numerator)
    specialised = (magnitude, denominator) in SPECIALISED_RATIOS

    def constants(divisor: int) -> tuple[int, int]:
        if divisor & (divisor - 1) == 0:
            return divisor, divisor.bit_length() - 1
        return (divisor, -1) if specialised else (0, -1)

    (d_const, d_shift), (an_const, an_shift) = constants(denominator), constants(magnitude)
    return dict(NEGATIVE=numerator < 0, D=d_const, D_SHIFT=d_shift, AN=an_const, AN_SHIFT=an_shift)


def quantisation_scale(numerator: int, denominator: int, frac_bits: int) -> float:
    """beta * 2**frac_bits in float64, exactly as the reference computes it."""
    return math.ldexp((denominator - numerator) / denominator, frac_bits)


def _check_exact_tensors(op: str, state_name: str, state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor,
                         step, numerator, denominator, frac_bits, z: Tensor | None = None
                         ) -> tuple[Tensor, tuple[int, int, int, int]]:
    """check_exact, the device and the aliasing rule (checks.py); f_out returned contiguous
    (maybe a copy)."""
    check_device(state, state_name)
    args = check_exact(state_name, state, digits, f_out, flags, step, numerator, denominator, frac_bits)
    read = {"f_out": f_out} if z is None else {"z": z, "f_out": f_out}
    check_aliasing(op, {state_name: state, "digits": digits, "flags": flags}, read)
    return f_out.contiguous(), args


def launch_exact(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int, numerator: int,
                 denominator: int, frac_bits: int, inverse: bool, kernels: ExactKernels | None = None) -> None:
    kernels = kernels or DEFAULT_EXACT_KERNELS
    f, (step, numerator, denominator, frac_bits) = _check_exact_tensors(
        "exact_unrelax_" if inverse else "exact_relax_", "state", state, digits, f_out, flags, step, numerator,
        denominator, frac_bits)
    n = state.numel()
    assert state.is_contiguous() and digits.is_contiguous(), "the kernel writes through a flat index"
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        with device_guard(state):
            kernels.elementwise[grid](
                state, digits, f, flags, step, n, bucket(n), denominator, abs(numerator),
                quantisation_scale(numerator, denominator, frac_bits), INVERSE=bool(inverse),
                **ratio_constants(numerator, denominator), **LAUNCH_OPTIONS)
    torch.autograd.graph.increment_version([state, digits, flags])


def launch_exact_row_sums(y: Tensor, digits: Tensor, z: Tensor, f_out: Tensor, flags: Tensor, step: int,
                          numerator: int, denominator: int, frac_bits: int,
                          kernels: ExactKernels | None = None) -> tuple[Tensor, Tensor]:
    """exact_relax_ on (y, digits), and the per-row (dim 0) float64 sums of
    (z * 2**-frac_bits - f)^2 and f^2 from the same pass."""
    kernels = kernels or DEFAULT_EXACT_KERNELS
    check_read("z", z, "y", y, (torch.int64,))
    f, (step, numerator, denominator, frac_bits) = _check_exact_tensors(
        "exact_relax_residual_", "y", y, digits, f_out, flags, step, numerator, denominator, frac_bits, z)
    z = z.contiguous()
    batch = y.shape[0]
    row_len = y.numel() // batch if batch else 0
    if batch == 0 or row_len == 0:
        sums = (y.new_zeros(batch, dtype=torch.float64), y.new_zeros(batch, dtype=torch.float64))
    else:
        chunks_per_row = triton.cdiv(row_len, kernels.row_chunk)
        partials = [y.new_empty(batch * chunks_per_row, dtype=torch.float64) for _ in range(2)]
        assert y.is_contiguous() and digits.is_contiguous(), "the kernel writes through a flat index"
        grid = lambda meta: (triton.cdiv(batch, meta["ROWS"]) * chunks_per_row,)  # noqa: E731
        with device_guard(y):
            kernels.row_sums[grid](
                y, digits, z, f, flags, partials[0], partials[1], step, batch, row_len, chunks_per_row,
                bucket(batch, row_len), denominator, abs(numerator),
                quantisation_scale(numerator, denominator, frac_bits), math.ldexp(1.0, -frac_bits),
                CHUNK=kernels.row_chunk, **ratio_constants(numerator, denominator), **LAUNCH_OPTIONS)
            if chunks_per_row == 1:  # the partials are the sums: no second stage
                sums = (partials[0], partials[1])
            else:
                sums = (y.new_empty(batch, dtype=torch.float64), y.new_empty(batch, dtype=torch.float64))
                sum_partials_kernel[(batch,)](partials[0], partials[1], sums[0], sums[1], chunks_per_row,
                                              BLOCK=kernels.partials_block, num_warps=4)
    torch.autograd.graph.increment_version([y, digits, flags])
    return sums


# ---------------------------------------------------------------------------- registration

def exact_relax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int,
                 numerator: int, denominator: int, frac_bits: int) -> None:
    launch_exact(state, digits, f_out, flags, step, numerator, denominator, frac_bits, inverse=False)


def exact_unrelax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int,
                   numerator: int, denominator: int, frac_bits: int) -> None:
    launch_exact(state, digits, f_out, flags, step, numerator, denominator, frac_bits, inverse=True)


def exact_relax_residual_(y: Tensor, digits: Tensor, z: Tensor, f_out: Tensor, flags: Tensor, step: int,
                          numerator: int, denominator: int, frac_bits: int) -> tuple[Tensor, Tensor]:
    return launch_exact_row_sums(y, digits, z, f_out, flags, step, numerator, denominator, frac_bits)


IMPLEMENTATIONS = {
    "exact_relax_": exact_relax_,
    "exact_unrelax_": exact_unrelax_,
    "exact_relax_residual_": exact_relax_residual_,
}
register(IMPLEMENTATIONS)
