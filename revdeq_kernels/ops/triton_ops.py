"""Triton backend: launch wrappers for the kernels of ``triton_kernels.py`` and their
registration into the ``revdeq_triton`` namespace (CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1``). Importing this module registers all eight ops (the three exact ones through triton_exact.py).

Autotuning. On GPU the block size and warp count are tuned per size bucket. The tuner
runs every candidate config several times on the caller's tensors, and these kernels
update in place: without care, one call would apply the update dozens of times. Every
tuned kernel therefore lists the tensors it writes in ``restore_value``, so the tuner
snapshots them before each trial and restores them after, and only the final launch with
the chosen config changes the data (``tests/test_triton.py`` checks this with several
configs under the interpreter). Under the interpreter a single config runs: tuning there
is slow and meaningless, and large blocks keep the interpreter's per-program cost low.
``REVDEQ_TRITON_AUTOTUNE=0`` runs the first GPU config untuned (see ``default_configs``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
except ImportError as error:  # dispatch reports the backend unavailable before importing us
    raise ImportError(f"the triton backend needs the triton package: {error}") from error

from . import _library
from .checks import F_DTYPES, STATE_DTYPES, check_aliasing, check_beta, check_read, check_written
from .dispatch import triton_too_old
from .reference import accumulation_dtype
from .triton_kernels import adjoint_kernel, relax_kernel, row_sums_kernel, sum_partials_kernel

if reason := triton_too_old(triton.__version__):  # dispatch reports the backend unavailable for it
    raise ImportError(f"the triton backend cannot use this triton: {reason}")

# Fixed when triton_kernels' kernels were decorated (TRITON_INTERPRET at that moment): setting
# the variable later changes nothing, so ask the kernels rather than the environment.
INTERPRETED = not isinstance(relax_kernel, triton.runtime.JITFunction)

_TL_ACC = {torch.float32: triton.language.float32, torch.float64: triton.language.float64}

GPU_ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=16),
]
# TILE: elements a row-sums program loads per iteration, as ROWS x COLS (see _row_tile).
GPU_ROW_CONFIGS = [
    triton.Config({"TILE": 1024}, num_warps=4),
    triton.Config({"TILE": 2048}, num_warps=8),
    triton.Config({"TILE": 4096}, num_warps=8),
]
# Columns per partial sum of a long row on GPU: a 2M-element row spreads over 128 programs.
GPU_ROW_CHUNK = 16384
INTERPRETER_CONFIG = triton.Config({"BLOCK": 8192}, num_warps=1)
INTERPRETER_ROW_CONFIG = triton.Config({"TILE": 8192}, num_warps=1)
INTERPRETER_ROW_CHUNK = 65536
PARTIALS_BLOCK = 1024  # chunk partials a second-stage program adds per iteration
ENV_AUTOTUNE = "REVDEQ_TRITON_AUTOTUNE"


def _host_timer_bench(kernel_call, quantiles):
    """Tuning benchmark under the interpreter (Triton's default one needs a GPU): median,
    min and max of three wall-clock runs, in ms. Only reached when several configs are
    given under the interpreter (the autotuning tests)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times), min(times), max(times)][: len(quantiles)]


# A tile of TILE elements covers COLS columns (up to the row, rounded to a power of two)
# of ROWS rows: rows of 1..7 elements fill the tile instead of one program each.
_row_tile = {
    "COLS": lambda args: min(args["TILE"], triton.next_power_of_2(args["row_len"])),
    "ROWS": lambda args: args["TILE"] // min(args["TILE"], triton.next_power_of_2(args["row_len"])),
}


def tuned(kernel, configs, key, written, restore_written: bool = True):
    """``kernel`` autotuned over ``configs`` per ``key``, restoring the ``written`` pointers
    around every trial (see the module docstring)."""
    do_bench = _host_timer_bench if INTERPRETED else None  # None: Triton's GPU benchmark
    return triton.autotune(configs=configs, key=key, do_bench=do_bench,
                           restore_value=written if restore_written else None)(kernel)


@dataclass(frozen=True)
class TritonKernels:
    """The tuned launchers of one config set, and how the row sums are split."""

    relax: object
    adjoint: object
    row_sums: object
    row_chunk: int  # columns per partial sum of a long row
    partials_block: int = PARTIALS_BLOCK


def build_kernels(elementwise_configs, row_configs, row_chunk: int, *,
                  partials_block: int = PARTIALS_BLOCK, restore_written: bool = True) -> TritonKernels:
    """Autotuned launchers. ``restore_written=False`` exists only so the tests can show
    that the in-place bug it prevents is real; never pass it elsewhere."""
    return TritonKernels(
        relax=tuned(relax_kernel, elementwise_configs, ["tuning_bucket", "INVERSE"], ["state_ptr"], restore_written),
        # The cotangent is restored too: a vjp aliasing it makes it read-modify-write.
        adjoint=tuned(adjoint_kernel, elementwise_configs, ["tuning_bucket", "SCALE_AFTER"],
                      ["grad_ptr", "cotangent_ptr"], restore_written),
        row_sums=tuned(triton.heuristics(_row_tile)(row_sums_kernel), row_configs,
                       ["tuning_bucket", "UPDATE"], ["y_ptr"], restore_written),
        row_chunk=row_chunk,
        partials_block=partials_block,
    )


