"""The reversal="exact" ops on every backend: bit-identical to the reference, exactly
invertible over long runs (digit planes rotated as the solver rotates them), flags for
non-finite and out-of-range values, and the torch.library contract (opcheck, compile)."""

from __future__ import annotations

import pytest
import torch

from revdeq_kernels import fixed_point as fp
from revdeq_kernels import ops
from revdeq_kernels.ops import reference
from tests.helpers import DTYPE_NAMES, assert_close, assert_equal_bits, backend_device_pairs, misaligned_copy, pair_id

PAIRS = backend_device_pairs()
BETAS = [0.5, 0.8, 0.25, 0.75, 1.2]
F_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
SHAPES = [(1,), (3, 7), (2, 4097), (5, 1, 3)]
FRAC_BITS = 32

pytestmark = pytest.mark.parametrize("pair", PAIRS, ids=[pair_id(p) for p in PAIRS])


def make(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def ratio_args(beta):
    r = fp.beta_ratio(beta)
    return r.numerator, r.denominator, FRAC_BITS




@pytest.mark.parametrize("f_dtype", F_DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("beta", BETAS)
def test_round_trip_is_bit_exact_and_matches_the_reference(pair, beta, f_dtype):
    """N forward updates of y and z (as the solver runs them, planes rotated when full), then
    N inverses: the states and the planes come back bit for bit, and every forward step
    wrote the reference's bits."""
    backend, device = pair
    args = ratio_args(beta)
    capacity = fp.plane_capacity(fp.beta_ratio(beta))
    # Under the interpreter a launch takes ~5 ms: one case runs the full 1000 steps, the
    # others run just past one plane (the rotation) to keep the suite short.
    interpreted = backend == "triton" and device == "cpu"
    steps = capacity + 5 if interpreted and (beta, f_dtype) != (0.8, torch.float32) else 1000
    shape = (3, 7)
    start = fp.to_fixed(make(shape, torch.float64, device, 0, 3.0), FRAC_BITS)
    fs = [make(shape, f_dtype, device, 100 + n) for n in range(8)]  # reused cyclically: cheap and varied
    h, planes = start.clone(), fp.DigitPlanes.empty_like(start, capacity)
    h_ref, planes_ref = start.clone(), fp.DigitPlanes.empty_like(start, capacity)
    flags = torch.zeros(steps, dtype=torch.int32, device=device)
    for n in range(steps):
        f = fs[n % len(fs)]
        ops.exact_relax_(h, planes.before_forward(), f, flags, n, *args, backend=backend)
        reference.exact_relax_(h_ref, planes_ref.before_forward(), f, flags.clone(), n, *args)
        if n % 97 == 0 or n == steps - 1:
            assert_equal_bits(h, h_ref, f"exact_relax_ state at step {n} [{backend}, beta={beta}]")
            assert_equal_bits(planes.current, planes_ref.current, f"digits at step {n} [{backend}]")
    assert len(planes.full) == (steps - 1) // capacity, "the planes were not rotated as the capacity says"
    emptied = []
    for n in reversed(range(steps)):
        ops.exact_unrelax_(h, planes.current, fs[n % len(fs)], flags, n, *args, backend=backend)
        planes.after_inverse(emptied)
    assert_equal_bits(h, start, f"state after {steps} forward and {steps} inverse steps [{backend}, beta={beta}]")
    for i, plane in enumerate(emptied + [planes.current]):
        assert not bool(plane.any()), f"digit plane {i} is not empty after the round trip [{backend}]"
    assert not bool(flags.any()), f"flags set on valid input: {flags.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes_and_fused_residual(pair, shape):
    backend, device = pair
    args = ratio_args(0.8)
    y = fp.to_fixed(make(shape, torch.float64, device, 1), FRAC_BITS)
    z = fp.to_fixed(make(shape, torch.float64, device, 2), FRAC_BITS)
    f = make(shape, torch.float32, device, 3)
    digits = make(shape, torch.float64, device, 4).abs().mul(1e6).to(torch.int64)
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    y_ref, digits_ref = y.clone(), digits.clone()
    sums = ops.exact_relax_residual_(y, digits, z, f, flags, 1, *args, backend=backend)
    expected = reference.exact_relax_residual_(y_ref, digits_ref, z, f, flags.clone(), 1, *args)
    assert_equal_bits(y, y_ref, f"exact_relax_residual_ y [{backend}]")
    assert_equal_bits(digits, digits_ref, f"exact_relax_residual_ digits [{backend}]")
    for got, want, name in zip(sums, expected, ("sum (z - f)^2", "sum f^2")):
        assert got.dtype == torch.float64 and got.shape == (shape[0],)
        assert_close(got, want, 1e-12 * want.abs() + 1e-300, f"{name} [{backend}]")


def test_empty(pair):
    backend, device = pair
    for shape in [(0,), (3, 0)]:
        h = torch.zeros(shape, dtype=torch.int64, device=device)
        flags = torch.zeros(1, dtype=torch.int32, device=device)
        ops.exact_relax_(h, torch.zeros_like(h), torch.zeros(shape, device=device), flags, 0, 1, 5, 32,
                         backend=backend)
        sums = ops.exact_relax_residual_(h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros(shape, device=device),
                                         flags, 0, 1, 5, 32, backend=backend)
        assert sums[0].shape == (shape[0],) and not bool(flags.any())


def test_flags_name_what_went_wrong(pair):
    backend, device = pair
    f = torch.tensor([1.0, float("nan"), 2.0, float("inf")], device=device)
    h = torch.zeros(4, dtype=torch.int64, device=device)
    flags = torch.zeros(3, dtype=torch.int32, device=device)
    ops.exact_relax_(h, torch.zeros_like(h), f, flags, 1, *ratio_args(0.8), backend=backend)
    assert flags.tolist() == [0, fp.FLAG_NONFINITE, 0], f"non-finite f_out: flags {flags.tolist()} [{backend}]"
    assert h[1].item() == 0 and h[3].item() == 0, "a non-finite lane must add 0"
    huge = torch.tensor([1e12, 1.0], device=device)  # 0.2 * 1e12 * 2^32 > 2^62
    h = torch.zeros(2, dtype=torch.int64, device=device)
    flags.zero_()
    ops.exact_unrelax_(h, torch.zeros_like(h), huge, flags, 2, *ratio_args(0.8), backend=backend)
    assert flags.tolist() == [0, 0, fp.FLAG_RANGE], f"out-of-range f_out: flags {flags.tolist()} [{backend}]"
    # beta = 1.5: h' = -0.5 h + 1.5 f = 0.495 R + 0.9 R with both terms in range R = 2^30
    limit = fp.range_limit(FRAC_BITS)
    h = fp.to_fixed(torch.full((2,), -0.99 * limit, dtype=torch.float64, device=device), FRAC_BITS)
    flags.zero_()
    ops.exact_relax_(h, torch.zeros_like(h), torch.full((2,), 0.6 * limit, device=device), flags, 0,
                     *ratio_args(1.5), backend=backend)
    assert flags.tolist() == [fp.FLAG_RANGE, 0, 0], "a state pushed past 2^62 must be flagged"


def test_bad_arguments(pair):
    backend, device = pair
    h = torch.zeros(4, dtype=torch.int64, device=device)
    f = torch.zeros(4, device=device)
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    cases = [
        ((h.float(), torch.zeros_like(h), f, flags, 0, 1, 5, 32), TypeError, "state has dtype"),
        ((h, torch.zeros(3, dtype=torch.int64, device=device), f, flags, 0, 1, 5, 32), ValueError, "digits has shape"),
        ((h, torch.zeros_like(h), f, flags, 2, 1, 5, 32), ValueError, "step 2 is outside flags"),
        ((h, torch.zeros_like(h), f, flags, 0, 5, 5, 32), ValueError, "0 < |numerator| < denominator"),
        ((h, torch.zeros_like(h), f, flags.long(), 0, 1, 5, 32), TypeError, "flags has dtype"),
        ((h, torch.zeros_like(h), f, flags, 0, 1, 5, 63), ValueError, "frac_bits"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message.replace("|", r"\|")):
            ops.exact_relax_(*args, backend=backend)


def test_opcheck(pair):
    backend, device = pair
    from revdeq_kernels.ops._library import op
    from revdeq_kernels.ops.dispatch import namespace_of

    ns = namespace_of(backend)
    y = fp.to_fixed(make((3, 9), torch.float64, device, 5), FRAC_BITS)
    z = fp.to_fixed(make((3, 9), torch.float64, device, 6), FRAC_BITS)
    f = make((3, 9), torch.float32, device, 7)
    flags = torch.zeros(4, dtype=torch.int32, device=device)
    digits = torch.zeros_like(y)
    cases = {
        "exact_relax_": (y, digits, f, flags, 1, 1, 5, 32), "exact_unrelax_": (y, digits, f, flags, 1, 1, 5, 32),
        "exact_relax_residual_": (y, digits, z, f, flags, 1, 1, 5, 32),
    }
    for name, args in cases.items():
        results = torch.library.opcheck(op(ns, name), args)
        failed = {k: v for k, v in results.items() if v != "SUCCESS"}
        assert not failed, f"opcheck {ns}::{name}: {failed}"


def test_compile_fullgraph(pair):
    backend, device = pair
    torch._dynamo.reset()

    def step(y, digits, z, f, flags):
        sq_res, sq_f = ops.exact_relax_residual_(y, digits, z, f, flags, 0, 1, 5, 32, backend=backend)
        ops.exact_relax_(z, digits, f, flags, 1, 1, 5, 32, backend=backend)
        return sq_res.sqrt() / (1e-5 + sq_f.sqrt())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = fp.to_fixed(make((2, 16), torch.float64, device, 8), FRAC_BITS)
    z = fp.to_fixed(make((2, 16), torch.float64, device, 9), FRAC_BITS)
    f = make((2, 16), torch.float32, device, 10)
    eager = [t.clone() for t in (y, torch.zeros_like(y), z)]
    flags, flags_eager = (torch.zeros(2, dtype=torch.int32, device=device) for _ in range(2))
    expected = step(*eager[:2], eager[2], f, flags_eager)
    state = [y.clone(), torch.zeros_like(y), z.clone()]
    got = compiled(*state[:2], state[2], f, flags)
    assert_close(got, expected, 1e-12, f"compiled residual [{backend}]")
    for a, b, name in zip(state, eager, ("y", "digits", "z")):
        assert_equal_bits(a, b, f"compiled in-place {name} [{backend}]")


@pytest.mark.parametrize("misaligned", ["y", "digits", "z", "f"])
def test_one_misaligned_tensor_among_aligned_ones(pair, misaligned):
    """One tensor an element into its buffer, the others 16-byte aligned: the reference's bits
    (a kernel that tests some pointers only would take a vector path on that one)."""
    backend, device = pair
    args = ratio_args(0.8)
    shape = (3, 333)
    y0 = fp.to_fixed(make(shape, torch.float64, device, 1), FRAC_BITS)
    z = misaligned_copy(fp.to_fixed(make(shape, torch.float64, device, 2), FRAC_BITS), misaligned == "z")
    f = misaligned_copy(make(shape, torch.float32, device, 3), misaligned == "f")
    digits0 = make(shape, torch.float64, device, 4).abs().mul(1e6).to(torch.int64)
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    y, digits = misaligned_copy(y0, misaligned == "y"), misaligned_copy(digits0, misaligned == "digits")
    sums = ops.exact_relax_residual_(y, digits, z, f, flags, 1, *args, backend=backend)
    y_ref, digits_ref = y0.clone(), digits0.clone()
    expected = reference.exact_relax_residual_(y_ref, digits_ref, z, f, flags.clone(), 1, *args)
    assert_equal_bits(y, y_ref, f"exact_relax_residual_ y, {misaligned} misaligned [{backend}]")
    assert_equal_bits(digits, digits_ref, f"exact_relax_residual_ digits, {misaligned} misaligned [{backend}]")
    for got, want, name in zip(sums, expected, ("sum (z - f)^2", "sum f^2")):
        assert_close(got, want, 1e-12 * want.abs() + 1e-300, f"{name}, {misaligned} misaligned [{backend}]")
    if misaligned != "z":  # exact_relax_ has no z
        h = misaligned_copy(y0, misaligned == "y")
        planes = misaligned_copy(digits0, misaligned == "digits")
        ops.exact_relax_(h, planes, f, flags, 0, *args, backend=backend)
        h_ref, planes_ref = y0.clone(), digits0.clone()
        reference.exact_relax_(h_ref, planes_ref, f, flags.clone(), 0, *args)
        assert_equal_bits(h, h_ref, f"exact_relax_ state, {misaligned} misaligned [{backend}]")
        assert_equal_bits(planes, planes_ref, f"exact_relax_ digits, {misaligned} misaligned [{backend}]")
