"""Triton backend of the five float ops: launch wrappers for the kernels of
``triton_kernels.py`` and their registration into the ``revdeq_triton`` namespace (CUDA
tensors, and CPU tensors under ``TRITON_INTERPRET=1``). The autotuning and its configs are
``triton_launch.py``'s; the exact ops are ``triton_exact.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
import triton

from .checks import F_DTYPES, STATE_DTYPES, check_aliasing, check_beta, check_read, check_written
from .reference import accumulation_dtype
from .triton_launch import (PARTIALS_BLOCK, bucket, check_device, default_configs, device_guard, register, row_tile,
                            tuned)
from .triton_kernels import adjoint_kernel, relax_kernel, row_sums_kernel, sum_partials_kernel

_TL_ACC = {torch.float32: triton.language.float32, torch.float64: triton.language.float64}


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
        row_sums=tuned(triton.heuristics(row_tile)(row_sums_kernel), row_configs,
                       ["tuning_bucket", "UPDATE"], ["y_ptr"], restore_written),
        row_chunk=row_chunk,
        partials_block=partials_block,
    )


DEFAULT_KERNELS = build_kernels(*default_configs())


# ---------------------------------------------------------------------------- checks
# The public wrappers in ops/__init__.py validate first, with friendlier messages; these
# guard direct torch.ops calls and never let a kernel write into a temporary copy.

def _check_written(t: Tensor, name: str, dtypes) -> None:
    check_device(t, name)
    check_written(name, t, dtypes)


def _read_input(t: Tensor, name: str, dtypes, like: Tensor, like_name: str) -> Tensor:
    """A read-only input checked against ``like``; returned contiguous (maybe a copy)."""
    check_read(name, t, like_name, like, dtypes)
    return t.contiguous()


# ---------------------------------------------------------------------------- launches

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
        with device_guard(state):
            kernels.relax[grid](state, f, n, bucket(n), one_minus_beta, beta, INVERSE=inverse,
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
        with device_guard(grad):
            kernels.adjoint[grid](grad, v, cotangent, n, bucket(n), one_minus_beta, beta,
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
        check_device(z, "z")
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
        with device_guard(z):
            kernels.row_sums[grid](
                z if y is None else y, z, f, partials[0], partials[1], batch, row_len, chunks_per_row,
                bucket(batch, row_len), one_minus_beta, beta,
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


IMPLEMENTATIONS = {
    "relax_": relax_,
    "unrelax_": unrelax_,
    "relax_residual_": relax_residual_,
    "residual_norms": residual_norms,
    "adjoint_accumulate_": adjoint_accumulate_,
}
register(IMPLEMENTATIONS)
