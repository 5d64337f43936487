"""The settings of a solve, each validated here and nowhere else.

``SolveSettings`` is what ``ReversibleDEQ`` and ``solve`` run; ``DEQSettings`` is what
``DEQ`` runs: the classic solvers and adjoints, with their defaults filled in and the
settings a choice does not use rejected. Both are frozen, so what a module runs is what
was validated when it was built; change one with ``dataclasses.replace``, which
validates again. ``Problem`` (problem.py) reads them, the solvers read ``Problem``, and
the LM config validates its solver keys by building a ``SolveSettings``.

The backend name is checked where it is resolved for a device (``ops.resolve_backend``),
since what is valid depends on the device and on ``$REVDEQ_BACKEND`` at call time.
"""

from __future__ import annotations

import collections.abc
import itertools
import math
import operator
import warnings
from dataclasses import dataclass

import torch

from . import fixed_point
from .ops import STATE_DTYPES

NONFINITE_MODES = ("raise", "warn")
# How f's random ops (dropout) draw within one solve; rng.py says what each mode replays.
RNG_MODES = ("per_solve", "per_evaluation", "global")
REVERSALS = ("float", "exact")
REVERSIBLE_ADJOINTS = ("reversible", "unrolled")
ITERATIVE_SOLVERS = ("fixed_point", "anderson", "broyden")
SOLVERS = ITERATIVE_SOLVERS + ("reversible",)
DEQ_ADJOINTS = ("unrolled", "implicit", "phantom", "reversible")
DEFAULT_MAX_STEPS = {"fixed_point": 30, "anderson": 30, "broyden": 30, "reversible": 8}
DEFAULT_BETA = {"fixed_point": 1.0, "anderson": 1.0, "broyden": 1.0, "reversible": 0.8}
# m: Anderson's window of past states, Broyden's number of stored inverse-Jacobian pairs.
DEFAULT_M = {"anderson": 5, "broyden": 30}
DEFAULT_LAM, DEFAULT_PHANTOM_STEPS = 1e-4, 5


class SettingError(ValueError):
    """A setting out of range; ``name`` is the setting, ``reason`` what it must be."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} {reason}")
        self.name, self.reason = name, reason


def coupling(name: str, value) -> float:
    value = float(value)
    if not (0.0 < value < 2.0) or value == 1.0 or not math.isfinite(value):
        raise SettingError(name, f"must be in (0, 2) and != 1 (the inverse divides by 1 - {name}), got {value}")
    return value


def damping(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise SettingError(name, f"is a damping and must be in (0, 1], got {value}")
    return value


def count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(name, f"must be an int >= 1, got {value!r}")
    return value


def tolerance(name: str, value) -> float:
    value = 0.0 if value is None else float(value)
    if not value >= 0.0:
        raise SettingError(name, f"must be >= 0 (0 runs exactly the maximum number of steps), got {value}")
    return value


def choice(name: str, value, choices) -> None:
    if value not in choices:
        raise SettingError(name, f"must be one of {tuple(choices)}, got {value!r}")


def _step(k, max_steps: int) -> int:
    """One step of ``states_at`` as an int: numpy and integer 0-d tensor scalars count (they
    have ``__index__``); bools and floats do not."""
    try:
        step = None if isinstance(k, bool) else operator.index(k)
    except TypeError:
        step = None
    if step is None or not 1 <= step <= max_steps:
        raise ValueError(f"states_at must hold ints in 1..max_steps={max_steps}, got {k!r}")
    return step


def state_steps(value, max_steps: int) -> tuple[int, ...]:
    """``states_at``, the steps whose states a call returns besides the solution: increasing
    ints in 1..max_steps (a call's argument, checked against its settings)."""
    if value is None:
        return ()
    if isinstance(value, int):
        raise TypeError(f"states_at must be a sequence of steps, got the int {value}: pass ({value},)")
    if (isinstance(value, (str, bytes, collections.abc.Set, collections.abc.Mapping))  # unordered or not steps
            or not isinstance(value, collections.abc.Iterable)):
        raise TypeError(f"states_at must be a sequence of steps (a tuple, list or range), got {type(value).__name__} "
                        f"{value!r}")
    steps = tuple(value)
    if not steps:
        raise ValueError("states_at is empty; give at least one step, or None")
    steps = tuple(_step(k, max_steps) for k in steps)
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"states_at must be increasing, got {steps}")
    return steps


