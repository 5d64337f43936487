"""What both Triton op modules share (``triton_ops.py``: the five float ops;
``triton_exact.py``: the three reversal="exact" ops): the triton version gate, whether the
kernels run interpreted, the autotuner and its configs, the device checks, the size buckets
the tuner keys on, and registration into the ``revdeq_triton`` namespace.

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

import torch
from torch import Tensor

try:
    import triton
except ImportError as error:  # dispatch reports the backend unavailable before importing us
    raise ImportError(f"the triton backend needs the triton package: {error}") from error

from . import _library
from .triton_kernels import relax_kernel
from .triton_versions import triton_too_old

if reason := triton_too_old(triton.__version__):  # dispatch reports the backend unavailable for it
    raise ImportError(f"the triton backend cannot use this triton: {reason}")

# Fixed when triton_kernels' kernels were decorated (TRITON_INTERPRET at that moment): setting
# the variable later changes nothing, so ask the kernels rather than the environment.
INTERPRETED = not isinstance(relax_kernel, triton.runtime.JITFunction)

GPU_ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=16),
]
# TILE: elements a row-sums program loads per iteration, as ROWS x COLS (see row_tile).
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
row_tile = {
    "COLS": lambda args: min(args["TILE"], triton.next_power_of_2(args["row_len"])),
    "ROWS": lambda args: args["TILE"] // min(args["TILE"], triton.next_power_of_2(args["row_len"])),
}


def tuned(kernel, configs, key, written, restore_written: bool = True):
    """``kernel`` autotuned over ``configs`` per ``key``, restoring the ``written`` pointers
    around every trial (see the module docstring)."""
    do_bench = _host_timer_bench if INTERPRETED else None  # None: Triton's GPU benchmark
    return triton.autotune(configs=configs, key=key, do_bench=do_bench,
                           restore_value=written if restore_written else None)(kernel)


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


# ---------------------------------------------------------------------------- checks
# The public wrappers in ops/__init__.py validate first, with friendlier messages; these
# guard direct torch.ops calls and never let a kernel write into a temporary copy.

def check_device(t: Tensor, name: str) -> None:
    # (The interpreter also runs CUDA tensors, by copying them to the host and back.)
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{name} is a CPU tensor, but the Triton kernels were built for the GPU: set "
            "TRITON_INTERPRET=1 before triton and revdeq_kernels.ops.triton_ops are imported")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton backend runs on CUDA (or interpreted CPU) tensors; "
                           f"{name} is on {t.device}")


def device_guard(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def bucket(*sizes: int) -> int:
    """Sizes rounded up to powers of two, as one int: the autotuning key."""
    key = 0
    for size in sizes:
        key = key * 64 + (size - 1).bit_length()
    return key


def register(implementations: dict) -> None:
    """Registers ``implementations`` (op name -> function) into ``revdeq_triton`` for CUDA
    tensors and for the interpreter's CPU tensors."""
    unknown = implementations.keys() - _library.SCHEMAS.keys()
    assert not unknown, f"Triton kernels for ops without a schema: {sorted(unknown)}"
    lib = _library.library(_library.NAMESPACES["triton"])
    for name, implementation in implementations.items():
        for dispatch_key in ("CUDA", "CPU"):
            lib.impl(name, implementation, dispatch_key)
