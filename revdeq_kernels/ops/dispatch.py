"""Which kernel runs: availability of each backend and the selection rule.

Backends: ``torch`` (reference, always there), ``cpp`` (compiled CPU extension),
``cuda`` (compiled CUDA extension), ``triton`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` picks the compiled extension for the tensor's device,
else Triton on CUDA, else torch, and warns once when it has to fall back. Naming an
unavailable backend is an error that says why it is unavailable; there is no silent
fallback. ``REVDEQ_BACKEND`` sets the default for calls that pass ``backend=None``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from ._library import NAMESPACES
from .triton_versions import interpreter_defect, triton_too_old

BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_BACKEND = "REVDEQ_BACKEND"
REINSTALL_HINT = (
    "rebuild it with `pip install --no-build-isolation --force-reinstall --no-deps .` "
    "from the source checkout (see the README's build table)"
)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name}: {state} ({self.reason})"


def _not_built(extension: str) -> str | None:
    """Why setup.py skipped an extension (recorded in _build_info.py at install), or None."""
    try:
        from .._build_info import SKIPPED
    except ImportError:  # a source checkout that was never built
        return None
    return SKIPPED.get(extension)


@functools.cache
def _load_extension(module: str, extension: str) -> str | None:
    """Import a compiled extension once; return why it is missing, or None on success."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        why = _not_built(extension)
        if why is not None:
            return f"{module} was not built: {why}"
        return f"{module} failed to import: {error}"
    return None


def _cpp_info() -> BackendInfo:
    error = _load_extension("revdeq_kernels._C", "cpp")
    if error:
        return BackendInfo("cpp", False, f"{error}; {REINSTALL_HINT}")
    return BackendInfo("cpp", True, "compiled CPU extension revdeq_kernels._C")


def _cuda_info() -> BackendInfo:
    if not torch.cuda.is_available():
        why = _not_built("cuda")
        return BackendInfo("cuda", False, "torch.cuda.is_available() is False" + (
            f"; the CUDA extension was not built either: {why}" if why else ""))
    error = _load_extension("revdeq_kernels._C_cuda", "cuda")
    if error:
        return BackendInfo("cuda", False, f"{error}; {REINSTALL_HINT}")
    return BackendInfo("cuda", True, "compiled CUDA extension revdeq_kernels._C_cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_info() -> BackendInfo:
    try:
        import triton
    except ImportError as error:
        return BackendInfo("triton", False, f"triton is not installed: {error}")
    # The interpreter runs every kernel when it is on, CUDA tensors included.
    problem = triton_too_old(triton.__version__) or (
        interpreter_defect(triton.__version__) if triton_interpreted() else None)
    if problem:
        return BackendInfo("triton", False, problem)
    if torch.cuda.is_available():
        return BackendInfo("triton", True, "CUDA tensors" + (
            " and CPU tensors (TRITON_INTERPRET=1)" if triton_interpreted() else ""))
    if triton_interpreted():
        return BackendInfo("triton", True, "CPU tensors through the interpreter (TRITON_INTERPRET=1)")
    return BackendInfo("triton", False, "no CUDA device; set TRITON_INTERPRET=1 to run on CPU")


@functools.cache
def _probe_backends() -> tuple[BackendInfo, ...]:
    # Once per process: every op call resolves its backend, and probing CUDA each time
    # cost a third of a small relax_ call. TRITON_INTERPRET must be set before triton is
    # imported anyway, so nothing probed here can change later.
    return (BackendInfo("torch", True, "pure-PyTorch reference"), _cpp_info(), _cuda_info(), _triton_info())


def backends() -> dict[str, BackendInfo]:
    """What each backend can run on here, and for the unavailable ones, why."""
    return {info.name: info for info in _probe_backends()}


@functools.cache
def _warn_fallback_once(device_type: str, reasons: str) -> None:
    warnings.warn(
        f"revdeq_kernels: no fused kernel for {device_type} tensors ({reasons}); "
        "using the pure-PyTorch backend. Pass backend='torch' or set "
        f"{ENV_BACKEND}=torch to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def _supports(info: BackendInfo, device: torch.device) -> str | None:
    """None if ``info`` can run on ``device``, else the reason it cannot."""
    if not info.available:
        return info.reason
    if info.name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
    if info.name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
    if info.name == "triton" and device.type == "cpu" and not triton_interpreted():
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if info.name == "triton" and device.type not in ("cpu", "cuda"):
        return f"triton does not run on {device.type} tensors"
    return None


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend that will run for a tensor on ``device``; raises if it cannot.

    Constant for a given (backend, device), so torch.compile evaluates it once while
    tracing instead of tracing the extension imports inside it.
    """
    device = torch.device(device)
    name = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto")
    name = name.lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS + ('auto',))}"
            + (f" (from ${ENV_BACKEND})" if backend is None else "")
        )
    infos = backends()
    if name != "auto":
        reason = _supports(infos[name], device)
        if reason is not None:
            raise RuntimeError(f"revdeq_kernels backend {name!r} is unavailable: {reason}")
        return name
    preference = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(device.type, ())
    reasons = []
    for candidate in preference:
        reason = _supports(infos[candidate], device)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    _warn_fallback_once(device.type, "; ".join(reasons) or "none is built for this device")
    return "torch"


def namespace_of(backend: str) -> str:
    if backend in ("cpp", "cuda"):
        return NAMESPACES["native"]
    if backend == "triton":
        from . import triton_exact, triton_ops  # noqa: F401  (register the Triton kernels on first use)
    return NAMESPACES[backend]
