"""Triton-specific checks that tests/test_ops.py (parity of every op on every backend) does
not make: autotuning applies an in-place update exactly once, long rows are split over
many programs and summed in a fixed order, 16-bit stores round to nearest even bit for
bit, and the reversal="exact" kernels tune and round the same way. Runs under the
interpreter on CPU, on the GPU when there is one; the kernels' GPU build is checked
without a GPU in tests/test_triton_build.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import triton  # noqa: E402

from revdeq_kernels import fixed_point as fp, ops  # noqa: E402

if not ops.backends()["triton"].available:  # e.g. an interpreter that cannot run the kernels
    pytest.skip(f"the triton backend is unavailable: {ops.backends()['triton'].reason}", allow_module_level=True)

from revdeq_kernels.ops import reference, triton_exact as te, triton_launch, triton_ops as tk  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEVICE = "cpu" if triton_launch.INTERPRETED else "cuda"
BETA = 0.5

# Several configs, so the tuner really benchmarks; tiny blocks keep the interpreter fast.
if triton_launch.INTERPRETED:
    ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=1) for b in (64, 128, 256)]
    ROW_CONFIGS = [triton.Config({"TILE": t}, num_warps=1) for t in (32, 64)]
else:
    ELEMENTWISE_CONFIGS, ROW_CONFIGS = triton_launch.GPU_ELEMENTWISE_CONFIGS, triton_launch.GPU_ROW_CONFIGS


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _relax(kernels, t):
    tk.launch_relax(t["state"], t["f"], BETA, False, kernels)


def _unrelax(kernels, t):
    tk.launch_relax(t["state"], t["f"], BETA, True, kernels)


def _relax_residual(kernels, t):
    t["sums"] = tk.launch_row_sums(t["state"], t["z"], t["f"], BETA, kernels)


def _relax_residual_reference(t):
    t["sums"] = reference.relax_residual_(t["state"], t["z"], t["f"], BETA)


def _adjoint(kernels, t):
    tk.launch_adjoint(t["state"], t["f"], t["cotangent"], BETA, True, kernels)


UPDATES = {  # op -> (launch through a given kernel set, the reference, its tuned kernel)
    "relax_": (_relax, lambda t: reference.relax_(t["state"], t["f"], BETA), "relax"),
    "unrelax_": (_unrelax, lambda t: reference.unrelax_(t["state"], t["f"], BETA), "relax"),
    "relax_residual_": (_relax_residual, _relax_residual_reference, "row_sums"),
    "adjoint_accumulate_": (
        _adjoint, lambda t: reference.adjoint_accumulate_(t["state"], t["f"], t["cotangent"], BETA, True),
        "adjoint"),
}


def _tensors():
    shape = (3, 1000)
    return {"state": make(shape, seed=1), "f": make(shape, seed=2), "z": make(shape, seed=3),
            "cotangent": torch.zeros(shape, device=DEVICE)}


def _clone(tensors):
    return {k: v.clone() for k, v in tensors.items()}


def _tuned_kernels(restore_written=True):
    # A fresh kernel set: its tuners have no cached choice, so the first call benchmarks.
    return tk.build_kernels(ELEMENTWISE_CONFIGS, ROW_CONFIGS, row_chunk=256, partials_block=4,
                            restore_written=restore_written)


def test_every_op_has_exactly_one_triton_kernel_registered():
    """triton_ops.py (float ops) and triton_exact.py (exact ops) register disjoint halves of
    the schemas, together all of them, for CUDA tensors and the interpreter's CPU tensors."""
    float_ops, exact_ops = set(tk.IMPLEMENTATIONS), set(te.IMPLEMENTATIONS)
    assert not float_ops & exact_ops, f"ops with two Triton kernels: {sorted(float_ops & exact_ops)}"
    missing = sorted(set(ops.SCHEMAS) - float_ops - exact_ops)
    assert not missing, f"ops without a Triton kernel: {missing}"
    for name in ops.SCHEMAS:
        op = getattr(torch.ops.revdeq_triton, name).default
        missing = [key for key in ("CUDA", "CPU") if not op.has_kernel_for_dispatch_key(key)]
        assert not missing, f"revdeq_triton::{name} has no kernel for {missing}"


