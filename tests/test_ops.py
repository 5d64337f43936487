"""Parity of every op on every available backend against the float64 reference.

Bounds are per element and follow the arithmetic: the kernels compute in float32
(float64 for float64 states) and round once into the written dtype, so the error of
``(1-b) a + b f`` is a few accumulation roundings of |(1-b) a| + |b f| plus one rounding
of the result. A kernel that drops a term, reads the wrong element or rounds through a
narrower type than allowed exceeds these bounds by orders of magnitude.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from revdeq_kernels import ops
from revdeq_kernels.ops import reference
from tests.helpers import (DTYPE_NAMES, ROUNDING, assert_close, assert_equal_bits, backend_device_pairs, bits,
                           misaligned_copy, pair_id, rounded)

PAIRS = backend_device_pairs()
DTYPE_MIXES = list(itertools.product(ops.STATE_DTYPES, ops.F_DTYPES))
# (2, 3, 7001): rows of 21003 elements span two of the C++ kernel's 16384-element reduction chunks, with a tail.
SHAPES = [(1,), (7,), (4097,), (3, 5, 7), (2, 4097), (2, 3, 7001)]
EMPTY_SHAPES = [(0,), (3, 0), (0, 5)]
BETAS = [0.8, 1.3]


def mix_id(mix) -> str:
    return f"{DTYPE_NAMES[mix[0]]}<-{DTYPE_NAMES[mix[1]]}"


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def make(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def acc_rounding(state_dtype) -> float:
    return ROUNDING[reference.accumulation_dtype(state_dtype)]


def on_float64(op, *args):
    """The reference ``op`` on float64 copies of the tensors in ``args``: (the copies,
    after the op wrote into them in place, and what it returned)."""
    copies = [a.to(torch.float64, copy=True) if isinstance(a, torch.Tensor) else a for a in args]
    return [c for c in copies if isinstance(c, torch.Tensor)], op(*copies)


def sums_bound(expected: torch.Tensor, row_len: int, state_dtype) -> torch.Tensor:
    # Sums of squares have no cancellation; blocked/pairwise accumulation errs ~sqrt(n) eps.
    return expected * acc_rounding(state_dtype) * 8 * (1 + math.sqrt(row_len)) + 1e-300


pytestmark = pytest.mark.parametrize("pair", PAIRS, ids=[pair_id(p) for p in PAIRS])


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mix", DTYPE_MIXES, ids=mix_id)
def test_relax_and_unrelax(pair, mix, shape, beta):
    backend, device = pair
    state_dtype, f_dtype = mix
    state, f = make(shape, state_dtype, device, 1), make(shape, f_dtype, device, 2)
    a, fv = state.double(), f.double()

    relaxed = state.clone()
    ops.relax_(relaxed, f, beta, backend=backend)
    (expected, _), _ = on_float64(reference.relax_, state, f, beta)
    bound = 4 * acc_rounding(state_dtype) * ((1 - beta) * a).abs().add(beta * fv.abs())
    assert_close(relaxed, expected, bound + rounded(state_dtype, expected), f"relax_ [{backend}]")

    restored = state.clone()
    ops.unrelax_(restored, f, beta, backend=backend)
    (expected, _), _ = on_float64(reference.unrelax_, state, f, beta)
    bound = 4 * acc_rounding(state_dtype) * (a.abs() + beta * fv.abs()) / abs(1 - beta)
    assert_close(restored, expected, bound + rounded(state_dtype, expected), f"unrelax_ [{backend}]")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mix", DTYPE_MIXES, ids=mix_id)
def test_relax_residual_and_norms(pair, mix, shape):
    backend, device = pair
    state_dtype, f_dtype = mix
    beta = 0.7
    y, z, f = (make(shape, state_dtype, device, 3), make(shape, state_dtype, device, 4),
               make(shape, f_dtype, device, 5))
    row_len = y.numel() // shape[0]
    (expected_y, _, _), (exp_res, exp_f) = on_float64(reference.relax_residual_, y, z, f, beta)
    diff = z.double() - f.double()
    # f_out may be wider than the accumulation dtype: rounding it before z - f cancels
    # shifts each (z - f)^2 by up to 2 |z - f| eps (|z| + |f|).
    input_rounding = 2 * acc_rounding(state_dtype) * (diff.abs() * (z.double().abs() + f.double().abs()))
    input_rounding = input_rounding.reshape(shape[0], -1).sum(1)
    acc = reference.accumulation_dtype(state_dtype)

    y_new = y.clone()
    sq_res, sq_f = ops.relax_residual_(y_new, z, f, beta, backend=backend)
    assert sq_res.dtype == acc and sq_f.dtype == acc and sq_res.shape == (shape[0],)
    res_bound = sums_bound(exp_res, row_len, state_dtype) + input_rounding
    assert_close(sq_res, exp_res, res_bound, f"relax_residual_ sum (z-f)^2 [{backend}]")
    assert_close(sq_f, exp_f, sums_bound(exp_f, row_len, state_dtype), f"relax_residual_ sum f^2 [{backend}]")
    bound = 4 * acc_rounding(state_dtype) * ((1 - beta) * y.double().abs() + beta * f.double().abs())
    assert_close(y_new, expected_y, bound + rounded(state_dtype, expected_y), f"relax_residual_ y [{backend}]")

    sq_res2, sq_f2 = ops.residual_norms(z, f, backend=backend)
    assert sq_res2.dtype == acc
    assert_close(sq_res2, exp_res, res_bound, f"residual_norms (z-f)^2 [{backend}]")
    assert_close(sq_f2, exp_f, sums_bound(exp_f, row_len, state_dtype), f"residual_norms f^2 [{backend}]")


@pytest.mark.parametrize("scale_after", [False, True], ids=["z-half", "y-half"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mix", DTYPE_MIXES, ids=mix_id)
def test_adjoint_accumulate(pair, mix, shape, scale_after):
    backend, device = pair
    state_dtype, f_dtype = mix
    beta = 0.6
    grad, vjp = make(shape, state_dtype, device, 6), make(shape, f_dtype, device, 7)
    cot = torch.full(shape, float("nan"), dtype=f_dtype, device=device)  # must be overwritten
    g, v = grad.double(), vjp.double()
    (exp_grad, _, exp_cot), _ = on_float64(reference.adjoint_accumulate_, grad, vjp, cot, beta, scale_after)
    terms = g.abs() + v.abs() if scale_after else (1 - beta) * g.abs() + v.abs()
    ops.adjoint_accumulate_(grad, vjp, cot, beta, scale_after, backend=backend)
    eps = acc_rounding(state_dtype)
    assert_close(grad, exp_grad, 4 * eps * terms + rounded(state_dtype, exp_grad), f"adjoint grad [{backend}]")
    # The cotangent may be formed from the rounded grad: allow that rounding too.
    cot_bound = (4 * eps + ROUNDING[state_dtype]) * beta * terms + rounded(f_dtype, exp_cot)
    assert_close(cot, exp_cot, cot_bound, f"adjoint cotangent [{backend}]")


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty_tensors(pair, shape):
    backend, device = pair
    state, f = torch.empty(shape, device=device), torch.empty(shape, device=device)
    ops.relax_(state, f, 0.5, backend=backend)
    ops.unrelax_(state, f, 0.5, backend=backend)
    sq_res, sq_f = ops.relax_residual_(state, state.clone(), f, 0.5, backend=backend)
    assert sq_res.shape == (shape[0],) and sq_f.shape == (shape[0],)
    assert bool((sq_res == 0).all()) and bool((sq_f == 0).all()), "empty rows must sum to 0"
    ops.adjoint_accumulate_(state, f, torch.empty_like(f), 0.5, True, backend=backend)


@pytest.mark.parametrize("mix", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                 (torch.bfloat16, torch.bfloat16)], ids=mix_id)
def test_inverse_round_trip(pair, mix):
    backend, device = pair
    state_dtype, f_dtype = mix
    beta = 0.8
    state, f = make((3, 4097), state_dtype, device, 8), make((3, 4097), f_dtype, device, 9)
    original = state.clone()
    ops.relax_(state, f, beta, backend=backend)
    ops.unrelax_(state, f, beta, backend=backend)
    # relax_ rounds once; unrelax_ amplifies that rounding by 1/|1-b| and rounds again.
    scale = original.double().abs() + beta * f.double().abs()
    bound = (ROUNDING[state_dtype] + 4 * acc_rounding(state_dtype)) * (1 + 1 / abs(1 - beta)) * scale
    assert_close(state, original, bound + rounded(state_dtype, original.double()), f"round trip [{backend}]")


def test_in_place_semantics(pair):
    backend, device = pair
    state, f = make((4, 33), torch.float32, device, 10), make((4, 33), torch.float32, device, 11)
    ptr, version, before = state.data_ptr(), state._version, state.clone()
    returned = ops.relax_(state, f, 0.5, backend=backend)
    assert returned is state and state.data_ptr() == ptr, "relax_ must write into the given tensor"
    assert state._version > version, "the version counter must move after an in-place write"
    assert not torch.equal(state, before), "relax_ did not change the state"
    grad, cot = state.clone(), torch.empty_like(f)
    version = cot._version
    ops.adjoint_accumulate_(grad, f, cot, 0.5, False, backend=backend)
    assert cot._version > version, "the cotangent is an output: its version counter must move"


def test_non_contiguous_inputs(pair):
    backend, device = pair
    wide = make((6, 40), torch.float32, device, 12)
    f = wide[:, ::2]  # non-contiguous read input: allowed
    state = make((6, 20), torch.float32, device, 13)
    expected = state.clone()
    reference.relax_(expected, f.contiguous(), 0.3)
    ops.relax_(state, f, 0.3, backend=backend)
    assert_close(state, expected, 1e-6, f"relax_ with a strided f_out [{backend}]")
    written = make((20, 6), torch.float32, device, 14).t()
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.relax_(written, f.contiguous(), 0.3, backend=backend)


def test_opcheck(pair):
    backend, device = pair
    from revdeq_kernels.ops._library import op
    from revdeq_kernels.ops.dispatch import namespace_of

    ns = namespace_of(backend)
    s, z, f = (make((3, 9), torch.float32, device, i) for i in (15, 16, 17))
    cases = {
        "relax_": (s, f, 0.5), "unrelax_": (s, f, 0.5), "relax_residual_": (s, z, f, 0.5),
        "residual_norms": (z, f), "adjoint_accumulate_": (s, f, torch.empty_like(f), 0.5, True),
    }
    for name, args in cases.items():
        results = torch.library.opcheck(op(ns, name), args)
        failed = {k: v for k, v in results.items() if v != "SUCCESS"}
        assert not failed, f"opcheck {ns}::{name}: {failed}"


def test_compile_fullgraph(pair):
    """The ops are opaque to torch.compile: fake implementations let it trace a function
    that calls them without graph breaks (aot_eager also functionalizes the mutation)."""
    backend, device = pair
    torch._dynamo.reset()

    def step(y, z, f):
        sq_res, sq_f = ops.relax_residual_(y, z, f, 0.5, backend=backend)
        return sq_res.sqrt() / (1e-5 + sq_f.sqrt())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y, z, f = (make((2, 16), torch.float32, device, i) for i in (18, 19, 20))
    y_eager = y.clone()
    expected = step(y_eager, z, f)
    got = compiled(y, z, f)
    assert_close(got, expected, 1e-6, f"compiled residual [{backend}]")
    assert_close(y, y_eager, 1e-6, f"compiled in-place update [{backend}]")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float32, torch.float16),
                                    (torch.float32, torch.float16, torch.bfloat16)],
                         ids=lambda d: "grad_{}-vjp_{}-cot_{}".format(*(DTYPE_NAMES[t] for t in d)))
def test_adjoint_cotangent_dtype_differs_from_vjp(pair, dtypes):
    """Under autocast the cotangent f receives and the vjp it returns differ in dtype."""
    backend, device = pair
    grad_dtype, vjp_dtype, cot_dtype = dtypes
    beta = 0.6
    grad, vjp = make((3, 1001), grad_dtype, device, 21), make((3, 1001), vjp_dtype, device, 22)
    cot = torch.full((3, 1001), float("nan"), dtype=cot_dtype, device=device)
    g, v = grad.double(), vjp.double()
    exp_grad, exp_cot = (1 - beta) * (g + v), beta * (g + v)
    ops.adjoint_accumulate_(grad, vjp, cot, beta, True, backend=backend)
    eps = acc_rounding(grad_dtype)
    terms = g.abs() + v.abs()
    assert_close(grad, exp_grad, 4 * eps * terms + rounded(grad_dtype, exp_grad), f"adjoint grad [{backend}]")
    assert_close(cot, exp_cot, 4 * eps * beta * terms + rounded(cot_dtype, exp_cot), f"adjoint cotangent [{backend}]")


@pytest.mark.parametrize("mix", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float64, torch.float32)], ids=mix_id)
def test_misaligned_views(pair, mix):
    """Contiguous views at an odd element offset: vector kernels must take their unaligned
    path for the written tensor and the inputs alike."""
    backend, device = pair
    state_dtype, f_dtype = mix
    state_buf, f_buf = make((4 * 333 + 1,), state_dtype, device, 23), make((4 * 333 + 3,), f_dtype, device, 24)
    state, f = state_buf[1:].view(4, 333), f_buf[3:].view(4, 333)
    untouched = state_buf[0].clone()
    expected = state.double() * 0.5 + f.double() * 0.5
    ops.relax_(state, f, 0.5, backend=backend)
    bound = 4 * acc_rounding(state_dtype) * (0.5 * state.double().abs() + 0.5 * f.double().abs())
    assert_close(state, expected, bound + rounded(state_dtype, expected), f"relax_ on an offset view [{backend}]")
    assert torch.equal(state_buf[0], untouched), "relax_ wrote before the start of an offset view"
    y, z = make((4 * 333 + 1,), state_dtype, device, 25)[1:].view(4, 333), make((4, 333), state_dtype, device, 26)
    sq_res, sq_f = ops.relax_residual_(y, z, f, 0.5, backend=backend)
    exp_f = f.double().square().sum(1)
    assert_close(sq_f, exp_f, sums_bound(exp_f, 333, state_dtype), f"sum f^2 on offset views [{backend}]")


# op: its tensors, each misaligned alone in turn while the others stay 16-byte aligned
ONE_MISALIGNED = {"relax_": ("state", "f"), "unrelax_": ("state", "f"), "relax_residual_": ("y", "z", "f"),
                  "adjoint_accumulate_": ("grad", "vjp", "cot")}


@pytest.mark.parametrize("mix", [(torch.float32, torch.float32), (torch.float64, torch.bfloat16)], ids=mix_id)
@pytest.mark.parametrize("case", [(op, t) for op, names in ONE_MISALIGNED.items() for t in names], ids="-".join)
def test_one_misaligned_tensor_among_aligned_ones(pair, case, mix):
    """A vector path needs every pointer aligned: with one tensor an element into its buffer
    and the rest aligned, each element gets the aligned run's bits (the scalar and vector
    paths compute alike) and the sums agree to rounding. A kernel that checks some pointers
    only reads or writes that tensor misaligned: a wrong result, a fault on the GPU."""
    backend, device = pair
    op, misaligned = case
    state_dtype, f_dtype = mix
    shape = (3, 333)
    dtypes = {"state": state_dtype, "y": state_dtype, "z": state_dtype, "grad": state_dtype, "f": f_dtype,
              "vjp": f_dtype, "cot": f_dtype}
    names = ONE_MISALIGNED[op]
    values = {name: make(shape, dtypes[name], device, 40 + i) for i, name in enumerate(names)}
    args = {"relax_": (0.5,), "unrelax_": (0.5,), "relax_residual_": (0.5,), "adjoint_accumulate_": (0.5, True)}[op]
    runs = []
    for which in (None, misaligned):
        tensors = [misaligned_copy(values[name], name == which) for name in names]
        returned = getattr(ops, op)(*tensors, *args, backend=backend)
        runs.append((tensors, returned))
    (aligned, aligned_sums), (shifted, shifted_sums) = runs
    for name, a, b in zip(names, aligned, shifted):
        assert_equal_bits(bits(b), bits(a), f"{op} {name} with {misaligned} misaligned vs all aligned [{backend}]")
    if op == "relax_residual_":
        for a, b, what in zip(aligned_sums, shifted_sums, ("sum (z-f)^2", "sum f^2")):
            assert_close(b, a, sums_bound(a, shape[1], state_dtype), f"{op} {what} with {misaligned} misaligned [{backend}]")
