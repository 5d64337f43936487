"""The install built what CI expects, and the portable CPU kernels run and are right.

The compiled extensions are optional (a missing one is reported by ``rk.backends()`` and the
torch backend is used), so by default their absence skips these tests. CI (``.ci/run``)
sets ``REVDEQ_EXPECT_NATIVE=1`` and, when it has a CUDA toolkit,
``REVDEQ_EXPECT_CUDA_BUILD=1``: then a missing or broken extension fails here instead of
silently leaving every op on the pure-PyTorch backend. The CUDA extension is only built and
imported here (CI has no GPU); its kernels run in tests/test_ops.py when a GPU is present.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from revdeq_kernels.ops import SCHEMAS, dispatch

REPO_ROOT = Path(__file__).resolve().parents[1]


def expected(var: str) -> bool:
    return os.environ.get(var, "0").lower() in ("1", "true", "yes", "on")


def import_or_fail(module: str, var: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"{var}=1 but {module} does not import: {error}")


def ops_without_kernel(dispatch_key: str) -> list[str]:
    return [name for name in SCHEMAS
            if not getattr(torch.ops.revdeq_native, name).default.has_kernel_for_dispatch_key(dispatch_key)]


@pytest.mark.skipif(not expected("REVDEQ_EXPECT_NATIVE"),
                    reason="REVDEQ_EXPECT_NATIVE is not set: the C++ CPU extension is optional")
def test_cpu_extension_is_built_and_registered():
    module = import_or_fail("revdeq_kernels._C", "REVDEQ_EXPECT_NATIVE")
    assert module.CPU_ISA in ("AVX2", "DEFAULT"), f"revdeq_kernels._C.CPU_ISA is {module.CPU_ISA!r}"
    missing = ops_without_kernel("CPU")
    assert not missing, f"revdeq_kernels._C imported but registered no CPU kernel for {missing}"


@pytest.mark.skipif(not expected("REVDEQ_EXPECT_CUDA_BUILD"),
                    reason="REVDEQ_EXPECT_CUDA_BUILD is not set: the CUDA extension is optional")
def test_cuda_extension_is_built_and_registered():
    import_or_fail("revdeq_kernels._C_cuda", "REVDEQ_EXPECT_CUDA_BUILD")
    missing = ops_without_kernel("CUDA")
    assert not missing, f"revdeq_kernels._C_cuda imported but registered no CUDA kernel for {missing}"


# Runs in a fresh interpreter: ATEN_CPU_CAPABILITY is read once, when the kernel table is
# first chosen. Shapes: short rows (< one vector block), rows with a tail, and rows longer
# than the 16384-element chunk of the per-row sums (3 chunks, the last one partial).
DEFAULT_ISA_CHECK = r"""
import math
import torch
import revdeq_kernels._C as native_module
from revdeq_kernels.ops import reference

assert native_module.CPU_ISA == "DEFAULT", (
    f"ATEN_CPU_CAPABILITY=default but the {native_module.CPU_ISA} kernels were chosen")
native = torch.ops.revdeq_native
EPS = 2.0 ** -52


def check(name, got, want, bound):
    err = (got - want).abs()
    bound = bound + EPS * want.abs()  # plus one rounding of the result
    worst = int((err - bound).flatten().argmax())
    assert bool((err <= bound).all()), (
        f"{name}: {int((err > bound).sum())}/{err.numel()} elements off; worst at flat index "
        f"{worst}: got {got.flatten()[worst].item():.17g}, want {want.flatten()[worst].item():.17g}, "
        f"|diff| {err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g}")


