"""One op schema, several kernels.

Every backend gets its own ``torch.library`` namespace with the *same* schemas:

- ``revdeq_torch``  : the reference (``reference.py``), CompositeExplicitAutograd.
- ``revdeq_native`` : C++ CPU and CUDA kernels; the schemas are defined here and the
                      compiled extensions (``revdeq_kernels._C``, ``._C_cuda``) only
                      register CPU / CUDA implementations with TORCH_LIBRARY_IMPL.
- ``revdeq_triton`` : Triton kernels (``triton_kernels.py``, launched by ``triton_ops.py``; ``triton_exact.py``),
                      registered lazily.

A namespace per backend (rather than one op dispatching on device) is what lets a user
pick the C++ kernel or the Triton kernel for the same CPU/CUDA tensor, and lets tests
assert which kernel ran. All ops are in place (out-parameters listed as mutated, as
``Tensor(a!)``) so autograd's version counters stay right; none has an autograd formula
(the RevDEQ autograd.Function calls them on tensors that do not require grad).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

_EXACT_ARGS = "Tensor f_out, Tensor(c!) flags, int step, int numerator, int denominator, int frac_bits)"

SCHEMAS: dict[str, str] = {
    "relax_": "(Tensor(a!) state, Tensor f_out, float beta) -> ()",
    "unrelax_": "(Tensor(a!) state, Tensor f_out, float beta) -> ()",
    "relax_residual_": "(Tensor(a!) y, Tensor z, Tensor f_out, float beta) -> (Tensor, Tensor)",
    "residual_norms": "(Tensor z, Tensor f_out) -> (Tensor, Tensor)",
    "adjoint_accumulate_": (
        "(Tensor(a!) grad, Tensor vjp, Tensor(b!) cotangent, float beta, bool scale_after) -> ()"
    ),
    # reversal="exact": int64 states and digit planes, 1 - beta = numerator/denominator
    "exact_relax_": "(Tensor(a!) state, Tensor(b!) digits, " + _EXACT_ARGS + " -> ()",
    "exact_unrelax_": "(Tensor(a!) state, Tensor(b!) digits, " + _EXACT_ARGS + " -> ()",
    "exact_relax_residual_": "(Tensor(a!) y, Tensor(b!) digits, Tensor z, " + _EXACT_ARGS + " -> (Tensor, Tensor)",
}

NAMESPACES = {"torch": "revdeq_torch", "native": "revdeq_native", "triton": "revdeq_triton"}

# Keep the Library objects alive: dropping them unregisters the ops.
_LIBRARIES: dict[str, torch.library.Library] = {}


def _fake_norms(z: Tensor, f_out: Tensor) -> tuple[Tensor, Tensor]:
    acc = reference.accumulation_dtype(z.dtype)
    batch = z.shape[0]
    return z.new_empty((batch,), dtype=acc), z.new_empty((batch,), dtype=acc)


def _fake_relax_residual(y: Tensor, z: Tensor, f_out: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return _fake_norms(y, f_out)


def _fake_exact_residual(y: Tensor, digits: Tensor, z: Tensor, f_out: Tensor, *args) -> tuple[Tensor, Tensor]:
    batch = y.shape[0]
    return y.new_empty((batch,), dtype=torch.float64), y.new_empty((batch,), dtype=torch.float64)


def _fake_none(*args) -> None:
    return None


_FAKES = {
    "relax_": _fake_none,
    "unrelax_": _fake_none,
    "relax_residual_": _fake_relax_residual,
    "residual_norms": _fake_norms,
    "adjoint_accumulate_": _fake_none,
    "exact_relax_": _fake_none,
    "exact_unrelax_": _fake_none,
    "exact_relax_residual_": _fake_exact_residual,
}


def _define(namespace: str) -> torch.library.Library:
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
    _LIBRARIES[namespace] = lib
    return lib


def _register_reference(lib: torch.library.Library) -> None:
    for name in SCHEMAS:
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")


for _ns in NAMESPACES.values():
    _define(_ns)
_register_reference(_LIBRARIES[NAMESPACES["torch"]])


def library(backend_namespace: str) -> torch.library.Library:
    """The Library object of a namespace, for registering kernels into it."""
    return _LIBRARIES[backend_namespace]


def op(namespace: str, name: str):
    return getattr(getattr(torch.ops, namespace), name).default
