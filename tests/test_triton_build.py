"""The GPU build of every Triton kernel compiles for sm_90 without a GPU: PTX through ptxas,
checked for correctly rounded division, 16-byte vector loads, and the reversal="exact"
kernels' unfused quantisation multiply and constant divisors. Apart from tests/test_triton.py
because it needs no runnable backend: it compiles in a process with TRITON_INTERPRET=0, so it
runs where the interpreter cannot run the kernels, and on the lent GPU's own triton."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from revdeq_kernels.ops.triton_versions import triton_too_old

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
if reason := triton_too_old(triton.__version__):
    pytest.skip(reason, allow_module_level=True)

from revdeq_kernels.ops import triton_exact as te, triton_launch, triton_ops as tk  # noqa: E402


def compile_for_sm90() -> dict:
    """PTX of a representative set of kernel variants, compiled for sm_90 without a GPU
    (needs the compiled kernels: run in a process with TRITON_INTERPRET=0)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from revdeq_kernels.ops import triton_kernels as tj

    assert not triton_launch.INTERPRETED, "the kernels were decorated for the interpreter; set TRITON_INTERPRET=0"
    tl = triton.language
    scalars = {"n": "i32", "tuning_bucket": "i32", "one_minus_beta": "fp64", "beta": "fp64",
               "n_rows": "i32", "row_len": "i64", "chunks_per_row": "i32"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(3)}  # as inferred for aligned tensors

    def compile(kernel, types, constants, attrs=None, num_warps=4):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        source = ASTSource(kernel, signature, constants, attrs)
        options = {"num_warps": num_warps}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    ptx = {}
    for state, f in (("fp32", "fp32"), ("fp64", "bf16"), ("bf16", "fp16")):
        acc = "fp64" if state == "fp64" else "fp32"
        types = {**scalars, **{name: "*" + dtype for name, dtype in {
            "state_ptr": state, "grad_ptr": state, "y_ptr": state, "z_ptr": state, "f_ptr": f, "vjp_ptr": f,
            "cotangent_ptr": f, "residual_partials_ptr": acc, "f_partials_ptr": acc}.items()}}
        ACC = tl.float64 if acc == "fp64" else tl.float32
        ptx["relax", state, f] = compile(tj.relax_kernel, types, dict(INVERSE=True, ACC=ACC, BLOCK=2048),
                                         aligned, num_warps=8)
        ptx["adjoint", state, f] = compile(tj.adjoint_kernel, types, dict(SCALE_AFTER=False, ACC=ACC, BLOCK=1024))
        ptx["rows", state, f] = compile(tj.row_sums_kernel, types,
                                        dict(UPDATE=True, ACC=ACC, CHUNK=16384, ROWS=4, COLS=1024), num_warps=8)
    partial_types = {**scalars, **{name: "*fp32" for name in
                                   ("residual_partials_ptr", "f_partials_ptr", "residual_out_ptr", "f_out_ptr")}}
    ptx["partials"] = compile(tj.sum_partials_kernel, partial_types, {"BLOCK": 1024})
    return ptx


# (n, d) of 1 - beta -> whether the kernel divides by runtime values (no constant for that ratio).
EXACT_COMPILED_RATIOS = {(1, 5): False, (-1, 5): False, (3, 4): False, (1, 2): False, (3, 7): True, (5, 8): True}


