"""``DEQ``: the classic deep-equilibrium baselines behind the interface of ``ReversibleDEQ``.

    deq = DEQ(f, solver="anderson", adjoint="implicit", max_steps=30, tol=1e-3)
    z = deq(x)              # or deq(x, z0=...)
    deq.last_stats          # SolverStats, the same fields as ReversibleDEQ's

solver:  "fixed_point" (relaxed iteration, damping beta in (0, 1], default 1),
         "anderson"    (Anderson acceleration, window m=5, regularisation lam=1e-4, damping beta),
         "reversible"  (the RevDEQ iteration, coupling beta in (0, 2) != 1, default 0.8).
adjoint: "unrolled"    autograd through every solver step (exact for the iteration; memory grows),
         "implicit"    implicit-function-theorem adjoint, solved by backward_solver,
         "phantom"     autograd through phantom_steps damped steps from z* (phantom_beta),
         "reversible"  the exact reversible backward; needs solver="reversible".

Statistics (``last_stats``), per method, with N = ``steps``:
    nfe_forward   evaluations of f in the forward call: 1 + N for fixed_point/anderson
                  (f(z_0), then one per step), 1 + 2N for reversible.
    nfe_backward  evaluations of f (new forward passes of f) in the backward call:
                  unrolled 0 (autograd replays the stored graphs: nfe_forward VJPs),
                  implicit 1 (f(z*) rebuilt once; the adjoint solve's VJPs through it are
                  counted in ``last_adjoint_stats``), phantom k, reversible 2N.
    reconstruction_error  None unless adjoint="reversible".
``last_adjoint_stats`` (implicit only, filled by the backward pass): the adjoint solve's
steps and residuals; its nfe_forward counts the VJPs of that solve (1 + its steps), and one
more VJP gives the gradients of x and the parameters.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .problem import (check_beta, check_checkpoint_every, check_choice, check_solver_args, make_problem,
                      trainable_parameters)
from .reversible import forward_iteration, solve
from .solvers import ITERATIVE_SOLVERS, AdjointSolve, ImplicitFunction, PhantomFunction, iterative_solver
from .stats import SolverStats

SOLVERS = ITERATIVE_SOLVERS + ("reversible",)
ADJOINTS = ("unrolled", "implicit", "phantom", "reversible")
DEFAULT_MAX_STEPS = {"fixed_point": 30, "anderson": 30, "reversible": 8}
DEFAULT_BETA = {"fixed_point": 1.0, "anderson": 1.0, "reversible": 0.8}
DEFAULT_M, DEFAULT_LAM, DEFAULT_PHANTOM_STEPS = 5, 1e-4, 5


def check_damping(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} is a damping and must be in (0, 1], got {value}")
    return value


def check_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_tol(name: str, value) -> float:
    value = 0.0 if value is None else float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0 (0 runs exactly the maximum number of steps), got {value}")
    return value


def check_lam(lam) -> float:
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lam (Anderson regularisation) must be finite and >= 0, got {lam}")
    return lam


def _reject_unused(names: dict, user: str) -> None:
    given = [name for name, value in names.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used {user}")


class DEQ(nn.Module):
    """A deep equilibrium layer z* = f(z*, x) with a choice of forward solver and adjoint.

    Args:
        f: ``f(z, x) -> z'``, an nn.Module (its parameters are trained) or a callable.
        solver: "fixed_point", "anderson" or "reversible".
        adjoint: "unrolled", "implicit", "phantom" or "reversible" (reversible solver only).
        max_steps: at most this many solver steps (default 30; 8 for the reversible solver).
        tol: stop when every sample's ||z - f(z)|| / (1e-5 + ||f(z)||) <= tol; 0 runs
            exactly ``max_steps`` steps.
        beta: damping of fixed_point/anderson in (0, 1] (default 1), or the reversible
            coupling in (0, 2), != 1 (default 0.8).
        m, lam: Anderson window (int >= 1, default 5) and regularisation (>= 0, relative
            to the mean squared residual in the window, default 1e-4).
        backward_solver, backward_max_steps, backward_tol, backward_beta: the implicit
            adjoint's solve (default: "fixed_point", max_steps, tol, and beta for the
            fixed_point/anderson solvers or 1 after the reversible one).
        phantom_steps, phantom_beta: the phantom adjoint's k (default 5) and damping
            (default: as backward_beta).
        checkpoint_every: adjoint="reversible" only; see ReversibleDEQ.
        state_dtype, backend, on_nonfinite, replay_rng: as in ReversibleDEQ.
    A setting that the chosen solver/adjoint does not use is an error, not ignored.
    """

    def __init__(self, f, solver: str = "anderson", adjoint: str = "implicit", max_steps: int | None = None,
                 tol: float | None = 1e-3, beta: float | None = None, *, m: int | None = None,
                 lam: float | None = None, backward_solver: str | None = None,
                 backward_max_steps: int | None = None, backward_tol: float | None = None,
                 backward_beta: float | None = None, phantom_steps: int | None = None,
                 phantom_beta: float | None = None, checkpoint_every: int | None = None,
                 state_dtype: torch.dtype | None = None, backend: str | None = None,
                 on_nonfinite: str = "raise", replay_rng: bool = True):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be callable (an nn.Module or a function), got {type(f).__name__}")
        check_choice("solver", solver, SOLVERS)
        check_choice("adjoint", adjoint, ADJOINTS)
        if adjoint == "reversible" and solver != "reversible":
            raise ValueError(
                f"adjoint='reversible' reconstructs the states of the reversible iteration and needs "
                f"solver='reversible', got solver={solver!r}; use adjoint in "
                f"{tuple(a for a in ADJOINTS if a != 'reversible')} with this solver")
        self.f, self.solver, self.adjoint = f, solver, adjoint
        self.max_steps = check_steps("max_steps", DEFAULT_MAX_STEPS[solver] if max_steps is None else max_steps)
        self.tol = check_solver_args(self.max_steps, tol, state_dtype, on_nonfinite)
        beta = DEFAULT_BETA[solver] if beta is None else beta
        self.beta = check_beta(beta) if solver == "reversible" else check_damping("beta", beta)
        adjoint_damping = 1.0 if solver == "reversible" else self.beta
        # Settings of parts this DEQ does not use stay None.
        self.backward_max_steps = self.backward_tol = self.backward_beta = None
        self.phantom_steps = self.phantom_beta = self.m = self.lam = None

        if adjoint != "implicit":
            _reject_unused(dict(backward_solver=backward_solver, backward_max_steps=backward_max_steps,
                                backward_tol=backward_tol, backward_beta=backward_beta),
                           f"by adjoint={adjoint!r} (only by 'implicit')")
        self.backward_solver = backward_solver or ("fixed_point" if adjoint == "implicit" else None)
        if adjoint == "implicit":
            check_choice("backward_solver", self.backward_solver, ITERATIVE_SOLVERS)
            self.backward_max_steps = check_steps(
                "backward_max_steps", self.max_steps if backward_max_steps is None else backward_max_steps)
            self.backward_tol = self.tol if backward_tol is None else check_tol("backward_tol", backward_tol)
            self.backward_beta = check_damping(
                "backward_beta", adjoint_damping if backward_beta is None else backward_beta)

        if adjoint != "phantom":
            _reject_unused(dict(phantom_steps=phantom_steps, phantom_beta=phantom_beta),
                           f"by adjoint={adjoint!r} (only by 'phantom')")
        else:
            self.phantom_steps = check_steps(
                "phantom_steps", DEFAULT_PHANTOM_STEPS if phantom_steps is None else phantom_steps)
            self.phantom_beta = check_damping(
                "phantom_beta", adjoint_damping if phantom_beta is None else phantom_beta)

        uses_anderson = "anderson" in (solver, self.backward_solver)
        if not uses_anderson:
            _reject_unused(dict(m=m, lam=lam), f"by solver={solver!r}"
                           + (f" and backward_solver={self.backward_solver!r}" if self.backward_solver else "")
                           + " (only by 'anderson')")
        else:
            self.m = check_steps("m (Anderson window)", DEFAULT_M if m is None else m)
            self.lam = check_lam(DEFAULT_LAM if lam is None else lam)

        if adjoint != "reversible":
            _reject_unused(dict(checkpoint_every=checkpoint_every), f"by adjoint={adjoint!r} (only by 'reversible')")
        check_checkpoint_every(checkpoint_every)
        self.checkpoint_every = checkpoint_every
        self.state_dtype, self.backend = state_dtype, backend
        self.on_nonfinite, self.replay_rng = on_nonfinite, replay_rng
        self.last_stats: SolverStats | None = None
        self.last_adjoint_stats: SolverStats | None = None

    def _iterate(self, name: str):
        return iterative_solver(name, self.m, self.lam)

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        self.last_adjoint_stats = None
        if self.solver == "reversible" and self.adjoint in ("reversible", "unrolled"):
            solution = solve(
                self.f, x, z0, beta=self.beta, max_steps=self.max_steps, tol=self.tol,
                state_dtype=self.state_dtype, checkpoint_every=self.checkpoint_every, backend=self.backend,
                adjoint=self.adjoint, on_nonfinite=self.on_nonfinite, replay_rng=self.replay_rng)
            self.last_stats = solution.stats
            return solution.z
        problem, start = make_problem(
            self.f, x, z0, beta=self.beta,
            max_steps=self.max_steps, tol=self.tol, state_dtype=self.state_dtype, backend=self.backend,
            on_nonfinite=self.on_nonfinite, replay_rng=self.replay_rng)
        params = trainable_parameters(self.f)
        problem.params = params
        self.last_stats = problem.stats
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or (self.adjoint == "unrolled" and z0 is not None and z0.requires_grad))
        solve_forward = partial(self._solve_without_graph, problem, x, start)
        if not needs_grad:
            with torch.no_grad():
                return solve_forward()
        if self.adjoint == "unrolled":
            return self._solve_unrolled(problem, x, z0, start)
        if self.adjoint == "implicit":
            adjoint = AdjointSolve(self._iterate(self.backward_solver), self.backward_beta,
                                   self.backward_max_steps, self.backward_tol)
            self.last_adjoint_stats = SolverStats(backend=problem.backend)
            return ImplicitFunction.apply(problem, solve_forward, adjoint, self.last_adjoint_stats, x, *params)
        return PhantomFunction.apply(problem, solve_forward, self.phantom_steps, self.phantom_beta, x, *params)

    def _solve_without_graph(self, problem, x: Tensor, start: Tensor) -> Tensor:
        if self.solver == "reversible":
            return forward_iteration(problem, x, start, None)[1]
        evaluate = partial(_call_f, problem, x)
        z = self._iterate(self.solver)(problem, evaluate, start.clone())
        problem.stats.nfe_forward = 1 + problem.stats.steps
        return z

    def _solve_unrolled(self, problem, x: Tensor, z0: Tensor | None, start: Tensor) -> Tensor:
        start = start if z0 is None else z0.to(problem.state_dtype)  # keeps the graph to z0
        z = self._iterate(self.solver)(problem, partial(_call_f, problem, x), start, differentiable=True)
        problem.stats.nfe_forward = 1 + problem.stats.steps
        return z

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}", f"adjoint={self.adjoint!r}", f"max_steps={self.max_steps}",
                 f"tol={self.tol}", f"beta={self.beta}"]
        if self.m is not None:
            parts.append(f"m={self.m}, lam={self.lam}")
        if self.adjoint == "implicit":
            parts.append(f"backward_solver={self.backward_solver!r}, backward_max_steps={self.backward_max_steps}, "
                         f"backward_tol={self.backward_tol}, backward_beta={self.backward_beta}")
        if self.adjoint == "phantom":
            parts.append(f"phantom_steps={self.phantom_steps}, phantom_beta={self.phantom_beta}")
        if self.checkpoint_every:
            parts.append(f"checkpoint_every={self.checkpoint_every}")
        return ", ".join(parts)


def _call_f(problem, x: Tensor, state: Tensor, index: int) -> Tensor:
    return problem.call_f(state, x, index)
