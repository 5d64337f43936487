"""The Triton kernels of the revdeq ops (launched by ``triton_ops.py``).

Every kernel loads its inputs, converts them to the accumulation dtype ``ACC`` (float64 for
a float64 state, else float32), computes, and rounds once into the written dtype. beta
arrives as a float64 scalar and is converted to ``ACC`` in the kernel, so float64 states
see beta to the last bit. Offsets are int64: ``program_id * BLOCK`` overflows int32 past
2^31 elements. Sums never use atomics: a row is cut into fixed chunks, each program
writes one partial per (row, chunk), and ``sum_partials_kernel`` adds them in a fixed
order, so the result does not depend on scheduling. ``tuning_bucket`` is not read by the
kernels: it is the autotuning key (the size rounded to a power of two), so a new size
reuses the tuned config of its bucket instead of benchmarking again.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _float32_to_bfloat16(x):
    # Round to nearest even on the bit pattern, NaN to the canonical quiet NaN (as torch
    # does). Written by hand because Triton's interpreter truncates float32 -> bfloat16
    # instead of rounding; the same code runs compiled, so CI tests the bits a GPU writes.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1)).to(tl.uint32)
    upper = tl.where(x != x, 0x7FC0, rounded >> 16)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_into(x, DST: tl.constexpr):
    """x (float32 or float64) rounded into DST. float64 -> 16-bit goes through float32,
    as torch's own conversions do, so the written bits match ``Tensor.copy_``."""
    if DST == tl.bfloat16:
        return _float32_to_bfloat16(x.to(tl.float32))
    elif DST == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    else:
        return x.to(DST)


@triton.jit
def _divide(numerator, denominator, ACC: tl.constexpr):
    # A float32 "/" compiles to an approximate division (2 ulp); the inverse update must
    # round like the reference. float64 division is always correctly rounded.
    if ACC == tl.float32:
        return tl.math.div_rn(numerator, denominator)
    else:
        return numerator / denominator