@pytest.mark.parametrize("name", list(UPDATES))
def test_autotuning_applies_an_in_place_update_once(name):
    launch, apply_reference, tuner_name = UPDATES[name]
    inputs = _tensors()
    expected = _clone(inputs)
    apply_reference(expected)

    kernels = _tuned_kernels()
    got = _clone(inputs)
    launch(kernels, got)
    tuner = getattr(kernels, tuner_name)
    assert len(tuner.configs_timings) == len(tuner.configs) > 1, (
        f"{name}: the tuner benchmarked {len(tuner.configs_timings)} of {len(tuner.configs)} configs")
    for key in ("state", "cotangent"):
        assert_close(got[key], expected[key], 1e-6 * (1 + expected[key].abs()),
                     f"{name} [{key}] after autotuning with {len(tuner.configs)} configs")
    for got_sum, expected_sum in zip(got.get("sums", ()), expected.get("sums", ())):
        assert_close(got_sum, expected_sum, 1e-5 * expected_sum, f"{name} sums after autotuning")
    # Later calls use the cached choice: still exactly one application per call.
    launch(kernels, got)
    apply_reference(expected)
    assert_close(got["state"], expected["state"], 1e-5 * (1 + expected["state"].abs()),
                 f"{name}, second call")


@pytest.mark.parametrize("name", ["relax_", "adjoint_accumulate_"])
def test_autotuning_without_restoring_would_repeat_the_update(name):
    """The control for the test above: with the snapshot/restore off, tuning visibly
    applies the update many times, so the test above can fail."""
    launch, apply_reference, _ = UPDATES[name]
    inputs = _tensors()
    expected = _clone(inputs)
    apply_reference(expected)
    got = _clone(inputs)
    launch(_tuned_kernels(restore_written=False), got)
    gap = float((got["state"] - expected["state"]).abs().max())
    assert gap > 1e-2, f"{name}: tuning without restore_value changed nothing extra (max gap {gap:.3g})"


def test_sizes_in_one_power_of_two_bucket_share_one_tuning():
    kernels = _tuned_kernels()
    for n in (1000, 700, 513):  # all in (512, 1024]
        state, f = make((n,), seed=n), make((n,), seed=n + 1)
        expected = state.clone()
        reference.relax_(expected, f, BETA)
        tk.launch_relax(state, f, BETA, False, kernels)
        assert_close(state, expected, 1e-6 * (1 + expected.abs()), f"relax_ of {n} elements")
    assert len(kernels.relax.cache) == 1, f"tuned {len(kernels.relax.cache)} times for one size bucket"
    tk.launch_relax(make((1025,)), make((1025,), seed=1), BETA, False, kernels)
    assert len(kernels.relax.cache) == 2, "a size in the next bucket did not get its own tuning"


EXACT_RATIO = fp.beta_ratio(0.8)  # 1 - beta = 1/5: a constant divisor
EXACT_FRAC_BITS = 32


def _exact_tensors():
    shape = (3, 1000)
    g = torch.Generator().manual_seed(11)
    f = torch.randn(shape, generator=g, dtype=torch.float64)
    f[1, 17] = 1e30  # |q| >= 2**62: flag 2, so the flags are written too
    return {"state": fp.to_fixed(make(shape, torch.float64, 12), EXACT_FRAC_BITS),
            "digits": torch.randint(0, 2**40, shape, generator=g, dtype=torch.int64).to(DEVICE),
            "f": f.to(device=DEVICE, dtype=torch.float32),
            "z": fp.to_fixed(make(shape, torch.float64, 13), EXACT_FRAC_BITS),
            "flags": torch.zeros(8, dtype=torch.int32, device=DEVICE)}