def _rng(settings) -> None:
    """``rng``, and ``replay_rng``, the bool it replaced: True was "per_evaluation" (the default
    before "per_solve"), False "global". The old name warns and is cleared, so that
    ``dataclasses.replace`` on the result validates ``rng`` alone."""
    old = settings.replay_rng
    if old is not None:
        if not isinstance(old, bool):
            raise SettingError("replay_rng", f"must be True or False, got {old!r}; it is deprecated: use rng")
        if settings.rng != "per_solve":
            raise SettingError("replay_rng", f"and rng={settings.rng!r} are both given; replay_rng is deprecated: "
                               "give rng alone")
        replacement = "per_evaluation" if old else "global"
        warnings.warn(f"replay_rng={old} is deprecated: pass rng={replacement!r} (the default is now 'per_solve': "
                      "one dropout mask for every evaluation of f in a solve)", DeprecationWarning, stacklevel=5)
        settings._set(rng=replacement, replay_rng=None)
    choice("rng", settings.rng, RNG_MODES)


def _state_dtype(value) -> None:
    if value is not None and value not in STATE_DTYPES:
        raise TypeError(f"state_dtype must be one of {STATE_DTYPES} or None, got {value}")


def _checkpoint_every(value) -> None:
    if value is not None:
        count("checkpoint_every", value)


def _reversal(settings, solver_uses: str | None) -> None:
    """reversal and frac_bits, checked against beta, checkpoint_every and the adjoint.
    ``solver_uses``: why no reversal applies (another solver/adjoint), or None.

    reversal=None is the default: "exact", or "float" when checkpoint_every is given (the
    checkpoints exist to restart a drifting float reconstruction) or no reversal applies.
    frac_bits=None stays None: the solve picks it from f's dtype (fixed_point.default_frac_bits).
    """
    reversal = settings.reversal
    if reversal is None:
        reversal = "float" if solver_uses is not None or settings.checkpoint_every is not None else "exact"
    choice("reversal", reversal, REVERSALS)
    # Not written back into the field: dataclasses.replace(adjoint="unrolled") must see the
    # user's None again, not an "exact" that no longer applies.
    settings._set(_reversal=reversal)
    if reversal == "float":
        _reject_unused(dict(frac_bits=settings.frac_bits), "by reversal='float' (only by 'exact')")
        if solver_uses is None:
            _warn_near_one(settings.beta, settings.max_steps)
        return
    if solver_uses is not None:
        raise SettingError("reversal='exact'", f"rebuilds the reversible adjoint's states; {solver_uses}")
    try:
        fixed_point.beta_ratio(settings.beta)
    except ValueError as error:
        raise SettingError("beta", f"{error}; or pass reversal='float'") from None
    if settings.frac_bits is not None:
        low, high = fixed_point.FRAC_BITS_RANGE
        frac_bits = settings.frac_bits
        if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not low <= frac_bits <= high:
            raise SettingError("frac_bits", f"must be an int in [{low}, {high}] (states hold |value| < "
                               f"2**(62 - frac_bits)), got {frac_bits!r}")
    if settings.checkpoint_every is not None:
        raise SettingError("checkpoint_every", "is not used by reversal='exact': the reconstruction is "
                           "exact at every step, so there is no drift to restart from")


# |1 - beta| below this: the float reversal's division by 1 - beta multiplies rounding
# errors by more than 100 per reverse step.
NEAR_ONE = 0.01