def default_configs() -> tuple[list, list, int]:
    """(elementwise configs, row configs, row chunk) of the default launchers.

    ``REVDEQ_TRITON_AUTOTUNE=0`` keeps each kernel's first GPU config and tunes nothing:
    for correctness runs (the GPU check's parity tests and memcheck), where tuning would
    benchmark every config of every size bucket and dtype (~530 keys in the parity files,
    >= 125 ms per config with do_bench's defaults) and compile each config's variants."""
    if INTERPRETED:
        return [INTERPRETER_CONFIG], [INTERPRETER_ROW_CONFIG], INTERPRETER_ROW_CHUNK
    autotune = os.environ.get(ENV_AUTOTUNE, "1")
    if autotune not in ("0", "1"):
        raise ValueError(f"{ENV_AUTOTUNE}={autotune!r}: must be 1 (tune, the default) or 0 (first config only)")
    if autotune == "0":
        return GPU_ELEMENTWISE_CONFIGS[:1], GPU_ROW_CONFIGS[:1], GPU_ROW_CHUNK
    return GPU_ELEMENTWISE_CONFIGS, GPU_ROW_CONFIGS, GPU_ROW_CHUNK


DEFAULT_KERNELS = build_kernels(*default_configs())


# ---------------------------------------------------------------------------- checks
# The public wrappers in ops/__init__.py validate first, with friendlier messages; these
# guard direct torch.ops calls and never let a kernel write into a temporary copy.

def _check_device(t: Tensor, name: str) -> None:
    # (The interpreter also runs CUDA tensors, by copying them to the host and back.)
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{name} is a CPU tensor, but the Triton kernels were built for the GPU: set "
            "TRITON_INTERPRET=1 before triton and revdeq_kernels.ops.triton_ops are imported")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton backend runs on CUDA (or interpreted CPU) tensors; "
                           f"{name} is on {t.device}")


def _check_written(t: Tensor, name: str, dtypes) -> None:
    _check_device(t, name)
    check_written(name, t, dtypes)


def _read_input(t: Tensor, name: str, dtypes, like: Tensor, like_name: str) -> Tensor:
    """A read-only input checked against ``like``; returned contiguous (maybe a copy)."""
    check_read(name, t, like_name, like, dtypes)
    return t.contiguous()


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------- launches

def _bucket(*sizes: int) -> int:
    """Sizes rounded up to powers of two, as one int: the autotuning key."""
    bucket = 0
    for size in sizes:
        bucket = bucket * 64 + (size - 1).bit_length()
    return bucket


def _scalars(beta: float, inverse: bool = False) -> tuple[float, float]:
    beta = check_beta(beta, inverse)
    return 1.0 - beta, beta


def launch_relax(state: Tensor, f_out: Tensor, beta: float, inverse: bool,
                 kernels: TritonKernels | None = None) -> None:
    kernels = kernels or DEFAULT_KERNELS
    _check_written(state, "state", STATE_DTYPES)
    f = _read_input(f_out, "f_out", F_DTYPES, state, "state")
    check_aliasing("unrelax_" if inverse else "relax_", {"state": state}, {"f_out": f_out})
    one_minus_beta, beta = _scalars(beta, inverse)
    n = state.numel()
    assert state.is_contiguous(), "the kernel writes through a flat index"
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        with _device_guard(state):
            kernels.relax[grid](state, f, n, _bucket(n), one_minus_beta, beta, INVERSE=inverse,
                                ACC=_TL_ACC[accumulation_dtype(state.dtype)])
    torch.autograd.graph.increment_version(state)


def launch_adjoint(grad: Tensor, vjp: Tensor, cotangent: Tensor, beta: float, scale_after: bool,
                   kernels: TritonKernels | None = None) -> None:
    kernels = kernels or DEFAULT_KERNELS
    _check_written(grad, "grad", STATE_DTYPES)
    _check_written(cotangent, "cotangent", F_DTYPES)
    if cotangent.shape != grad.shape or cotangent.device != grad.device:
        raise ValueError(f"cotangent ({tuple(cotangent.shape)} on {cotangent.device}) must match "
                         f"grad ({tuple(grad.shape)} on {grad.device})")
    v = _read_input(vjp, "vjp", F_DTYPES, grad, "grad")
    check_aliasing("adjoint_accumulate_", {"grad": grad, "cotangent": cotangent}, {"vjp": vjp})
    one_minus_beta, beta = _scalars(beta)
    n = grad.numel()
    assert grad.is_contiguous() and cotangent.is_contiguous(), "the kernel writes through a flat index"
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        with _device_guard(grad):
            kernels.adjoint[grid](grad, v, cotangent, n, _bucket(n), one_minus_beta, beta,
                                  SCALE_AFTER=bool(scale_after),
                                  ACC=_TL_ACC[accumulation_dtype(grad.dtype)])
    torch.autograd.graph.increment_version([grad, cotangent])


