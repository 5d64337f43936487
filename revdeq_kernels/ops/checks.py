"""The argument checks of the ops, shared by the Python entry points and the Triton backend
(the C++/CUDA kernels have their own copy in ``csrc/checks.h``, for direct ``torch.ops``
calls). One place for the supported dtypes, the in-place rules and the scalar checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
F_DTYPES = STATE_DTYPES + (torch.float16,)


def _check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")


def check_written(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """A tensor an op writes in place: a supported dtype, contiguous (never a silent copy), dim >= 1."""
    _check_tensor(name, t, dtypes)
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is written in place and must be contiguous (shape {tuple(t.shape)}, "
            f"stride {t.stride()}); call .contiguous() on it yourself and keep that tensor"
        )
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim >= 1), got a 0-d tensor")


def check_read(name: str, t: Tensor, like_name: str, like: Tensor, dtypes=F_DTYPES) -> None:
    """A read-only tensor: a supported dtype, and the shape and device of ``like``; any strides."""
    _check_tensor(name, t, dtypes)
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def check_beta(beta: float, inverse: bool = False) -> float:
    """A finite beta, and != 1 for the inverse (it divides by 1 - beta); the solvers check their range."""
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    if inverse and beta == 1.0:
        raise ValueError("unrelax_ divides by 1 - beta; beta = 1 has no inverse")
    return beta


MAX_DENOMINATOR = 64


def check_exact(state_name: str, state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int,
                numerator: int, denominator: int, frac_bits: int) -> tuple[int, int, int, int]:
    """The arguments of the exact ops: int64 state and digit plane of one shape, an int32
    flag vector with ``step`` in it, 0 < |numerator| < denominator <= 64, 0 <= frac_bits <= 62."""
    check_written(state_name, state, (torch.int64,))
    check_written("digits", digits, (torch.int64,))
    check_read("digits", digits, state_name, state, (torch.int64,))
    check_read("f_out", f_out, state_name, state)
    _check_tensor("flags", flags, (torch.int32,))
    if flags.dim() != 1 or not flags.is_contiguous() or flags.device != state.device:
        raise ValueError(f"flags must be a contiguous 1-D int32 tensor on {state.device}, got shape "
                         f"{tuple(flags.shape)} on {flags.device}")
    step, numerator, denominator, frac_bits = (int(v) for v in (step, numerator, denominator, frac_bits))
    if not 0 <= step < flags.numel():
        raise ValueError(f"step {step} is outside flags (length {flags.numel()})")
    if not (0 < abs(numerator) < denominator <= MAX_DENOMINATOR):
        raise ValueError(f"1 - beta = {numerator}/{denominator} must have 0 < |numerator| < denominator "
                         f"<= {MAX_DENOMINATOR}")
    if not 0 <= frac_bits <= 62:
        raise ValueError(f"frac_bits must be in [0, 62], got {frac_bits}")
    return step, numerator, denominator, frac_bits