def _warn_near_one(beta: float, max_steps: int) -> None:
    gap = abs(1.0 - beta)
    if gap < NEAR_ONE:
        per_step = 1.0 / gap
        total = math.inf if max_steps * math.log10(per_step) > 300 else per_step ** max_steps
        warnings.warn(f"beta={beta!r} is {gap:.2g} from 1: each step of the float reversal divides by 1 - beta, "
                      f"multiplying rounding errors by {per_step:.3g} (up to {total:.3g} over max_steps={max_steps}); "
                      "the gradients will be noise. Take beta farther from 1, or reversal='exact'",
                      RuntimeWarning, stacklevel=4)


def _user(solver: str, backward_solver: str | None, only: str) -> str:
    return (f"by solver={solver!r}" + (f" and backward_solver={backward_solver!r}" if backward_solver else "")
            + f" (only by {only})")


def _reject_unused(names: dict, user: str) -> None:
    given = [name for name, value in names.items() if value is not None]
    if given:
        raise SettingError(", ".join(given), f"{'is' if len(given) == 1 else 'are'} not used {user}")


class _Frozen:
    def _set(self, **values) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class SolveSettings(_Frozen):
    """The reversible iteration: coupling ``beta`` in (0, 2), != 1; see ``ReversibleDEQ``."""

    beta: float = 0.8
    max_steps: int = 8
    tol: float | None = 1e-3
    state_dtype: torch.dtype | None = None
    checkpoint_every: int | None = None
    backend: str | None = None
    adjoint: str = "reversible"
    on_nonfinite: str = "raise"
    rng: str = "per_solve"
    reversal: str | None = None
    frac_bits: int | None = None
    replay_rng: bool | None = None  # deprecated: rng

    def __post_init__(self):
        choice("adjoint", self.adjoint, REVERSIBLE_ADJOINTS)
        _rng(self)
        choice("on_nonfinite", self.on_nonfinite, NONFINITE_MODES)
        _state_dtype(self.state_dtype)
        _checkpoint_every(self.checkpoint_every)
        self._set(beta=coupling("beta", self.beta), max_steps=count("max_steps", self.max_steps),
                  tol=tolerance("tol", self.tol))
        _reversal(self, None if self.adjoint == "reversible" else
                  f"adjoint={self.adjoint!r} differentiates through the forward graph instead")

    @property
    def resolved_reversal(self) -> str:
        """"float" or "exact": ``reversal``, or what None resolves to."""
        return self._reversal