def launch_row_sums(y: Tensor | None, z: Tensor, f_out: Tensor, beta: float,
                    kernels: TritonKernels | None = None) -> tuple[Tensor, Tensor]:
    """Per-row (dim 0) sums of (z - f)^2 and f^2 in the accumulation dtype; with ``y``,
    also y <- (1-b) y + b f in the same pass."""
    kernels = kernels or DEFAULT_KERNELS
    if y is not None:
        _check_written(y, "y", STATE_DTYPES)
        check_aliasing("relax_residual_", {"y": y}, {"z": z, "f_out": f_out})
        z = _read_input(z, "z", (y.dtype,), y, "y")
        f = _read_input(f_out, "f_out", F_DTYPES, y, "y")
    else:
        _check_device(z, "z")
        if z.dtype not in STATE_DTYPES:
            raise TypeError(f"z has dtype {z.dtype}; supported: {', '.join(map(str, STATE_DTYPES))}")
        if z.dim() == 0:
            raise ValueError("z must have a batch dimension (dim >= 1), got a 0-d tensor")
        f = _read_input(f_out, "f_out", F_DTYPES, z, "z")
        z = z.contiguous()
    one_minus_beta, beta = _scalars(beta)
    acc = accumulation_dtype(z.dtype)
    batch = z.shape[0]
    row_len = z.numel() // batch if batch else 0
    if batch == 0 or row_len == 0:
        sums = (z.new_zeros(batch, dtype=acc), z.new_zeros(batch, dtype=acc))
    else:
        chunks_per_row = triton.cdiv(row_len, kernels.row_chunk)
        partials = [z.new_empty(batch * chunks_per_row, dtype=acc) for _ in range(2)]
        assert y is None or y.is_contiguous(), "the kernel writes through a flat index"
        grid = lambda meta: (triton.cdiv(batch, meta["ROWS"]) * chunks_per_row,)  # noqa: E731
        with _device_guard(z):
            kernels.row_sums[grid](
                z if y is None else y, z, f, partials[0], partials[1], batch, row_len, chunks_per_row,
                _bucket(batch, row_len), one_minus_beta, beta,
                UPDATE=y is not None, ACC=_TL_ACC[acc], CHUNK=kernels.row_chunk)
            if chunks_per_row == 1:  # the partials are the sums: no second stage
                sums = (partials[0], partials[1])
            else:
                sums = (z.new_empty(batch, dtype=acc), z.new_empty(batch, dtype=acc))
                sum_partials_kernel[(batch,)](partials[0], partials[1], sums[0], sums[1], chunks_per_row,
                                              BLOCK=kernels.partials_block, num_warps=4)
    if y is not None:
        torch.autograd.graph.increment_version(y)
    return sums


# ---------------------------------------------------------------------------- registration

def relax_(state: Tensor, f_out: Tensor, beta: float) -> None:
    launch_relax(state, f_out, beta, inverse=False)


def unrelax_(state: Tensor, f_out: Tensor, beta: float) -> None:
    launch_relax(state, f_out, beta, inverse=True)


def relax_residual_(y: Tensor, z: Tensor, f_out: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return launch_row_sums(y, z, f_out, beta)


def residual_norms(z: Tensor, f_out: Tensor) -> tuple[Tensor, Tensor]:
    return launch_row_sums(None, z, f_out, 0.0)


def adjoint_accumulate_(grad: Tensor, vjp: Tensor, cotangent: Tensor, beta: float,
                        scale_after: bool) -> None:
    launch_adjoint(grad, vjp, cotangent, beta, scale_after)


_IMPLEMENTATIONS = {
    "relax_": relax_,
    "unrelax_": unrelax_,
    "relax_residual_": relax_residual_,
    "residual_norms": residual_norms,
    "adjoint_accumulate_": adjoint_accumulate_,
}
assert _IMPLEMENTATIONS.keys() <= _library.SCHEMAS.keys(), "one Triton kernel per op schema"  # exact ops: triton_exact


def _register() -> None:
    lib = _library.library(_library.NAMESPACES["triton"])
    for name, implementation in _IMPLEMENTATIONS.items():
        for dispatch_key in ("CUDA", "CPU"):
            lib.impl(name, implementation, dispatch_key)


_register()

from . import triton_exact  # noqa: E402,F401  (registers the three reversal="exact" ops)