def _exact_args(t):
    return (t["f"], t["flags"], 3, EXACT_RATIO.numerator, EXACT_RATIO.denominator, EXACT_FRAC_BITS)


EXACT_UPDATES = {  # op -> (launch through a given kernel set, the reference, its tuned kernel)
    "exact_relax_": (
        lambda kernels, t: te.launch_exact(t["state"], t["digits"], *_exact_args(t), False, kernels),
        lambda t: reference.exact_relax_(t["state"], t["digits"], *_exact_args(t)), "elementwise"),
    "exact_unrelax_": (
        lambda kernels, t: te.launch_exact(t["state"], t["digits"], *_exact_args(t), True, kernels),
        lambda t: reference.exact_unrelax_(t["state"], t["digits"], *_exact_args(t)), "elementwise"),
    "exact_relax_residual_": (
        lambda kernels, t: t.update(sums=te.launch_exact_row_sums(
            t["state"], t["digits"], t["z"], *_exact_args(t), kernels)),
        lambda t: t.update(sums=reference.exact_relax_residual_(t["state"], t["digits"], t["z"], *_exact_args(t))),
        "row_sums"),
}


def _tuned_exact_kernels(restore_written=True):
    # row_chunk=256: a 1000-element row spreads over 4 chunks, whose partials a second stage adds.
    return te.build_exact_kernels(ELEMENTWISE_CONFIGS, ROW_CONFIGS, row_chunk=256, partials_block=4,
                                  restore_written=restore_written)


def _assert_exact_equal(got, expected, what):
    for key in ("state", "digits", "flags"):
        assert torch.equal(got[key], expected[key]), (
            f"{what} [{key}]: {int((got[key] != expected[key]).sum())} elements differ from the reference")
    for got_sum, expected_sum in zip(got.get("sums", ()), expected.get("sums", ())):
        assert_close(got_sum, expected_sum, 1e-12 * expected_sum, f"{what} sums")


@pytest.mark.parametrize("name", list(EXACT_UPDATES))
def test_autotuning_applies_an_exact_update_once(name):
    """The exact kernels write the state, its digit plane and the flags: all three are
    restored after each trial, so the tuned call writes the reference's bits."""
    launch, apply_reference, tuner_name = EXACT_UPDATES[name]
    inputs = _exact_tensors()
    expected = _clone(inputs)
    apply_reference(expected)
    assert int(expected["flags"][3]) == 2, "the test input should set the range flag"

    kernels = _tuned_exact_kernels()
    got = _clone(inputs)
    launch(kernels, got)
    tuner = getattr(kernels, tuner_name)
    assert len(tuner.configs_timings) == len(tuner.configs) > 1, (
        f"{name}: the tuner benchmarked {len(tuner.configs_timings)} of {len(tuner.configs)} configs")
    _assert_exact_equal(got, expected, f"{name} after autotuning with {len(tuner.configs)} configs")
    launch(kernels, got)  # the cached choice: still one application per call
    apply_reference(expected)
    _assert_exact_equal(got, expected, f"{name}, second call")


@pytest.mark.parametrize("name", ["exact_relax_", "exact_relax_residual_"])
def test_exact_autotuning_without_restoring_would_repeat_the_update(name):
    """The control for the test above: without restore_value the digits take one digit
    per trial, so the test above can fail."""
    launch, apply_reference, _ = EXACT_UPDATES[name]
    inputs = _exact_tensors()
    expected = _clone(inputs)
    apply_reference(expected)
    got = _clone(inputs)
    launch(_tuned_exact_kernels(restore_written=False), got)
    assert not torch.equal(got["state"], expected["state"]) and not torch.equal(got["digits"], expected["digits"]), (
        f"{name}: tuning without restore_value changed nothing extra")


