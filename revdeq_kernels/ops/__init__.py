"""In-place elementwise state updates of the RevDEQ iteration, with backend selection.

Each public function validates its arguments (a clear error naming shapes, dtypes and
devices, before any kernel runs), resolves the backend (see ``dispatch.py``) and calls
the ``torch.library`` op of that backend. ``reference.py`` documents the math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._library import SCHEMAS, op
from .dispatch import BACKENDS, ENV_BACKEND, BackendInfo, backends, namespace_of, resolve_backend

STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
F_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

__all__ = [
    "BACKENDS", "ENV_BACKEND", "BackendInfo", "SCHEMAS", "STATE_DTYPES", "F_DTYPES",
    "backends", "resolve_backend", "reference",
    "relax_", "unrelax_", "relax_residual_", "residual_norms", "adjoint_accumulate_",
]


def _check_written(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is written in place and must be contiguous (shape {tuple(t.shape)}, "
            f"stride {t.stride()}); call .contiguous() on it yourself and keep that tensor"
        )
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim >= 1), got a 0-d tensor")


def _check_read(name: str, t: Tensor, like_name: str, like: Tensor, dtypes=F_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def _check_beta(beta: float, inverse: bool = False) -> float:
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    if inverse and beta == 1.0:
        raise ValueError("unrelax_ divides by 1 - beta; beta = 1 has no inverse")
    return beta


def _run(name: str, backend: str | None, device: torch.device, *args):
    chosen = resolve_backend(backend, device)
    return op(namespace_of(chosen), name)(*args)


def relax_(state: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None) -> Tensor:
    """state <- (1-beta) state + beta f_out, in place. Returns ``state``."""
    _check_written("state", state, STATE_DTYPES)
    _check_read("f_out", f_out, "state", state)
    _run("relax_", backend, state.device, state, f_out, _check_beta(beta))
    return state


def unrelax_(state: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None) -> Tensor:
    """state <- (state - beta f_out) / (1-beta), in place: the exact inverse of relax_."""
    _check_written("state", state, STATE_DTYPES)
    _check_read("f_out", f_out, "state", state)
    _run("unrelax_", backend, state.device, state, f_out, _check_beta(beta, inverse=True))
    return state


def residual_norms(z: Tensor, f_out: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample (dim 0) sums of (z - f_out)^2 and f_out^2, in the accumulation dtype."""
    if not isinstance(z, Tensor) or z.dim() == 0:
        raise ValueError("z must be a tensor with a batch dimension (dim >= 1)")
    _check_read("z", z, "z", z, STATE_DTYPES)
    _check_read("f_out", f_out, "z", z)
    return _run("residual_norms", backend, z.device, z, f_out)


def relax_residual_(
    y: Tensor, z: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Fused y-update and stop test: y <- (1-beta) y + beta f_out, and, from the same read
    of f_out, the per-sample sums of (z - f_out)^2 and f_out^2."""
    _check_written("y", y, STATE_DTYPES)
    _check_read("z", z, "y", y, (y.dtype,))
    _check_read("f_out", f_out, "y", y)
    return _run("relax_residual_", backend, y.device, y, z, f_out, _check_beta(beta))


def adjoint_accumulate_(
    grad: Tensor,
    vjp: Tensor,
    cotangent: Tensor,
    beta: float,
    scale_after: bool,
    *,
    backend: str | None = None,
) -> Tensor:
    """One reverse half-step's adjoint update, in place on ``grad`` and ``cotangent``.

    scale_after=False (z half-step): grad <- (1-b) grad + vjp;  cotangent <- b grad
    scale_after=True  (y half-step): s = grad + vjp; grad <- (1-b) s; cotangent <- b s
    """
    _check_written("grad", grad, STATE_DTYPES)
    _check_read("vjp", vjp, "grad", grad)
    _check_written("cotangent", cotangent, F_DTYPES)
    _check_read("cotangent", cotangent, "grad", grad)
    if not torch.compiler.is_compiling() and grad.numel() and cotangent.data_ptr() == grad.data_ptr():
        raise ValueError("cotangent and grad must be different tensors")
    _run("adjoint_accumulate_", backend, grad.device, grad, vjp, cotangent, _check_beta(beta),
         bool(scale_after))
    return grad
