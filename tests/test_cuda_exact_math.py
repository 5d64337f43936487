"""The CUDA exact kernels' element arithmetic (csrc/cuda/exact_math.cuh), compiled for the host
by tests/exact_math_host.cpp and run on the CPU: no GPU has run exact.cu, so this is where its
bits are checked against the reference. Every ratio class the kernels dispatch on (compile-time
constants, power-of-two shifts, run-time reciprocals, |n| = 1, a negative n), both directions,
valid states and the edges: rounding ties, NaN/Inf, |q| and |h| at 2^62, corrupted states and
digit planes (which must wrap as torch's int64 ops do, never be undefined behaviour: the driver
is built with -fsanitize=undefined where the compiler has it). What stays unchecked is the
header's few device-only lines (__dmul_rn, __dsub_rn, rint, __umul64hi, __double_as_longlong),
each the documented equivalent of the host line beside it."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from revdeq_kernels.ops import reference
from tests.helpers import build_host_program

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "exact_math_host.cpp"
IN = np.dtype([("h", "<i8"), ("digits", "<i8"), ("f", "<f8"), ("z", "<i8")])
OUT = np.dtype([("h", "<i8"), ("digits", "<i8"), ("flags", "<i4"), ("unused", "<i4"), ("res", "<f8"),
                ("sq_f", "<f8")])
# (numerator, denominator) of 1 - beta: the six compile-time pairs of exact_math::with_divisors,
# power-of-two d with |n| = 1 and > 1, run-time divisors, negative n (beta > 1), d = 64
RATIOS = [(1, 2), (1, 4), (3, 4), (1, 5), (4, 5), (1, 10), (1, 8), (1, 64), (3, 8), (63, 64), (1, 3),
          (2, 3), (5, 7), (11, 63), (-1, 2), (-1, 5), (-3, 7), (-4, 5)]
FRAC_BITS = [16, 32, 48]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_host_program(DRIVER, tmp_path_factory.mktemp("exact_math_host"))


def run_driver(driver: Path, tmp: Path, records: np.ndarray, numerator: int, denominator: int, frac_bits: int,
               inverse: bool, divisors: str) -> np.ndarray:
    src, dst = tmp / "in.bin", tmp / "out.bin"
    records.tofile(src)
    done = subprocess.run([str(driver), str(numerator), str(denominator), str(frac_bits), str(int(inverse)),
                           divisors, str(src), str(dst)], capture_output=True, text=True)
    assert done.returncode == 0, f"exact_math_host failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return np.fromfile(dst, dtype=OUT)


def reference_element(h: int, digits: int, f: float, numerator: int, denominator: int, frac_bits: int,
                      inverse: bool) -> tuple[int, int, int]:
    state, planes = torch.tensor([h], dtype=torch.int64), torch.tensor([digits], dtype=torch.int64)
    flags = torch.zeros(1, dtype=torch.int32)
    op = reference.exact_unrelax_ if inverse else reference.exact_relax_
    op(state, planes, torch.tensor([f], dtype=torch.float64), flags, 0, numerator, denominator, frac_bits)
    return int(state), int(planes), int(flags)


def valid_records(numerator: int, denominator: int, frac_bits: int, seed: int) -> np.ndarray:
    """States of magnitude up to 2^(frac_bits + 8), digit planes with a few hundred steps'
    digits, f from several scales, and f on exact rounding ties of f * scale."""
    rng = np.random.default_rng(seed)
    n = 600
    records = np.zeros(n, dtype=IN)
    records["h"] = rng.integers(-(2 ** (frac_bits + 8)), 2 ** (frac_bits + 8), n)
    records["digits"] = rng.integers(0, 2**40, n)
    f = rng.standard_normal(n) * np.exp2(rng.integers(-20, 8, n))
    f[:100] = f[:100].astype(np.float32)  # float32 f, as the kernels mostly see it
    scale = math.ldexp((denominator - numerator) / denominator, frac_bits)
    ties = (rng.integers(-1000, 1000, 100) + 0.5) / scale  # exact ties where scale is a power of 2
    f[100:200] = ties
    records["f"] = f
    records["z"] = rng.integers(-(2**62) + 1, 2**62, n)
    return records


def edge_records(frac_bits: int) -> np.ndarray:
    big = 2**62
    limit = math.ldexp(1.0, 62 - frac_bits)  # |f * scale| near 2^62 for beta near 1
    values = [
        (0, 0, 0.0, 0), (1, 1, -0.0, -1), (big - 1, 0, 0.0, big - 1), (-(big - 1), 0, 0.0, -(big - 1)),
        (big - 1, 0, 1.0, 0), (-(big - 1), 0, -1.0, 0), (big, 0, 0.0, 0), (-big, 3, 0.0, 0),
        (0, 0, math.nan, 0), (5, 7, math.inf, 5), (5, 7, -math.inf, 5), (3, 0, 1e300, 0), (3, 0, -1e300, 0),
        (0, 0, limit, 0), (0, 0, -limit, 0), (0, 0, 2 * limit, 0), (0, 0, 4 * limit, 0),
        (0, 0, 5e-324, 0), (0, 0, -2.2250738585072014e-308, 0),
        # corrupted states and planes: torch's int64 ops wrap, and so must the kernels
        (-(2**63), 0, 0.0, -(2**63)), (2**63 - 1, 0, 0.0, 2**63 - 1), (7, -1, 0.5, 0), (7, -(2**63), 0.5, 0),
        (-7, 2**62, -0.5, 0), (2**63 - 1, 2**63 - 1, 1.0, 0), (-(2**63), -(2**63), -1.0, 0),
        # sums past int64 once q is added (relax) or taken away (unrelax), at frac_bits = 62
        (2**63 - 1, 0, 3.0, 0), (-(2**63), 0, -3.0, 0), (2**63 - 1, 0, -3.0, 0), (-(2**63), 0, 3.0, 0),
    ]
    return np.array(values, dtype=IN)


def describe(i, records, got, want) -> str:
    r = records[i]
    return (f"element {i}: h={int(r['h'])} digits={int(r['digits'])} f={float(r['f'])!r}: "
            f"host (h, digits, flags) = {got}, reference = {want}")


@pytest.mark.parametrize("divisors", ["kernel", "magic"])
@pytest.mark.parametrize("inverse", [False, True], ids=["relax", "unrelax"])
@pytest.mark.parametrize("frac_bits", FRAC_BITS)
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"{r[0]}_{r[1]}")
def test_host_build_of_the_cuda_element_math_matches_the_reference(driver, tmp_path, ratio, frac_bits,
                                                                    inverse, divisors):
    numerator, denominator = ratio
    records = valid_records(numerator, denominator, frac_bits, seed=denominator * 100 + numerator + frac_bits)
    out = run_driver(driver, tmp_path, records, numerator, denominator, frac_bits, inverse, divisors)

    # the states and planes against the reference, run once over the whole batch
    state, planes = torch.from_numpy(records["h"].copy()), torch.from_numpy(records["digits"].copy())
    flags = torch.zeros(1, dtype=torch.int32)
    op = reference.exact_unrelax_ if inverse else reference.exact_relax_
    op(state, planes, torch.from_numpy(records["f"].copy()), flags, 0, numerator, denominator, frac_bits)
    wrong = np.flatnonzero((out["h"] != state.numpy()) | (out["digits"] != planes.numpy()))
    assert wrong.size == 0, f"{wrong.size} of {len(records)} elements differ; first: " + describe(
        wrong[0], records, (int(out["h"][wrong[0]]), int(out["digits"][wrong[0]])),
        (int(state[wrong[0]]), int(planes[wrong[0]])))
    assert int(np.bitwise_or.reduce(out["flags"])) == int(flags), "flags differ on valid input"

    # the residual terms, bit for bit: (z * 2^-F - f)^2 and f^2 in float64
    grid = math.ldexp(1.0, -frac_bits)
    z, f = torch.from_numpy(records["z"].copy()), torch.from_numpy(records["f"].copy())
    diff = z.to(torch.float64) * grid - f
    for name, want in [("res", diff * diff), ("sq_f", f * f)]:
        got = torch.from_numpy(out[name].copy())
        assert torch.equal(got.view(torch.int64), want.view(torch.int64)), (
            f"residual term {name}: max difference {(got - want).abs().max().item():.3g}")


@pytest.mark.parametrize("divisors", ["kernel", "magic"])
@pytest.mark.parametrize("inverse", [False, True], ids=["relax", "unrelax"])
@pytest.mark.parametrize("ratio", [(1, 2), (4, 5), (3, 8), (2, 3), (-1, 5), (-3, 7), (63, 64)],
                         ids=lambda r: f"{r[0]}_{r[1]}")
def test_host_build_of_the_cuda_element_math_on_edges(driver, tmp_path, ratio, inverse, divisors):
    """Element by element, flags included: each edge is its own reference call."""
    numerator, denominator = ratio
    for frac_bits in (0, 32, 62):
        records = edge_records(frac_bits)
        out = run_driver(driver, tmp_path, records, numerator, denominator, frac_bits, inverse, divisors)
        for i, r in enumerate(records):
            want = reference_element(int(r["h"]), int(r["digits"]), float(r["f"]), numerator, denominator,
                                     frac_bits, inverse)
            got = (int(out["h"][i]), int(out["digits"][i]), int(out["flags"][i]))
            assert got == want, f"frac_bits={frac_bits}: " + describe(i, records, got, want)
