"""States and inputs made of several tensors: f((z1, z2, ...), (x1, x2, ...)), as a
multiscale DEQ (MDEQ) keeps one state per resolution.

They are solved as one flat tensor [B, D], the components' per-sample elements side by side,
so that every solver, adjoint, kernel and the stop test see a single state (the residual is
then that of the whole state, per sample). Packing and unpacking happen outside the solve
with differentiable ops (``cat``, ``split``, ``view``), so gradients reach every component
of x and z0 by plain autograd; inside, ``PackedF`` hands f the components as views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def is_several(value) -> bool:
    return isinstance(value, (tuple, list))


@dataclass(frozen=True)
class Layout:
    """The per-sample shapes of a tuple of tensors that share batch size, dtype and device."""

    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors, what: str) -> Layout:
        if len(tensors) == 0:
            raise ValueError(f"{what} is an empty {type(tensors).__name__}; give at least one tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a Tensor")
            if t.dim() == 0:
                raise ValueError(f"{what}[{i}] is 0-d; every component needs the batch dimension (dim 0)")
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=1):
            if t.shape[0] != first.shape[0]:
                raise ValueError(f"{what}[{i}] has batch size {t.shape[0]} but {what}[0] has {first.shape[0]}")
            if t.dtype != first.dtype:
                raise TypeError(f"{what}[{i}] is {t.dtype} but {what}[0] is {first.dtype}; the components share one dtype")
            if t.device != first.device:
                raise ValueError(f"{what}[{i}] is on {t.device} but {what}[0] is on {first.device}")
        return cls(tuple(tuple(t.shape[1:]) for t in tensors))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def pack(self, tensors) -> Tensor:
        batch = tensors[0].shape[0]
        return torch.cat([t.reshape(batch, size) for t, size in zip(tensors, self.sizes)], dim=1)

    def unpack(self, flat: Tensor) -> tuple[Tensor, ...]:
        batch = flat.shape[0]
        return tuple(part.view(batch, *shape) for part, shape in zip(flat.split(self.sizes, dim=1), self.shapes))

    def check_output(self, out, batch: int) -> None:
        """f's output must be the state's components, shape for shape."""
        if not is_several(out) or len(out) != len(self.shapes):
            got = f"a {type(out).__name__}" + (f" of {len(out)}" if is_several(out) else "")
            raise ValueError(f"the state has {len(self.shapes)} components, so f must return a tuple of "
                             f"{len(self.shapes)} tensors; it returned {got}")
        for i, (t, shape) in enumerate(zip(out, self.shapes)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (batch, *shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"f's output [{i}] is {got} but the state's component {i} has shape "
                                 f"{(batch, *shape)}")


class PackedF:
    """f on flat tensors: unpacks z and x into their components, calls f, packs its output.
    ``f`` is kept as ``self.f``, where the solve looks for f's module (parameters, buffers)."""

    def __init__(self, f, z_layout: Layout | None, x_layout: Layout | None):
        self.f, self.z_layout, self.x_layout = f, z_layout, x_layout

    def __call__(self, z: Tensor, x: Tensor) -> Tensor:
        zs = self.z_layout.unpack(z) if self.z_layout is not None else z
        xs = self.x_layout.unpack(x) if self.x_layout is not None else x
        out = self.f(zs, xs)
        if self.z_layout is None:
            return out
        self.z_layout.check_output(out, z.shape[0])
        return self.z_layout.pack(out)


def solve_several(f, x, z0, solve_flat):
    """``solve_flat(packed_f, x_flat, z0_flat) -> (states_flat, extra)`` on the packed problem,
    where ``states_flat`` is a list of flat states (the solution, then any others asked for);
    returns ``(states, extra)`` with each state unpacked as its components (a tuple) when the
    state has several, else the tensor."""
    x_layout = Layout.of(x, "x") if is_several(x) else None
    x_flat = x_layout.pack(x) if x_layout is not None else x
    if is_several(z0):
        z_layout = Layout.of(z0, "z0")
        z0_flat = z_layout.pack(z0)
    elif z0 is None and x_layout is not None:  # the default start: zeros shaped like x's components
        z_layout, z0_flat = x_layout, None
    else:
        z_layout, z0_flat = None, z0
    states_flat, extra = solve_flat(PackedF(f, z_layout, x_layout), x_flat, z0_flat)
    return [z_layout.unpack(z) if z_layout is not None else z for z in states_flat], extra
