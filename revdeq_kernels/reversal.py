"""How the backward pass gets the forward's states back: the two ``reversal`` modes.

``FloatReversal`` keeps y and z in floating point and inverts each update by division
(``unrelax_``): cheap, and exact only as far as rounding allows; the error is measured and
reported (``reconstruction_error``), with a warning when it is large. ``ExactReversal``
keeps them as fixed-point integers with digit planes (``fixed_point.py``), so every state
the backward rebuilds is the forward's, bit for bit, and a rebuilt start that differs is
an error (f is not bitwise deterministic). Both run the same forward iteration, the same
stop test and the same reverse sweep (``reversible.py``); they differ in the state
arithmetic only.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor

from . import ops
from .convergence import ConvergenceMonitor, relative_residual
from .fixed_point import (FLAG_NONFINITE, FRAC_BITS_RANGE, DigitPlanes, from_fixed, plane_capacity, range_limit,
                          to_fixed)
from .ops.reference import accumulation_dtype
from .problem import NONDETERMINISM, Problem

# A float reversal that lands further than this from the true start (relative to max |z_N|)
# has drifted enough to move the gradient: warn once per f (see docs/numerics.md). With
# 16-bit states or f the floor is a few of that dtype's ulps instead.
RECONSTRUCTION_WARNING = 1e-4
# reversal="exact" warns once per f when its largest state holds fewer than this many bits on
# the fixed-point grid (a relative resolution coarser than 2^-16 ~ 1.5e-5): the solve is still
# exact, but coarser than f's float32 arithmetic by over 2^8 (docs/numerics.md).
RESOLUTION_WARNING_BITS = 16
_warned_drift: weakref.WeakSet = weakref.WeakSet()
_warned_resolution: weakref.WeakSet = weakref.WeakSet()


def drift_threshold(problem: Problem) -> float:
    coarsest = max(torch.finfo(problem.state_dtype).eps, torch.finfo(problem.f_dtype).eps)
    return max(RECONSTRUCTION_WARNING, 4 * coarsest)


def state_scale(z: Tensor) -> float:
    """max |z|, at least the dtype's smallest normal: what relative_gap divides by."""
    return max(float(z.abs().max()) if z.numel() else 0.0, torch.finfo(z.dtype).tiny)


def relative_gap(state: Tensor, truth: Tensor, scale: float) -> float:
    """max |state - truth| / scale; NaN when either holds a NaN (max() would drop it)."""
    if not state.numel():
        return 0.0
    return float((state.to(torch.float64) - truth.to(torch.float64)).abs().max()) / scale


def _worst(gaps: list[float]) -> float:
    return math.nan if any(math.isnan(g) for g in gaps) else max(gaps, default=0.0)


def _warn_once(warned: weakref.WeakSet, f, message: str | Callable[[], str]) -> None:
    """``message``, or the function that writes it (called only when the warning is given)."""
    try:
        if f in warned:
            return
        warned.add(f)
    except TypeError:  # not weak-referenceable: warn every time
        pass
    warnings.warn(message() if callable(message) else message, RuntimeWarning, stacklevel=1)


def _suspects(problem: Problem, probe: tuple[Tensor, Tensor]) -> str:
    """Why f's recomputation differs from its forward evaluation, when that can be told:
    random streams not replayed, or what ``Problem.recomputation_suspect`` measures at ``probe`` (f's
    input state and x). "" when neither."""
    if not problem.rng.enabled:
        return ("rng='global', so any random op in f (dropout) draws other numbers in the backward's "
                "recomputation than in the forward pass: set rng='per_solve' (the default), or make f deterministic")
    return problem.recomputation_suspect(*probe)


def _warn_drift(problem: Problem, error: float, threshold: float, probe: tuple[Tensor, Tensor]) -> None:
    def message() -> str:
        start = (f"the reversible backward rebuilt the start state with a relative error of {error:.3g} (above "
                 f"{threshold:g}): the gradients are inexact")
        suspect = _suspects(problem, probe)
        if suspect:
            return f"{start}: {suspect}"
        return (f"{start}. Use reversal='exact' for bit-exact states, or checkpoint_every=K to restart the "
                "reconstruction every K steps")

    _warn_once(_warned_drift, problem.f, message)