def compile_exact_for_sm90() -> dict:
    """PTX of the reversal="exact" kernels for sm_90, with the options their launchers pass
    (``te.LAUNCH_OPTIONS``); as compile_for_sm90, in a process with TRITON_INTERPRET=0."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton_launch.INTERPRETED, "the kernels were decorated for the interpreter; set TRITON_INTERPRET=0"
    scalars = {"step": "i32", "n": "i32", "tuning_bucket": "i32", "d": "i32", "an": "i32", "scale": "fp64",
               "unscale": "fp64", "n_rows": "i32", "row_len": "i64", "chunks_per_row": "i32"}

    def compile(kernel, types, constants, aligned=(), num_warps=4):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = ASTSource(kernel, signature, constants, attrs)
        options = {"num_warps": num_warps, **te.LAUNCH_OPTIONS}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    ptx = {}
    f_dtypes = {(1, 5): "fp32", (-1, 5): "bf16", (3, 4): "fp16", (1, 2): "fp64", (3, 7): "fp32", (5, 8): "bf16"}
    for (numerator, denominator), f in f_dtypes.items():
        types = {**scalars, **{name: "*i64" for name in ("state_ptr", "y_ptr", "digits_ptr", "z_ptr")},
                 "f_ptr": "*" + f, "flags_ptr": "*i32", "residual_partials_ptr": "*fp64", "f_partials_ptr": "*fp64"}
        ratio = te.ratio_constants(numerator, denominator)
        for inverse in (False, True):
            ptx["exact", numerator, denominator, inverse] = compile(
                te.exact_kernel, types, dict(INVERSE=inverse, BLOCK=2048, **ratio),
                aligned=("state_ptr", "digits_ptr", "f_ptr", "n"), num_warps=8)
        ptx["exact_rows", numerator, denominator] = compile(
            te.exact_row_sums_kernel, types, dict(CHUNK=16384, ROWS=2, COLS=1024, **ratio), num_warps=8)
    return ptx


def check_exact_gpu_build() -> None:
    """The compiled exact kernels: the quantisation multiply stays a separately rounded
    mul.rn.f64 (no FMA anywhere), the rint construction's 2**52 additions are there, each
    program ORs its flags with one atomic, and the divisors of the specialised ratios are
    constants (multiply-high, no 64-bit division)."""
    ptx = compile_exact_for_sm90()
    for variant, code in ptx.items():
        assert "mul.rn.f64" in code, f"{variant}: the quantisation multiply is not an unfused mul.rn.f64"
        assert not re.search(r"\bfma\.", code), f"{variant}: an FMA contraction (fp fusion must be off)"
        assert "add.rn.f64" in code and "0d4330000000000000" in code, f"{variant}: no rint by 2**52 additions"
        # The non-finite test compares with the float64 maximum (as a float32 literal it would be Inf),
        # and no flush-to-zero: a subnormal f quantises like the reference's.
        assert "0d7FEFFFFFFFFFFFFF" in code and ".ftz" not in code, f"{variant}: non-finite test or ftz"
        assert len(re.findall(r"\batom\.", code)) == 1, f"{variant}: expected one flags atomic per program"
        runtime_divisor = EXACT_COMPILED_RATIOS[variant[1], variant[2]]
        divides = bool(re.search(r"\b(div|rem)\.s64", code))
        assert divides == runtime_divisor, (
            f"{variant}: {'a' if divides else 'no'} 64-bit division, expected "
            f"{'runtime divisors' if runtime_divisor else 'constant divisors'}")
    assert "ld.global.v2.b64" in ptx["exact", 1, 5, False], "aligned int64 loads are not 16-byte vectors"
    flags = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # CPU tensors, compiled kernels
        te.exact_relax_(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64),
                        torch.zeros(2, 4), flags, 0, 1, 5, 32)
    print(f"compiled {len(ptx)} exact variants")


def check_gpu_build() -> None:
    """Run by the test below in a non-interpreting process."""
    ptx = compile_for_sm90()
    approximate = [variant for variant, code in ptx.items() if re.search(r"div\.(full|approx)", code)]
    assert not approximate, f"approximate division in {approximate}"
    assert "div.rn.f32" in ptx["relax", "fp32", "fp32"], "the float32 inverse must divide with div.rn.f32"
    assert "ld.global.v4" in ptx["relax", "fp32", "fp32"], "aligned float32 loads are not 16-byte vectors"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.relax_(torch.zeros(2, 4), torch.zeros(2, 4), 0.5)  # CPU tensors, compiled kernels
    print(f"compiled {len(ptx)} variants")
    check_exact_gpu_build()


def test_gpu_kernels_compile_for_sm90_with_correct_rounding():
    """The GPU path cannot run without a GPU; compiling it through ptxas checks its types,
    masks and the division it lowers to. In a subprocess: this one interprets."""
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip(f"this triton has no NVIDIA backend ({sorted(triton_backends)}); nothing to compile for")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = "import tests.test_triton_build as t; t.check_gpu_build()"
    result = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert result.returncode == 0 and "compiled 10 variants" in result.stdout and (
            f"compiled {3 * len(EXACT_COMPILED_RATIOS)} exact variants" in result.stdout), (
        f"compiling the Triton kernels for sm_90 failed (exit {result.returncode}):\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
