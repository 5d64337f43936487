"""Shared test utilities: devices, backends, the test block f, dtype tolerances and verbose comparisons."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from revdeq_kernels import ops

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """bench/NAME.py as a module, importing its siblings (bench_env, result_file, ...) as it
    does when it runs as a script; the tests and the benchmarks share one measurement."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def build_host_program(source: Path, out_dir: Path) -> Path:
    """Compiles a host driver of the CUDA kernels' host-and-device headers (tests/*_host.cpp)
    with the C++ compiler, with the UB sanitizer where the toolchain has its runtime; skips
    the test without a compiler. A driver run without arguments exits with 2 (its usage)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip(f"no C++ compiler on PATH to build tests/{source.name}")
    exe = out_dir / source.stem
    base = [cxx, "-std=c++20", "-O2", "-Wall", "-Werror", str(source), "-o", str(exe)]
    for sanitized, command in ((True, base + ["-fsanitize=undefined", "-fno-sanitize-recover=all"]), (False, base)):
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode == 0 and subprocess.run([str(exe)], capture_output=True).returncode == 2:
            if not sanitized:  # said, not silent: undefined behaviour goes unchecked here
                warnings.warn(f"{cxx} cannot build with -fsanitize=undefined; tests/{source.name} runs "
                              "without the UB sanitizer", RuntimeWarning, stacklevel=2)
            return exe
    raise AssertionError(f"tests/{source.name} does not build with {cxx}:\n{built.stderr[-3000:]}")


def devices() -> list[str]:
    """CPU always, CUDA when present; REVDEQ_TEST_DEVICES=cpu,cuda overrides."""
    env = os.environ.get("REVDEQ_TEST_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list[tuple[str, str]]:
    """Every (backend, device) combination that can run here."""
    pairs = []
    for device in devices():
        for name in ops.BACKENDS:
            try:
                ops.resolve_backend(name, device)
            except RuntimeError:
                continue
            pairs.append((name, device))
    return pairs


def pair_id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


class TanhBlock(nn.Module):
    """The tests' f(z, x) = tanh(norm(W z + U x)), with parameters, input injection and
    optional dropout/BatchNorm. ``contraction=c`` scales W to spectral norm c: a unique
    fixed point that the iteration approaches by a factor of about c per step."""

    def __init__(self, width: int = 6, dropout: float = 0.0, batchnorm: bool = False,
                 contraction: float | None = None):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.inject = nn.Linear(width, width, bias=False)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        if contraction is not None:
            with torch.no_grad():
                self.mix.weight.mul_(contraction / torch.linalg.matrix_norm(self.mix.weight, 2))

    def forward(self, z, x):
        return self.drop(torch.tanh(self.norm(self.mix(z) + self.inject(x))))


DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

# Relative error allowed for one rounding of the result into the written dtype, measured
# against the float64 reference and relative to the size of the terms being combined.
# bf16 keeps 8 significant bits (half-ulp 2^-9 ~ 2e-3); one ulp covers double rounding.
ROUNDING = {torch.float64: 4e-16, torch.float32: 1.2e-7, torch.bfloat16: 7.9e-3, torch.float16: 9.8e-4}


def rounded(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """Error bound of one rounding of ``value`` into ``dtype``: relative for normal numbers,
    plus half the subnormal spacing, which is absolute (float16 gradients reach it)."""
    info = torch.finfo(dtype)
    return ROUNDING[dtype] * value.abs() + info.smallest_normal * info.eps / 2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str) -> None:
    """|actual - expected| <= bound elementwise, with a message saying where and how much."""
    actual64, expected64 = actual.double(), expected.double()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=actual.device)
    err = (actual64 - expected64).abs()
    excess = err - bound
    if excess.numel() and bool((excess > 0).any()):
        idx = int(excess.flatten().argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), actual.shape))
        bad = int((excess > 0).sum())
        b = bound.expand_as(err).flatten()[idx]
        raise AssertionError(
            f"{what}: {bad}/{err.numel()} elements exceed the bound; worst at index {where}: "
            f"got {actual64.flatten()[idx].item():.17g}, expected {expected64.flatten()[idx].item():.17g}, "
            f"|diff| {err.flatten()[idx].item():.3g} > bound {b.item():.3g}; max |diff| {err.max().item():.3g}"
        )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


class RecurrentBlock(nn.Module):
    """f(z, x) = rnn(z + x) over dim 1 (batch first): ``kind`` is "LSTM", "GRU" or "RNN". These
    modules keep their own list of their weights (``_flat_weights``) and may pick kernels by
    autograd's mode."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(width, width, batch_first=True)

    def forward(self, z, x):
        return self.rnn(z + x)[0]


class ResidualBlock(nn.Module):
    """A residual, transformer-shaped f(z, x) = z + scale * MLP(LN(z + W x)): expansive (its
    Jacobian is I + ...), the case where a float reversal drifts. The language model's block
    has this shape."""

    def __init__(self, width: int = 32, scale: float = 0.5, dropout: float = 0.0):
        super().__init__()
        self.inject = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.scale = scale

    def forward(self, z, x):
        return z + self.scale * self.mlp(self.norm(z + self.inject(x)))


def misaligned_copy(t: torch.Tensor, misaligned: bool = True) -> torch.Tensor:
    """A contiguous copy of t; misaligned makes it a view one element into a larger buffer, so
    its data pointer is not 16-byte aligned and vector kernels must take their scalar paths."""
    offset = 1 if misaligned else 0
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buffer[offset:].view(t.shape)
    view.copy_(t)
    return view


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers, for assert_equal_bits on floats (NaN equals NaN, -0.0 is not 0.0)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


def assert_equal_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality of two integer tensors, naming the first differing element."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    differ = actual != expected
    if bool(differ.any()):
        idx = int(differ.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(differ.sum())}/{differ.numel()} elements differ; first at flat index "
                             f"{idx}: got {int(actual.flatten()[idx])}, expected {int(expected.flatten()[idx])}")
