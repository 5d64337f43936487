"""The stop test shared by every solver: per-sample relative residual, the tolerance
rule, the residual history, and what happens when the state stops being finite; and the
states a solver keeps for ``states_at``."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

RESIDUAL_EPS = 1e-5
# A state whose relative residual is above this (the LM presets' tol) is not called a fixed
# point of f ...
NOT_A_FIXED_POINT = 1e-3
# ... and it rests at a 2-cycle of f when the pair test (y = f(z) for the reversible
# iteration, f(f(z)) = z for any state) holds this many times more closely than z = f(z):
# a converging transient has both gaps of the residual's size, (J + I)(f(z) - z) for the second.
TWO_CYCLE_RATIO = 1e-2


def at_two_cycle(residual: Tensor, cycle_gap: Tensor) -> Tensor:
    """Per sample: True where the state is not a fixed point (``residual`` above
    NOT_A_FIXED_POINT) and ``cycle_gap``, the 2-cycle test's relative gap, is below
    TWO_CYCLE_RATIO of the residual. NaN reads False."""
    return (residual > NOT_A_FIXED_POINT) & (cycle_gap <= TWO_CYCLE_RATIO * residual)


def relative_residual(sq_res: Tensor, sq_f: Tensor) -> Tensor:
    """Per-sample ||z - f(z)|| / (1e-5 + ||f(z)||) from the two sums of squares."""
    return sq_res.sqrt() / (RESIDUAL_EPS + sq_f.sqrt())


class ConvergenceMonitor:
    """Records the residual after each step and says when to stop.

    With tol > 0 the solver has to look at the residual every step anyway (one device
    sync per step), so a non-finite state is reported at once. With tol = 0 nothing is
    synchronised inside the loop: the history stays on the device and the first
    non-finite step is found once, in ``finish``.
    """

    def __init__(self, problem, explain=None):
        self.problem = problem
        # explain(): a solver that knows more (the exact reversal's flags name f as the cause)
        # raises or warns in its own words and returns True; else the generic report follows
        self.explain = explain
        self.history: list[Tensor] = []
        self.residual: Tensor | None = None
        self.sq_res: Tensor | None = None
        self.reported = False

    def converged(self, step: int, sq_res: Tensor, sq_f: Tensor) -> bool:
        """Record the residual of the state after ``step`` steps; True if it meets tol."""
        self.residual = relative_residual(sq_res, sq_f)
        self.sq_res = sq_res
        worst = self.residual.max() if self.residual.numel() else self.residual.new_zeros(())
        self.history.append(worst)
        if self.problem.tol == 0:
            return False
        if not torch.isfinite(worst):
            self._report(step)
            return False
        return float(worst) <= self.problem.tol

    def finish(self, steps: int) -> None:
        stats = self.problem.stats
        history = torch.stack(self.history).tolist() if self.history else []
        if not self.reported:
            bad = next((i + 1 for i, r in enumerate(history) if not torch.isfinite(torch.tensor(r))), None)
            if bad is not None:
                self._report(bad)
        stats.steps = steps
        stats.residual = self.residual.detach()
        stats.abs_residual = self.sq_res.detach().sqrt()
        stats.residual_history = [float(r) for r in history]

    def _report(self, step: int) -> None:
        if self.reported:
            return
        self.reported = True
        if self.explain is not None and self.explain():
            return
        problem = self.problem
        message = (
            f"DEQ state became non-finite (NaN or Inf) at step {step} of {problem.max_steps}; "
            "lower beta, normalise f's output, or keep the states in float64 (state_dtype)"
        )
        if problem.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


class Trajectory:
    """Keeps z after the steps of ``keep`` as a solver visits them; ``states(z)`` lists them,
    a step past the stop being the solution z, each state a tensor of its own."""

    def __init__(self, keep: tuple[int, ...], copy: bool):
        self.keep, self.copy, self.kept = keep, copy, {}

    def visit(self, step: int, state: Tensor) -> None:
        if step in self.keep:
            self.kept[step] = state.clone() if self.copy else state

    def states(self, z: Tensor) -> list[Tensor]:
        return [z.clone() if state is z else state for state in (self.kept.get(k, z) for k in self.keep)]
