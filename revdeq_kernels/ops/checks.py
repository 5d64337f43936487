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


def _check_untracked(name: str, t: Tensor) -> None:
    """The ops run unseen by autograd (on every backend alike: the torch reference too), so
    a tensor that autograd is recording would get a silently wrong or missing gradient."""
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad and grad mode is on: the fused ops run unseen by autograd, so gradients "
            f"through them would be silently wrong or missing; call the op under torch.no_grad() or pass "
            f"{name}.detach()"
        )


def check_written(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """A tensor an op writes in place: a supported dtype, contiguous (never a silent copy),
    dim >= 1, and not one that autograd records."""
    _check_tensor(name, t, dtypes)
    _check_untracked(name, t)
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is written in place and must be contiguous (shape {tuple(t.shape)}, "
            f"stride {t.stride()}); call .contiguous() on it yourself and keep that tensor"
        )
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim >= 1), got a 0-d tensor")


def check_read(name: str, t: Tensor, like_name: str, like: Tensor, dtypes=F_DTYPES) -> None:
    """A read-only tensor: a supported dtype, not recorded by autograd, and the shape and
    device of ``like``; any strides."""
    _check_tensor(name, t, dtypes)
    _check_untracked(name, t)
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


# The aliasing rule of every op, one for all backends: the public entry points check it
# before any backend runs (the Triton launchers too, for direct torch.ops calls; the C++
# host has the same rule in csrc/host_ops.h). A read argument may be a written tensor
# itself only where listed here: every kernel reads each element before it writes that
# element, so the result is defined and the same everywhere. Any other sharing of memory
# between a written tensor and another argument is an error (relax_residual_ included: its
# sums would depend on whether a backend reads z before or after writing y).
SAME_TENSOR_OK = {
    "relax_": {("state", "f_out")},
    "unrelax_": {("state", "f_out")},
    "adjoint_accumulate_": {("grad", "vjp"), ("cotangent", "vjp")},
}


def _byte_span(t: Tensor) -> tuple[int, int] | None:
    """[first, last + 1) bytes that ``t`` can touch; None when it holds no element."""
    n = t.numel()
    if n == 0:
        return None
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a loop over the dims
        return start, start + n * t.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def check_aliasing(op: str, written: dict[str, Tensor], read: dict[str, Tensor]) -> None:
    """Every written tensor against every other argument, by the rule above. Spans are
    compared, so a strided read view that straddles a written block without touching it
    is refused too: a copy of it costs less than proving it safe."""
    if torch.compiler.is_compiling():
        return  # fake tensors have no addresses; the compiled backends check at run time
    allowed = SAME_TENSOR_OK.get(op, ())
    names = list(written)
    for i, name in enumerate(names):
        target, span = written[name], _byte_span(written[name])
        if span is None:
            continue
        for other_name, other in [(n, written[n]) for n in names[i + 1:]] + list(read.items()):
            other_span = _byte_span(other)
            if other_span is None or span[0] >= other_span[1] or other_span[0] >= span[1]:
                continue
            if not _same_tensor(target, other):
                raise ValueError(f"{op}: {other_name} and {name} (written in place) overlap in memory without "
                                 "being the same tensor; pass separate tensors")
            if (name, other_name) not in allowed:
                raise ValueError(f"{op}: {other_name} is {name} itself, which {op} writes in place; the result "
                                 f"would depend on the backend's order of reads and writes; pass "
                                 f"{other_name}.clone()")


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