@triton.jit
def _load_block(a_ptr, b_ptr, n, one_minus_beta, beta, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of the two elementwise inputs, in ACC, with its offsets (int64),
    mask and the coefficients 1-b and b cast to ACC."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(a_ptr + offsets, mask=mask).to(ACC)
    b = tl.load(b_ptr + offsets, mask=mask).to(ACC)
    return offsets, mask, a, b, tl.full([], one_minus_beta, ACC), tl.full([], beta, ACC)


@triton.jit(do_not_specialize=["tuning_bucket"])
def relax_kernel(
    state_ptr, f_ptr, n, tuning_bucket, one_minus_beta: tl.float64, beta: tl.float64,
    INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """state <- (1-b) state + b f, or with INVERSE state <- (state - b f) / (1-b)."""
    offsets, mask, state, f, keep, b = _load_block(state_ptr, f_ptr, n, one_minus_beta, beta, ACC, BLOCK)
    if INVERSE:
        out = _divide(state - b * f, keep, ACC)
    else:
        out = keep * state + b * f
    tl.store(state_ptr + offsets, _round_into(out, state_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tuning_bucket"])
def adjoint_kernel(
    grad_ptr, vjp_ptr, cotangent_ptr, n, tuning_bucket, one_minus_beta: tl.float64, beta: tl.float64,
    SCALE_AFTER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """SCALE_AFTER: s = g + v, g <- (1-b) s, c <- b s.  Else: g <- (1-b) g + v, c <- b g.
    The cotangent is formed from the unrounded total, as in the reference."""
    offsets, mask, grad, vjp, keep, b = _load_block(grad_ptr, vjp_ptr, n, one_minus_beta, beta, ACC, BLOCK)
    if SCALE_AFTER:
        total = grad + vjp
        new_grad = keep * total
    else:
        total = keep * grad + vjp
        new_grad = total
    tl.store(grad_ptr + offsets, _round_into(new_grad, grad_ptr.dtype.element_ty), mask=mask)
    tl.store(cotangent_ptr + offsets, _round_into(b * total, cotangent_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_tile_of_program(n_rows, row_len, chunks_per_row, CHUNK: tl.constexpr, ROWS: tl.constexpr):
    """The tile of a row-sums program: the ROWS rows ``rows`` (``row_mask``: those below
    n_rows), columns [chunk_start, chunk_end) of each, ``row_offsets`` their first elements."""
    program = tl.program_id(0).to(tl.int64)
    chunk = program % chunks_per_row
    rows = (program // chunks_per_row) * ROWS + tl.arange(0, ROWS)
    chunk_start = chunk * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, row_len)
    return chunk, rows, rows < n_rows, chunk_start, chunk_end, rows * row_len


@triton.jit
def store_row_partials(residual_partials_ptr, f_partials_ptr, residual_acc, f_acc, rows, row_mask, chunk,
                       chunks_per_row):
    """Each row's partial sums of its chunk, at [row, chunk] of the (rows, chunks_per_row)
    partials that ``sum_partials_kernel`` adds up."""
    partials = rows * chunks_per_row + chunk
    tl.store(residual_partials_ptr + partials, tl.sum(residual_acc, axis=1), mask=row_mask)
    tl.store(f_partials_ptr + partials, tl.sum(f_acc, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=["tuning_bucket"])
def row_sums_kernel(
    y_ptr, z_ptr, f_ptr, residual_partials_ptr, f_partials_ptr, n_rows, row_len, chunks_per_row,
    tuning_bucket, one_minus_beta: tl.float64, beta: tl.float64,
    UPDATE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """One program per (block of ROWS rows, chunk of CHUNK columns): partial sums of
    (z - f)^2 and f^2, one per row; with UPDATE also y <- (1-b) y + b f from the same load
    of f. Short rows share a program (ROWS > 1) and a long row spreads over several
    chunks, so neither many tiny rows nor one huge row runs on a handful of programs."""
    chunk, rows, row_mask, chunk_start, chunk_end, row_offsets = row_tile_of_program(
        n_rows, row_len, chunks_per_row, CHUNK, ROWS)
    residual_acc = tl.zeros([ROWS, COLS], dtype=ACC)
    f_acc = tl.zeros([ROWS, COLS], dtype=ACC)
    b = tl.full([], beta, ACC)
    keep = tl.full([], one_minus_beta, ACC)
    for start in range(chunk_start, chunk_end, COLS):
        columns = start + tl.arange(0, COLS)
        mask = row_mask[:, None] & (columns < chunk_end)[None, :]
        offsets = row_offsets[:, None] + columns[None, :]
        f = tl.load(f_ptr + offsets, mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC)
        if UPDATE:
            y = tl.load(y_ptr + offsets, mask=mask).to(ACC)
            tl.store(y_ptr + offsets, _round_into(keep * y + b * f, y_ptr.dtype.element_ty), mask=mask)
        diff = z - f
        residual_acc += diff * diff
        f_acc += f * f
    store_row_partials(residual_partials_ptr, f_partials_ptr, residual_acc, f_acc, rows, row_mask, chunk,
                       chunks_per_row)


@triton.jit
def sum_partials_kernel(
    residual_partials_ptr, f_partials_ptr, residual_out_ptr, f_out_ptr, chunks_per_row,
    BLOCK: tl.constexpr,
):
    """Second stage of the row sums: one program per row adds its chunk partials, always
    in the same order (deterministic, no atomics)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * chunks_per_row
    lanes = tl.arange(0, BLOCK)
    residual_acc = tl.zeros([BLOCK], dtype=residual_out_ptr.dtype.element_ty)
    f_acc = tl.zeros([BLOCK], dtype=f_out_ptr.dtype.element_ty)
    for start in range(0, chunks_per_row, BLOCK):
        mask = start + lanes < chunks_per_row
        residual_acc += tl.load(residual_partials_ptr + base + start + lanes, mask=mask, other=0.0)
        f_acc += tl.load(f_partials_ptr + base + start + lanes, mask=mask, other=0.0)
    tl.store(residual_out_ptr + row, tl.sum(residual_acc, axis=0))
    tl.store(f_out_ptr + row, tl.sum(f_acc, axis=0))