def _warn_resolution(problem: Problem, peak_units: int) -> None:
    """The exact states are small against their grid: say how coarse, and the frac_bits that fixes it."""
    bits = peak_units.bit_length()
    frac_bits = problem.frac_bits
    suggested = min(FRAC_BITS_RANGE[1], frac_bits + 24 - bits)
    _warn_once(_warned_resolution, problem.f,
               f"reversal='exact': the largest state is {math.ldexp(peak_units, -frac_bits):.3g}, only "
               f"{peak_units} steps of the fixed-point grid 2^-{frac_bits} (frac_bits={frac_bits}), so the solve "
               f"is exact but resolves the states to about {1 / peak_units:.1e} relative. Pass "
               f"frac_bits={suggested} (states up to +-{range_limit(suggested):g}) or scale f's output")


class FloatReversal:
    """States in ``problem.state_dtype``; the inverse divides by 1 - beta."""

    def __init__(self, problem: Problem):
        self.problem = problem

    # ---------------------------------------------------------------- forward
    def start(self, start: Tensor) -> tuple[Tensor, Tensor]:
        return start.clone(), start.clone()

    def f_input(self, state: Tensor) -> Tensor:
        return state

    def relax_y(self, y: Tensor, F: Tensor, n: int) -> None:
        ops.relax_(y, F, self.problem.beta, backend=self.problem.backend)

    relax_z = relax_y

    def relax_y_residual(self, y: Tensor, z: Tensor, F: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return ops.relax_residual_(y, z, F, self.problem.beta, backend=self.problem.backend)

    def undo_y(self, y: Tensor, F: Tensor, n: int) -> None:
        ops.unrelax_(y, F, self.problem.beta, backend=self.problem.backend)

    undo_z = undo_y

    def residual(self, z: Tensor, F: Tensor) -> tuple[Tensor, Tensor]:
        return ops.residual_norms(z, F, backend=self.problem.backend)

    def output(self, z: Tensor) -> Tensor:
        return z

    def check_forward(self, z: Tensor) -> None:
        """Nothing to check: a non-finite state shows in the residual (ConvergenceMonitor)."""

    def explain_nonfinite(self) -> bool:
        """Nothing to add to the monitor's report of a non-finite residual."""
        return False

    # ---------------------------------------------------------------- backward
    def finish(self, y: Tensor, z: Tensor, true_start: Tensor, scale: float | None,
               checkpoint_gaps: list[float], probe: tuple[Tensor, Tensor]) -> float:
        """reconstruction_error: the worst gap to the true states, relative to ``scale``
        (max |z_N|; None for the exact reversal, which needs it only on failure). ``probe``, f's
        input at z_N and x, is where a failure's cause is looked for."""
        error = _worst(checkpoint_gaps + [relative_gap(y, true_start, scale), relative_gap(z, true_start, scale)])
        threshold = drift_threshold(self.problem)
        if not math.isnan(error) and error > threshold:
            _warn_drift(self.problem, error, threshold, probe)
        return error


class ExactReversal(FloatReversal):
    """States as int64 fixed point with digit planes; every update is exactly invertible.
    ``flags`` (one int32 per step) collects the kernels' non-finite / out-of-range bits
    and is read once per pass."""

    def __init__(self, problem: Problem):
        super().__init__(problem)
        r = problem.ratio
        self.args = (r.numerator, r.denominator, problem.frac_bits)
        self.capacity = plane_capacity(r)
        self.flags = torch.zeros(problem.max_steps + 1, dtype=torch.int32, device=problem.device)
        self.planes: dict[str, DigitPlanes] = {}
        self.emptied: list[Tensor] = []  # planes the inverse has emptied: all zeros when exact
        self.poisoned = False  # a flagged step under on_nonfinite="warn": results are NaN

    def start(self, start: Tensor) -> tuple[Tensor, Tensor]:
        h = to_fixed(start, self.problem.frac_bits)
        self.planes = {"y": DigitPlanes.empty_like(h, self.capacity), "z": DigitPlanes.empty_like(h, self.capacity)}
        return h, h.clone()

    def f_input(self, state: Tensor) -> Tensor:
        return from_fixed(state, self.problem.frac_bits, self.problem.f_dtype)

    def _forward(self, name: str, state: Tensor, F: Tensor, n: int) -> None:
        ops.exact_relax_(state, self.planes[name].before_forward(), F, self.flags, n, *self.args,
                         backend=self.problem.backend)

    def _inverse(self, name: str, state: Tensor, F: Tensor, n: int) -> None:
        planes = self.planes[name]
        ops.exact_unrelax_(state, planes.current, F, self.flags, n, *self.args, backend=self.problem.backend)
        planes.after_inverse(self.emptied)

    def relax_y(self, y: Tensor, F: Tensor, n: int) -> None:
        self._forward("y", y, F, n)

    def relax_z(self, z: Tensor, F: Tensor, n: int) -> None:
        self._forward("z", z, F, n)

    def relax_y_residual(self, y: Tensor, z: Tensor, F: Tensor, n: int) -> tuple[Tensor, Tensor]:
        sums = ops.exact_relax_residual_(y, self.planes["y"].before_forward(), z, F, self.flags, n, *self.args,
                                         backend=self.problem.backend)
        return self._as_float(sums)

    def _as_float(self, sums: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The sums in the float reversal's dtype, so stats.residual does not depend on the mode."""
        acc = accumulation_dtype(self.problem.state_dtype)
        return sums[0].to(acc), sums[1].to(acc)

    def undo_y(self, y: Tensor, F: Tensor, n: int) -> None:
        self._inverse("y", y, F, n)

    def undo_z(self, z: Tensor, F: Tensor, n: int) -> None:
        self._inverse("z", z, F, n)

    def residual(self, z: Tensor, F: Tensor) -> tuple[Tensor, Tensor]:
        return self._as_float(ops.residual_norms(from_fixed(z, self.problem.frac_bits, torch.float64), F,
                                                 backend=self.problem.backend))

    def _check_flags(self, where: str, flags: list[int] | None = None) -> bool:
        """False when the kernels flagged nothing; else raises, or warns (on_nonfinite="warn")
        and returns True: integer states cannot hold the NaN, so the caller makes its result NaN.
        ``flags``: self.flags already read to the host."""
        flags = self.flags.tolist() if flags is None else flags
        flagged = [n for n, bits in enumerate(flags) if bits]
        if not flagged:
            return False
        step, bits = flagged[0], flags[flagged[0]]
        problem = self.problem
        step += 1  # flags[n] belongs to the updates of step n + 1, counted as the monitor counts
        if bits & FLAG_NONFINITE:
            message = (f"DEQ state became non-finite (NaN or Inf) at step {step} of {problem.max_steps}: f returned "
                       f"a NaN or Inf ({where}, reversal='exact'); lower beta or normalise f's output")
        else:
            message = (f"DEQ state left the exact range +-{range_limit(problem.frac_bits):g} of frac_bits="
                       f"{problem.frac_bits} at step {step} of {problem.max_steps} ({where}, reversal='exact'); "
                       "lower frac_bits or normalise f's output")
        if problem.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message + "; the result is NaN", RuntimeWarning, stacklevel=1)
        return True

    def explain_nonfinite(self) -> bool:
        """The monitor saw a non-finite residual: the flags say at which step f returned the
        NaN or Inf. Reported once (raised, or warned and the result made NaN)."""
        if not self.poisoned:
            self.poisoned = self._check_flags("forward pass")
        return self.poisoned

    def check_forward(self, z: Tensor) -> None:
        peak = z.abs().max().view(1) if z.numel() else z.new_zeros(1)
        *flags, peak_units = torch.cat([self.flags.to(torch.int64), peak]).tolist()  # one read from the device
        self.poisoned = self.poisoned or self._check_flags("forward pass", flags)
        if not self.poisoned and 0 < peak_units < 2 ** RESOLUTION_WARNING_BITS:
            _warn_resolution(self.problem, peak_units)

    def output(self, z: Tensor) -> Tensor:
        out = from_fixed(z, self.problem.frac_bits, self.problem.state_dtype)
        return out.fill_(math.nan) if self.poisoned else out

    # ---------------------------------------------------------------- backward
    def saved(self) -> tuple[list[Tensor], list[Tensor], int, int]:
        y, z = self.planes["y"], self.planes["z"]
        return y.tensors(), z.tensors(), y.used, z.used

    def restore(self, saved) -> None:
        planes_y, planes_z, used_y, used_z = saved
        self.planes = {"y": DigitPlanes.restore(planes_y, self.capacity, used_y),
                       "z": DigitPlanes.restore(planes_z, self.capacity, used_z)}
        self.flags.zero_()
        self.emptied = []

    def finish(self, y: Tensor, z: Tensor, true_start: Tensor, scale: float | None,
               checkpoint_gaps: list[float], probe: tuple[Tensor, Tensor]) -> float:
        if self.poisoned:  # flagged in the forward pass, on_nonfinite="warn": the caller makes the gradients NaN
            return math.nan
        flags = self.flags.tolist()
        # The inverse rebuilds the forward's states from the same f values: a state out of range
        # or non-finite in the backward, when the forward had none, is f computing other bits.
        flagged = max((n for n, bits in enumerate(flags) if bits), default=None)  # the first the backward reached
        h0 = to_fixed(true_start, self.problem.frac_bits)
        leftover = [p for p in self.emptied + [self.planes["y"].current, self.planes["z"].current] if p.any()]
        states_differ = not (torch.equal(y, h0) and torch.equal(z, h0))  # as integers: every bit
        if flagged is None and not states_differ and not leftover:
            return 0.0
        if flagged is not None:
            kind = "non-finite" if flags[flagged] & FLAG_NONFINITE else "outside the exact range"
            what = (f"a state {kind} undoing step {flagged + 1} of {self.problem.stats.steps}, where the forward "
                    "pass had none")
        elif states_differ:
            units = max(float(h0.abs().max()) if h0.numel() else 0.0, 1.0)  # the scale, in grid units
            error = max(relative_gap(y, h0, units), relative_gap(z, h0, units))
            what = f"a start state {error:.3g} (relative to max |z0|) from the true one"
        else:
            what = "the start state but left digits in its planes"
        raise RuntimeError(
            f"reversal='exact' rebuilt {what}: f did not compute the same bits in the backward's "
            "recomputation as in the forward pass: " + (_suspects(self.problem, probe) or (
                "f gave the same bits on three evaluations at the solve's last state, with a graph and without, "
                f"so {NONDETERMINISM}, or for a random op that rng does not replay (one drawing from its own "
                "torch.Generator)")))


def make_reversal(problem: Problem) -> FloatReversal:
    return ExactReversal(problem) if problem.exact else FloatReversal(problem)


def forward_iteration(problem: Problem, reversal: FloatReversal, x: Tensor, start: Tensor,
                      checkpoint_every: int | None, keep: tuple[int, ...] = ()):
    """Run the iteration without a graph. Returns (y_N, z_N, {step: (y, z)} checkpoints,
    the dtype f returns: the backward's cotangents are cast to it, {step: z} for the steps of
    ``keep`` the iteration reached). The states are in the reversal's representation (float,
    or int64 fixed point)."""
    y, z = reversal.start(start)
    F = problem.call_f(reversal.f_input(z), x, 0)
    checkpoints: dict[int, tuple[Tensor, Tensor]] = {}
    kept: dict[int, Tensor] = {}
    monitor = ConvergenceMonitor(problem, explain=reversal.explain_nonfinite)
    steps = problem.max_steps
    for n in range(problem.max_steps):
        if n == 0:
            reversal.relax_y(y, F, 0)
        # Stop test for the state after n steps, fused with the speculative y-update of
        # step n+1 (F is read once for both). On a stop the update is undone by its exact
        # inverse: one extra pass once per solve instead of a separate pass every step.
        elif monitor.converged(n, *reversal.relax_y_residual(y, z, F, n)):
            reversal.undo_y(y, F, n)
            steps = n
            break
        reversal.relax_z(z, problem.call_f(reversal.f_input(y), x, 2 * n + 1), n)
        F = problem.call_f(reversal.f_input(z), x, 2 * n + 2)
        if checkpoint_every and (n + 1) % checkpoint_every == 0 and n + 1 < problem.max_steps:
            checkpoints[n + 1] = (y.clone(), z.clone())
        if n + 1 in keep:
            kept[n + 1] = z.clone()
    else:
        monitor.converged(steps, *reversal.residual(z, F))
    reversal.check_forward(z)
    monitor.finish(steps)
    # F = f(z_N) is at hand: one pass over y tells a 2-cycle (y = f(z) != z) from slow progress
    problem.stats.pair_residual = relative_residual(*reversal.residual(y, F)).detach()
    problem.stats.nfe_forward = 1 + 2 * steps
    return y, z, {k: v for k, v in checkpoints.items() if k < steps}, F.dtype, kept


def kept_states(reversal: FloatReversal, kept: dict[int, Tensor], z_out: Tensor, keep: tuple[int, ...]) -> list:
    """The states of ``keep`` as the solve returns them; a step past the stop is the returned
    ``z_out`` (the iteration stopped there), as a tensor of its own."""
    return [reversal.output(kept[k]) if k in kept else z_out.clone() for k in keep]


def forward_solve(problem: Problem, x: Tensor, start: Tensor, keep: tuple[int, ...] = ()) -> tuple[Tensor, list]:
    """The iteration without a graph or anything saved for a backward: z_N in state_dtype,
    and the states of ``keep``."""
    reversal = make_reversal(problem)
    _, z, _, _, kept = forward_iteration(problem, reversal, x, start, None, keep)
    z_out = reversal.output(z)
    return z_out, kept_states(reversal, kept, z_out, keep)
