"""What a solve reports: steps, residuals, function evaluations, reconstruction drift."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .convergence import at_two_cycle
from .rng import EvaluationRNG


@dataclass
class SolverStats:
    """Filled by the forward solve; ``nfe_backward`` and ``reconstruction_error`` are filled
    by the backward pass (they stay 0 / None until it runs).

    residual: per-sample ||z - f(z)|| / (1e-5 + ||f(z)||) at the returned state, shape [B].
    abs_residual: per-sample ||z - f(z)|| there, shape [B] (a relative residual can fall
        only because ||z|| grows, as with a residual block ``z + g(z)``; this one cannot).
    residual_history: the max over the batch of that residual after each step.
    pair_residual: the reversible iteration only: per-sample ||y - f(z)|| / (1e-5 + ||f(z)||)
        at the returned state, from the f(z) the stop test already has. The iteration stands
        still wherever y = f(z) and z = f(y): at a fixed point of f, and also at a 2-cycle of
        f, where this is at rounding level while ``residual`` is not (``at_two_cycle``).
    reconstruction_error: for the reversible adjoint, max |reconstructed - true| over the
        states the backward pass lands on (the start, and every checkpoint), divided by
        max |z_N| (the scale of the state). 0 means the inverse was exact in floating point.
    random_stream: the seeds f's random ops drew from (rng.py), for ``rng.replaying``.
    """

    steps: int = 0
    residual: Tensor | None = None
    abs_residual: Tensor | None = None
    residual_history: list[float] = field(default_factory=list)
    pair_residual: Tensor | None = None
    nfe_forward: int = 0
    nfe_backward: int = 0
    reconstruction_error: float | None = None
    backend: str = "torch"
    random_stream: EvaluationRNG | None = field(default=None, repr=False)

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual is not None and self.residual.numel() else 0.0

    @property
    def max_abs_residual(self) -> float:
        return float(self.abs_residual.max()) if self.abs_residual is not None and self.abs_residual.numel() else 0.0

    @property
    def at_two_cycle(self) -> Tensor | None:
        """Per-sample bool, the reversible iteration only: the solve ended at a 2-cycle of f
        (residual above 1e-3, pair_residual below 1% of it), not at a fixed point; more steps
        will not move it. None for the other solvers."""
        if self.pair_residual is None or self.residual is None:
            return None
        return at_two_cycle(self.residual, self.pair_residual)


@dataclass
class Solution:
    """Return value of :func:`revdeq_kernels.solve`: the equilibrium ``z`` and the live stats.

    ``states`` holds the states a call asked for with ``states_at`` (steps past the stop are
    the returned ``z``). The stats' fields are readable directly (``sol.steps``,
    ``sol.residual``, ...); the backward pass writes into the same stats object, so
    ``sol.reconstruction_error`` is filled after ``loss.backward()``.
    """

    z: Tensor | tuple[Tensor, ...]  # a tuple for a state of several tensors
    stats: SolverStats
    states: list = field(default_factory=list)  # z after each step of ``states_at``, in its order

    def __getattr__(self, name: str):
        if name in SolverStats.__dataclass_fields__ or name in ("max_residual", "max_abs_residual", "at_two_cycle"):
            return getattr(self.__dict__["stats"], name)
        raise AttributeError(f"Solution has no attribute {name!r}")
