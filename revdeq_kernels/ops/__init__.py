"""In-place elementwise state updates of the RevDEQ iteration, with backend selection.

Each public function validates its arguments (a clear error naming shapes, dtypes and
devices, before any kernel runs), resolves the backend (see ``dispatch.py``) and calls
the ``torch.library`` op of that backend. ``reference.py`` documents the math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference  # noqa: F401  (importable, not advertised)
from .checks import (F_DTYPES, SAME_TENSOR_OK, STATE_DTYPES, check_aliasing, check_beta, check_exact,  # noqa: F401
                     check_read, check_written)
from ._library import SCHEMAS, op  # noqa: F401
from .dispatch import BACKENDS, ENV_BACKEND, BackendInfo, backends, namespace_of, resolve_backend  # noqa: F401

# What users call; the rest (SCHEMAS, STATE_DTYPES, resolve_backend, reference, ...) stays
# importable from here for the package and its tests.
__all__ = [
    "relax_", "unrelax_", "relax_residual_", "residual_norms", "adjoint_accumulate_",
    "exact_relax_", "exact_unrelax_", "exact_relax_residual_", "backends", "BACKENDS",
]


def _run(name: str, backend: str | None, device: torch.device, *args):
    chosen = resolve_backend(backend, device)
    return op(namespace_of(chosen), name)(*args)


def relax_(state: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None) -> Tensor:
    """state <- (1-beta) state + beta f_out, in place. Returns ``state``."""
    check_written("state", state, STATE_DTYPES)
    check_read("f_out", f_out, "state", state)
    check_aliasing("relax_", {"state": state}, {"f_out": f_out})
    _run("relax_", backend, state.device, state, f_out, check_beta(beta))
    return state


def unrelax_(state: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None) -> Tensor:
    """state <- (state - beta f_out) / (1-beta), in place: the exact inverse of relax_."""
    check_written("state", state, STATE_DTYPES)
    check_read("f_out", f_out, "state", state)
    check_aliasing("unrelax_", {"state": state}, {"f_out": f_out})
    _run("unrelax_", backend, state.device, state, f_out, check_beta(beta, inverse=True))
    return state


def residual_norms(z: Tensor, f_out: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample (dim 0) sums of (z - f_out)^2 and f_out^2, in the accumulation dtype."""
    if not isinstance(z, Tensor) or z.dim() == 0:
        raise ValueError("z must be a tensor with a batch dimension (dim >= 1)")
    check_read("z", z, "z", z, STATE_DTYPES)
    check_read("f_out", f_out, "z", z)
    return _run("residual_norms", backend, z.device, z, f_out)


def relax_residual_(
    y: Tensor, z: Tensor, f_out: Tensor, beta: float, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Fused y-update and stop test: y <- (1-beta) y + beta f_out, and, from the same read
    of f_out, the per-sample sums of (z - f_out)^2 and f_out^2."""
    check_written("y", y, STATE_DTYPES)
    check_read("z", z, "y", y, (y.dtype,))
    check_read("f_out", f_out, "y", y)
    check_aliasing("relax_residual_", {"y": y}, {"z": z, "f_out": f_out})
    return _run("relax_residual_", backend, y.device, y, z, f_out, check_beta(beta))


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
    check_written("grad", grad, STATE_DTYPES)
    check_read("vjp", vjp, "grad", grad)
    check_written("cotangent", cotangent, F_DTYPES)
    check_read("cotangent", cotangent, "grad", grad)
    check_aliasing("adjoint_accumulate_", {"grad": grad, "cotangent": cotangent}, {"vjp": vjp})
    _run("adjoint_accumulate_", backend, grad.device, grad, vjp, cotangent, check_beta(beta),
         bool(scale_after))
    return grad


# reversal="exact" (see fixed_point.py): int64 states and digit planes, 1 - beta = n/d.
# flags[step] gets bit 1 when f_out holds a NaN/Inf and bit 2 when a value leaves the
# range |h| < 2**62; the solver reads the flag vector once per solve (no sync per step).

def exact_relax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int, numerator: int,
                 denominator: int, frac_bits: int, *, backend: str | None = None) -> Tensor:
    """state <- state * n/d + rint(f_out * beta * 2**frac_bits), exactly: the remainder of
    the multiplication goes into ``digits``. Returns ``state``."""
    args = check_exact("state", state, digits, f_out, flags, step, numerator, denominator, frac_bits)
    check_aliasing("exact_relax_", {"state": state, "digits": digits, "flags": flags}, {"f_out": f_out})
    _run("exact_relax_", backend, state.device, state, digits, f_out, flags, *args)
    return state


def exact_unrelax_(state: Tensor, digits: Tensor, f_out: Tensor, flags: Tensor, step: int, numerator: int,
                   denominator: int, frac_bits: int, *, backend: str | None = None) -> Tensor:
    """The exact inverse of exact_relax_: restores ``state`` and ``digits`` bit for bit."""
    args = check_exact("state", state, digits, f_out, flags, step, numerator, denominator, frac_bits)
    check_aliasing("exact_unrelax_", {"state": state, "digits": digits, "flags": flags}, {"f_out": f_out})
    _run("exact_unrelax_", backend, state.device, state, digits, f_out, flags, *args)
    return state


def exact_relax_residual_(y: Tensor, digits: Tensor, z: Tensor, f_out: Tensor, flags: Tensor, step: int,
                          numerator: int, denominator: int, frac_bits: int, *,
                          backend: str | None = None) -> tuple[Tensor, Tensor]:
    """exact_relax_ on y, fused with the stop test: per-sample float64 sums of
    (z * 2**-frac_bits - f_out)^2 and f_out^2 from the same read of f_out."""
    args = check_exact("y", y, digits, f_out, flags, step, numerator, denominator, frac_bits)
    check_read("z", z, "y", y, (torch.int64,))
    check_aliasing("exact_relax_residual_", {"y": y, "digits": digits, "flags": flags}, {"z": z, "f_out": f_out})
    return _run("exact_relax_residual_", backend, y.device, y, digits, z, f_out, flags, *args)
