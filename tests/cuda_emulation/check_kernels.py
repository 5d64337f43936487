"""Checks of the CUDA kernels that the shared parity suite does not make, run by
tests/test_cuda_emulated.py with the kernels emulated on the host as the "cpp" backend (not
collected otherwise: the file name does not start with test_).

- The per-sample sums depend on the shapes, dtypes and alignment only, never on the grid
  (kernels.cu's design): the same bits from one block to hundreds, for rows of one task,
  of many tasks per warp and split into kChunk chunks (16384 elements).
- The reversal="exact" kernels on rows split into chunks: the reference's bits for the
  state, digits and flags (a NaN in the last element, far from block 0's thread 0), its sums
  to rounding.
- Each with one tensor at a time on a misaligned pointer (the others aligned): every
  tensor's alignment must send the kernel to its scalar path.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from revdeq_kernels import fixed_point as fp
from revdeq_kernels import ops
from revdeq_kernels.ops import reference
from tests.helpers import assert_close, assert_equal_bits, bits, misaligned_copy

if getattr(sys.modules.get("revdeq_kernels._C"), "CPU_ISA", None) != "CUDA-EMULATED":
    pytest.skip("runs only with -p tests.cuda_emulation.plugin", allow_module_level=True)

# Launch::resident_threads: one block, two, sixteen, 256 (the grid-stride loops and the
# chunk partials span blocks differently in each)
RESIDENT = [256, 512, 4096, 65536]
# rows x cols: many short rows per warp, one row per team, rows of 2 and 3 chunks
SHAPES = [(64, 7), (5, 333), (3, 16384 + 5), (2, 3 * 16384 - 9)]
FRAC_BITS = 32


def make(shape, dtype, seed, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    return misaligned_copy(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), misaligned)


def on_grids(run):
    """run() under each resident-thread count; the results, in RESIDENT's order."""
    results = []
    try:
        for resident in RESIDENT:
            os.environ["REVDEQ_EMULATED_RESIDENT_THREADS"] = str(resident)
            results.append(run())
    finally:
        os.environ.pop("REVDEQ_EMULATED_RESIDENT_THREADS", None)
    return results


def assert_same_on_every_grid(results, what):
    first = results[0]
    for resident, result in zip(RESIDENT[1:], results[1:]):
        for a, b, name in zip(first, result, ("y", "sum (z-f)^2", "sum f^2")):
            assert_equal_bits(bits(b), bits(a), f"{what}: {name} with {resident} resident threads vs {RESIDENT[0]}")


@pytest.mark.parametrize("misaligned", ["none", "y", "z", "f"])
@pytest.mark.parametrize("mix", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                 (torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda m: f"{str(m[0])[6:]}-{str(m[1])[6:]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float_sums_do_not_depend_on_the_grid(shape, mix, misaligned):
    state_dtype, f_dtype = mix
    y0, z, f = make(shape, state_dtype, 1), make(shape, state_dtype, 2, misaligned == "z"), make(
        shape, f_dtype, 3, misaligned == "f")

    def run():
        y = misaligned_copy(y0, misaligned == "y")
        return (y, *ops.relax_residual_(y, z, f, 0.7, backend="cpp"))

    results = on_grids(run)
    assert_same_on_every_grid(results, f"relax_residual_ {shape}")
    exp_res, exp_f = reference.residual_norms(z.double(), f.double())
    acc_eps = torch.finfo(reference.accumulation_dtype(state_dtype)).eps
    bound = 8 * acc_eps * (1 + shape[1] ** 0.5)  # sums of squares: no cancellation
    got_res, got_f = results[0][1], results[0][2]
    input_rounding = (2 * acc_eps * (z.double() - f.double()).abs()
                      * (z.double().abs() + f.double().abs())).sum(1)
    assert_close(got_res, exp_res, bound * exp_res + input_rounding, f"sum (z-f)^2 {shape}")
    assert_close(got_f, exp_f, bound * exp_f, f"sum f^2 {shape}")


@pytest.mark.parametrize("misaligned", ["none", "y", "digits", "z", "f"])
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_residual_on_every_grid_is_the_reference(shape, f_dtype, misaligned):
    r = fp.beta_ratio(0.8)
    args = (r.numerator, r.denominator, FRAC_BITS)
    y0 = fp.to_fixed(make(shape, torch.float64, 1), FRAC_BITS)
    z = misaligned_copy(fp.to_fixed(make(shape, torch.float64, 2), FRAC_BITS), misaligned == "z")
    f = make(shape, f_dtype, 3, misaligned == "f")
    f[-1, -1] = float("nan")  # a flag to OR in from the last element: the last block's, or a tail's
    digits0 = make(shape, torch.float64, 4).abs().mul(1e6).to(torch.int64)
    flags0 = torch.zeros(2, dtype=torch.int32)

    def run():
        y, digits, flags = misaligned_copy(y0, misaligned == "y"), misaligned_copy(digits0, misaligned == "digits"), flags0.clone()
        sums = ops.exact_relax_residual_(y, digits, z, f, flags, 1, *args, backend="cpp")
        return y, *sums, digits, flags

    results = on_grids(run)
    assert_same_on_every_grid([r[:3] for r in results], f"exact_relax_residual_ {shape}")
    y_ref, digits_ref, flags_ref = y0.clone(), digits0.clone(), flags0.clone()
    exp_res, exp_f = reference.exact_relax_residual_(y_ref, digits_ref, z, f, flags_ref, 1, *args)
    for resident, (y, res, sq_f, digits, flags) in zip(RESIDENT, results):
        where = f"{shape}, {resident} resident threads"
        assert_equal_bits(y, y_ref, f"exact_relax_residual_ y ({where})")
        assert_equal_bits(digits, digits_ref, f"exact_relax_residual_ digits ({where})")
        assert flags.tolist() == flags_ref.tolist(), f"flags {flags.tolist()}, reference {flags_ref.tolist()} ({where})"
        assert_close(res[:-1], exp_res[:-1], 1e-12 * exp_res[:-1].abs() + 1e-300, f"sum (z-f)^2 ({where})")
        assert_close(sq_f[:-1], exp_f[:-1], 1e-12 * exp_f[:-1].abs() + 1e-300, f"sum f^2 ({where})")
        assert bool(res[-1].isnan()) and bool(sq_f[-1].isnan()), f"the last row's sums hide its NaN ({where})"