ROW_SPLITS = {  # id -> (kernel set, shape)
    "long-rows-many-chunks": (  # 4 chunks a row, added in 2 steps by the second stage
        lambda: tk.build_kernels(ELEMENTWISE_CONFIGS[:1], ROW_CONFIGS[-1:], row_chunk=256, partials_block=2),
        (3, 1000)),
    "short-rows-shared-tile-and-chunks": (
        lambda: tk.build_kernels(ELEMENTWISE_CONFIGS[:1], [triton.Config({"TILE": 256}, num_warps=1)],
                                 row_chunk=64, partials_block=2), (5, 100)),  # 2 rows a tile, 2 chunks
    "default-one-long-row": (lambda: tk.DEFAULT_KERNELS, (1, 3 * tk.DEFAULT_KERNELS.row_chunk + 5)),
}


@pytest.mark.parametrize("split", list(ROW_SPLITS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_row_sums_split_over_programs(split, state_dtype):
    build, shape = ROW_SPLITS[split]
    kernels = build()
    z, f = make(shape, state_dtype, 4), make(shape, torch.bfloat16, 5)
    y = make(shape, state_dtype, 6)
    chunks = triton.cdiv(shape[1], kernels.row_chunk)
    assert split.startswith("default") or chunks > 1, f"{split}: the row is not split ({chunks} chunk)"

    y_new = y.clone()
    sq_res, sq_f = tk.launch_row_sums(y_new, z, f, BETA, kernels)
    diff = z.double() - f.double()
    exp_res, exp_f = diff.square().sum(1), f.double().square().sum(1)
    eps = 1e-15 if state_dtype == torch.float64 else 1e-6
    assert sq_res.dtype == reference.accumulation_dtype(state_dtype) and sq_res.shape == (shape[0],)
    assert_close(sq_res, exp_res, eps * exp_res, f"{split}: sum (z-f)^2 over {chunks} chunks")
    assert_close(sq_f, exp_f, eps * exp_f, f"{split}: sum f^2 over {chunks} chunks")
    expected_y = y.clone()
    reference.relax_(expected_y, f, BETA)
    assert torch.equal(y_new, expected_y), f"{split}: the fused y-update differs from the reference"

    again = tk.launch_row_sums(None, z, f, 0.0, kernels)
    assert torch.equal(again[0], sq_res) and torch.equal(again[1], sq_f), (
        f"{split}: the two-stage sums are not reproducible bit for bit")


def _float32_rounding_cases() -> torch.Tensor:
    """float32 values at and around every bfloat16 rounding boundary, and the specials."""
    g = torch.Generator().manual_seed(7)
    upper = torch.randint(0, 1 << 16, (512,), generator=g, dtype=torch.int64) << 16
    low_bits = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF])  # 0x8000: a tie
    bits = (upper[:, None] | low_bits[None, :]).flatten()
    special = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x00008000, 0x00018000,
                            0x807F8000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x3F808000, 0x3F818000])
    bits = torch.cat([bits, special]).to(torch.int32)  # wraps to the same 32 bits
    values = bits.view(torch.float32)
    return values[values != 0]  # 0 * state + (-0.0) is +0.0 in any backend; not a rounding case


@pytest.mark.parametrize("value, tuned", [("1", True), ("0", False), (None, True)])
def test_the_autotune_switch_keeps_every_gpu_config_or_the_first(monkeypatch, value, tuned):
    monkeypatch.setattr(triton_launch, "INTERPRETED", False)
    if value is None:
        monkeypatch.delenv(triton_launch.ENV_AUTOTUNE, raising=False)
    else:
        monkeypatch.setenv(triton_launch.ENV_AUTOTUNE, value)
    elementwise, rows, chunk = triton_launch.default_configs()
    want = (triton_launch.GPU_ELEMENTWISE_CONFIGS, triton_launch.GPU_ROW_CONFIGS) if tuned else (
        triton_launch.GPU_ELEMENTWISE_CONFIGS[:1], triton_launch.GPU_ROW_CONFIGS[:1])
    assert (elementwise, rows, chunk) == (*want, triton_launch.GPU_ROW_CHUNK), (
        f"{triton_launch.ENV_AUTOTUNE}={value}: {elementwise}, {rows}")