@dataclass(frozen=True)
class DEQSettings(_Frozen):
    """A ``DEQ``'s solver and adjoint; ``None`` means the default for the choice made
    (and stays ``None`` for the settings that choice does not use). ``m`` stays ``None``
    unless given: Anderson and Broyden (forward, or as backward_solver) then each use their
    own default, ``memory(solver)``."""

    solver: str = "anderson"
    adjoint: str = "implicit"
    max_steps: int | None = None
    tol: float | None = 1e-3
    beta: float | None = None
    m: int | None = None
    lam: float | None = None
    backward_solver: str | None = None
    backward_max_steps: int | None = None
    backward_tol: float | None = None
    backward_beta: float | None = None
    phantom_steps: int | None = None
    phantom_beta: float | None = None
    checkpoint_every: int | None = None
    state_dtype: torch.dtype | None = None
    backend: str | None = None
    on_nonfinite: str = "raise"
    rng: str = "per_solve"
    reversal: str | None = None
    frac_bits: int | None = None
    replay_rng: bool | None = None  # deprecated: rng

    def __post_init__(self):
        solver, adjoint = self.solver, self.adjoint
        choice("solver", solver, SOLVERS)
        choice("adjoint", adjoint, DEQ_ADJOINTS)
        if adjoint == "reversible" and solver != "reversible":
            raise SettingError(
                "adjoint='reversible'",
                f"reconstructs the states of the reversible iteration and needs solver='reversible', got "
                f"solver={solver!r}; use adjoint in {tuple(a for a in DEQ_ADJOINTS if a != 'reversible')} "
                "with this solver")
        choice("on_nonfinite", self.on_nonfinite, NONFINITE_MODES)
        _rng(self)
        _state_dtype(self.state_dtype)
        max_steps = count("max_steps", DEFAULT_MAX_STEPS[solver] if self.max_steps is None else self.max_steps)
        tol = tolerance("tol", self.tol)
        beta = DEFAULT_BETA[solver] if self.beta is None else self.beta
        beta = coupling("beta", beta) if solver == "reversible" else damping("beta", beta)
        self._set(max_steps=max_steps, tol=tol, beta=beta)
        adjoint_damping = 1.0 if solver == "reversible" else beta

        backward = dict(backward_solver=self.backward_solver, backward_max_steps=self.backward_max_steps,
                        backward_tol=self.backward_tol, backward_beta=self.backward_beta)
        if adjoint != "implicit":
            _reject_unused(backward, f"by adjoint={adjoint!r} (only by 'implicit')")
        else:
            backward_solver = self.backward_solver or "fixed_point"
            choice("backward_solver", backward_solver, ITERATIVE_SOLVERS)
            self._set(
                backward_solver=backward_solver,
                backward_max_steps=count("backward_max_steps", max_steps if self.backward_max_steps is None
                                         else self.backward_max_steps),
                backward_tol=tol if self.backward_tol is None else tolerance("backward_tol", self.backward_tol),
                backward_beta=damping("backward_beta", adjoint_damping if self.backward_beta is None
                                      else self.backward_beta))

        phantom = dict(phantom_steps=self.phantom_steps, phantom_beta=self.phantom_beta)
        if adjoint != "phantom":
            _reject_unused(phantom, f"by adjoint={adjoint!r} (only by 'phantom')")
        else:
            self._set(
                phantom_steps=count("phantom_steps", DEFAULT_PHANTOM_STEPS if self.phantom_steps is None
                                    else self.phantom_steps),
                phantom_beta=damping("phantom_beta", adjoint_damping if self.phantom_beta is None
                                     else self.phantom_beta))

        used = (solver, self.backward_solver)
        if not {"anderson", "broyden"} & set(used):
            _reject_unused(dict(m=self.m), _user(solver, self.backward_solver, "'anderson' and 'broyden'"))
        elif self.m is not None:
            self._set(m=count("m (Anderson window / Broyden memory)", self.m))
        if "anderson" not in used:
            _reject_unused(dict(lam=self.lam), _user(solver, self.backward_solver, "'anderson'"))
        else:
            lam = float(DEFAULT_LAM if self.lam is None else self.lam)
            if not (math.isfinite(lam) and lam >= 0.0):
                raise SettingError("lam (Anderson regularisation)", f"must be finite and >= 0, got {lam}")
            self._set(lam=lam)

        if adjoint != "reversible":
            _reject_unused(dict(checkpoint_every=self.checkpoint_every),
                           f"by adjoint={adjoint!r} (only by 'reversible')")
        _checkpoint_every(self.checkpoint_every)
        _reversal(self, None if adjoint == "reversible" else f"it needs solver='reversible' and "
                  f"adjoint='reversible', got solver={solver!r}, adjoint={adjoint!r}")

    resolved_reversal = SolveSettings.resolved_reversal

    def memory(self, solver: str) -> int | None:
        """m for ``solver``: the user's, else that solver's default (None if it uses none)."""
        return self.m if self.m is not None else DEFAULT_M.get(solver)

    def reversible_solve(self) -> SolveSettings:
        """The settings of ``solve`` for solver='reversible' with its own adjoints."""
        return SolveSettings(
            beta=self.beta, max_steps=self.max_steps, tol=self.tol, state_dtype=self.state_dtype,
            checkpoint_every=self.checkpoint_every, backend=self.backend, adjoint=self.adjoint,
            on_nonfinite=self.on_nonfinite, rng=self.rng, reversal=self.reversal,
            frac_bits=self.frac_bits)