g = torch.Generator().manual_seed(0)
for shape in [(1,), (9, 3), (5, 19), (3, 5, 7), (2, 2 * 16384 + 37)]:
    rand = lambda: torch.randn(shape, generator=g, dtype=torch.float64)
    state, f, z, vjp = rand(), rand(), rand(), rand()
    row_len = state.numel() // shape[0]
    for beta in (0.8, 1.3):
        # Bounds: a few roundings of the terms combined (|(1-b) a| + |b f|, and so on).
        relax_terms = 4 * EPS * (abs(1 - beta) * state.abs() + beta * f.abs())
        got, want = state.clone(), state.clone()
        native.relax_(got, f, beta)
        reference.relax_(want, f, beta)
        check(f"relax_ {shape} beta={beta}", got, want, relax_terms)
        got, want = state.clone(), state.clone()
        native.unrelax_(got, f, beta)
        reference.unrelax_(want, f, beta)
        check(f"unrelax_ {shape} beta={beta}", got, want,
              4 * EPS * (state.abs() + beta * f.abs()) / abs(1 - beta))

        got_y, want_y = state.clone(), state.clone()
        got_sums = native.relax_residual_(got_y, z, f, beta)
        want_sums = reference.relax_residual_(want_y, z, f, beta)
        check(f"relax_residual_ y {shape} beta={beta}", got_y, want_y, relax_terms)
        for which, got_s, want_s in zip(("(z-f)^2", "f^2"), got_sums, want_sums):
            assert got_s.dtype == torch.float64 and got_s.shape == (shape[0],), (got_s.dtype, got_s.shape)
            check(f"relax_residual_ sum {which} {shape}", got_s, want_s,
                  8 * EPS * (1 + math.sqrt(row_len)) * want_s)

        for scale_after in (False, True):
            got_g, want_g = state.clone(), state.clone()
            got_c, want_c = torch.full_like(f, math.nan), torch.full_like(f, math.nan)
            native.adjoint_accumulate_(got_g, vjp, got_c, beta, scale_after)
            reference.adjoint_accumulate_(want_g, vjp, want_c, beta, scale_after)
            g_abs = state.abs() if scale_after else abs(1 - beta) * state.abs()
            terms = 4 * EPS * (g_abs + vjp.abs())
            what = f"{shape} beta={beta} scale_after={scale_after}"
            check(f"adjoint grad {what}", got_g, want_g, terms)
            check(f"adjoint cotangent {what}", got_c, want_c, 2 * beta * terms)
print("DEFAULT kernels match the reference")
"""


def test_default_isa_kernels_match_reference():
    try:
        importlib.import_module("revdeq_kernels._C")
    except ImportError as error:
        pytest.skip(f"the C++ CPU extension is not built: {error}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", DEFAULT_ISA_CHECK], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"the DEFAULT-ISA check failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    assert "DEFAULT kernels match the reference" in done.stdout, done.stdout


def numpy_converts_one_element_arrays() -> bool:
    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(np.ones(1))
        except TypeError:
            return False
    return True


@pytest.mark.parametrize("version, before_the_fix", [("3.5.1", True), ("3.6.0", True), ("3.7.0", False),
                                                    ("3.8.0+git4f2e1c", False), ("3.10.0", False)])
def test_the_triton_interpreter_defect_is_reported_only_where_it_bites(version, before_the_fix):
    # triton < 3.7 under a numpy that refuses int() of a one-element array: the row sums'
    # loop bounds fail inside the interpreter (seen with torch 2.11's triton 3.6, numpy 2.4)
    bites = before_the_fix and not numpy_converts_one_element_arrays()
    defect = dispatch.interpreter_defect(version)
    assert (defect is not None) == bites, f"triton {version}: interpreter_defect said {defect!r}"
    if bites:
        assert f"triton {version}" in defect and "triton>=3.7" in defect, defect


@pytest.mark.parametrize("version, too_old", [("3.0.0", True), ("3.2.0", True), ("3.5.1", True),
                                             ("3.6.0", False), ("3.8.0+git4f2e1c", False), ("3.10.0", False)])
def test_a_triton_that_breaks_the_rounding_contract_is_too_old(version, too_old):
    # triton 3.0/3.1 (torch 2.4/2.5): triton.autotune(do_bench=...) raised TypeError at import;
    # 3.2 dropped it (no GPU: a driver error at import); 3.3-3.5 emit div.rn.ftz.f32
    reason = dispatch.triton_too_old(version)
    assert (reason is not None) == too_old, f"triton {version}: triton_too_old said {reason!r}"
    if too_old:
        assert f"triton {version} is older than 3.6" in reason and "triton>=3.6" in reason, reason


@pytest.mark.parametrize("check", ["interpreter_defect", "triton_too_old"])
def test_a_triton_that_cannot_run_the_kernels_makes_the_backend_unavailable_with_its_reason(monkeypatch, check):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "interpreter_defect", lambda version: None)
    monkeypatch.setattr(dispatch, "triton_too_old", lambda version: None)
    monkeypatch.setattr(dispatch, check, lambda version: f"triton {version} is broken here")
    dispatch._probe_backends.cache_clear()
    try:
        info = dispatch.backends()["triton"]
        assert not info.available and "is broken here" in info.reason, str(info)
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: triton .* is broken here"):
            dispatch.resolve_backend("triton", "cpu")
    finally:
        monkeypatch.undo()
        dispatch._probe_backends.cache_clear()