def test_a_bad_autotune_switch_names_the_variable(monkeypatch):
    monkeypatch.setattr(triton_launch, "INTERPRETED", False)
    monkeypatch.setenv(triton_launch.ENV_AUTOTUNE, "yes")
    with pytest.raises(ValueError, match="REVDEQ_TRITON_AUTOTUNE='yes': must be 1 .* or 0"):
        triton_launch.default_configs()


def test_bfloat16_stores_round_to_nearest_even():
    """Triton's interpreter truncates float32 -> bfloat16; the kernels round by hand."""
    f = _float32_rounding_cases().to(DEVICE)
    state = torch.ones_like(f, dtype=torch.bfloat16)
    ops.relax_(state, f, 1.0, backend="triton")  # state <- 0 * state + f, rounded into bf16
    expected = f.to(torch.bfloat16)
    both_nan = state.isnan() & expected.isnan()
    mismatch = (state.view(torch.int16) != expected.view(torch.int16)) & ~both_nan
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())}/{f.numel()} bf16 stores differ from torch's rounding, e.g. "
        f"{f[mismatch][:4].tolist()} -> {state[mismatch][:4].tolist()} "
        f"instead of {expected[mismatch][:4].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_float64_to_16_bit_stores_match_torch(dtype):
    """float64 accumulations written into a 16-bit cotangent round like Tensor.to."""
    grad = make((4, 777), torch.float64, 8) * 3.0
    grad[0, :6] = torch.tensor([1 + 2.0**-8, 1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-11, 1 + 2.0**-11 + 2.0**-40,
                                6e4, 1e-6], dtype=torch.float64)  # ties and near-ties in float64
    expected = grad.to(dtype)
    cotangent = torch.empty_like(grad, dtype=dtype)
    # beta = 1, scale_after: grad <- 0 * (grad + 0), cotangent <- 1 * (grad + 0)
    ops.adjoint_accumulate_(grad, torch.zeros_like(grad), cotangent, 1.0, True, backend="triton")
    mismatch = cotangent.view(torch.int16) != expected.view(torch.int16)
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())}/{grad.numel()} float64 -> {dtype} stores differ from Tensor.to, e.g. "
        f"{cotangent[mismatch][:4].tolist()} instead of {expected[mismatch][:4].tolist()}")


def test_direct_calls_reject_overlap_and_strided_outputs():
    from revdeq_kernels.ops._library import NAMESPACES, op

    ns = NAMESPACES["triton"]
    base = make((2, 8))
    with pytest.raises(ValueError, match="overlap"):
        op(ns, "relax_")(base.view(-1)[:8].view(1, 8), base.view(-1)[4:12].view(1, 8), 0.5)
    grad = make((2, 8))
    with pytest.raises(ValueError, match="cotangent is grad itself"):
        op(ns, "adjoint_accumulate_")(grad, make((2, 8)), grad, 0.5, True)
    with pytest.raises(ValueError, match="must be contiguous"):
        op(ns, "relax_")(make((8, 2)).t(), make((2, 8)), 0.5)
    same = make((2, 8))
    expected = same.clone()
    reference.relax_(expected, expected.clone(), 0.5)
    op(ns, "relax_")(same, same, 0.5)  # the same tensor read and written is elementwise-safe
    assert torch.equal(same, expected), "relax_(state, state) differs from the reference"


def test_every_written_tensor_moves_its_version_counter():
    y, z, f = make((2, 8)), make((2, 8), seed=1), make((2, 8), seed=2)
    for name, call in {
        "unrelax_": lambda: ops.unrelax_(y, f, 0.5, backend="triton"),
        "relax_residual_": lambda: ops.relax_residual_(y, z, f, 0.5, backend="triton"),
        "adjoint_accumulate_ (grad)": lambda: ops.adjoint_accumulate_(y, f, z, 0.5, False, backend="triton"),
    }.items():
        version = y._version
        call()
        assert y._version > version, f"{name}: the written tensor's version counter did not move"
