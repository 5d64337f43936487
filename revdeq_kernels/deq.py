"""``DEQ``: the classic deep-equilibrium baselines behind the interface of ``ReversibleDEQ``.

    deq = DEQ(f, solver="anderson", adjoint="implicit", max_steps=30, tol=1e-3)
    z = deq(x)              # or deq(x, z0=..., context=c): f(z, x, context=c), c differentiated
    deq.last_stats          # SolverStats, the same fields as ReversibleDEQ's

solver:  "fixed_point" (relaxed iteration, damping beta in (0, 1], default 1),
         "anderson"    (Anderson acceleration, window m=5, regularisation lam=1e-4, damping beta),
         "broyden"     (Broyden's method, m=30 stored inverse-Jacobian pairs, first step damped by beta),
         "reversible"  (the RevDEQ iteration, coupling beta in (0, 2) != 1, default 0.8).
adjoint: "unrolled"    autograd through every solver step (exact for the iteration; memory grows),
         "implicit"    implicit-function-theorem adjoint, solved by backward_solver,
         "phantom"     autograd through phantom_steps damped steps from z* (phantom_beta),
                       or, with states_at, from each returned state (fixed-point correction),
         "reversible"  the exact reversible backward; needs solver="reversible".

Statistics (``last_stats``), per method, with N = ``steps``:
    nfe_forward   evaluations of f in the forward call: 1 + N for fixed_point/anderson/broyden
                  (f(z_0), then one per step), 1 + 2N for reversible.
    nfe_backward  evaluations of f (new forward passes of f) in the backward call:
                  unrolled 0 (autograd replays the stored graphs: nfe_forward VJPs),
                  implicit 1 (f(z*) rebuilt once; the adjoint solve's VJPs through it are
                  counted in ``last_adjoint_stats``), phantom k (k per state backpropagated
                  through, with ``states_at``), reversible 2N.
    reconstruction_error  None unless adjoint="reversible".
``last_adjoint_stats`` (implicit only, filled by the backward pass): the adjoint solve's
steps and residuals; its nfe_forward counts the VJPs of that solve (1 + its steps), and one
more VJP gives the gradients of x and the parameters.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn

from .packing import is_several, solve_several
from .convergence import Trajectory
from .f_module import attach_f, bind_context, gradient_inputs
from .problem import eager_under_compile, make_problem
from .reversal import forward_solve
from .reversible import ReversibleDEQ, solve
from .settings import DEQSettings, state_steps
from .solvers import AtEquilibriumFunction, ImplicitAdjoint, PhantomAdjoint, iterative_solver
from .stats import SolverStats

class DEQ(nn.Module):
    """A deep equilibrium layer z* = f(z*, x) with a choice of forward solver and adjoint.

    Args:
        f: ``f(z, x) -> z'``, an nn.Module (its parameters are trained) or a callable.
        solver: "fixed_point", "anderson", "broyden" or "reversible".
        adjoint: "unrolled", "implicit", "phantom" or "reversible" (reversible solver only).
        max_steps: at most this many solver steps (default 30; 8 for the reversible solver).
        tol: stop when every sample's ||z - f(z)|| / (1e-5 + ||f(z)||) <= tol; 0 runs
            exactly ``max_steps`` steps.
        beta: damping of fixed_point/anderson/broyden in (0, 1] (default 1; Broyden's
            initial inverse Jacobian is -beta I), or the reversible coupling in (0, 2),
            != 1 (default 0.8).
        m: Anderson's window of past states (int >= 1, default 5), or the number of
            inverse-Jacobian pairs Broyden stores before it restarts (default 30, all of
            the default 30 steps, as locuslab/deq keeps them); with both solvers (one
            forward, one as backward_solver) a given m applies to both.
        lam: Anderson's regularisation (>= 0, relative to the mean squared residual in
            the window, default 1e-4).
        backward_solver, backward_max_steps, backward_tol, backward_beta: the implicit
            adjoint's solve (default: "fixed_point", max_steps, tol, and beta for the
            fixed_point/anderson/broyden solvers or 1 after the reversible one).
            backward_solver="broyden" with solver="broyden" is the classic DEQ recipe
            of locuslab/deq.
        phantom_steps, phantom_beta: the phantom adjoint's k (default 5) and damping
            (default: as backward_beta).
        checkpoint_every, reversal, frac_bits: adjoint="reversible" only; see ReversibleDEQ.
        state_dtype, backend, on_nonfinite, rng: as in ReversibleDEQ (replay_rng: deprecated, rng).
    A setting that the chosen solver/adjoint does not use is an error, not ignored.
    """

    def __init__(self, f, solver: str = "anderson", adjoint: str = "implicit", max_steps: int | None = None,
                 tol: float | None = 1e-3, beta: float | None = None, *, m: int | None = None,
                 lam: float | None = None, backward_solver: str | None = None,
                 backward_max_steps: int | None = None, backward_tol: float | None = None,
                 backward_beta: float | None = None, phantom_steps: int | None = None,
                 phantom_beta: float | None = None, checkpoint_every: int | None = None,
                 state_dtype: torch.dtype | None = None, backend: str | None = None,
                 on_nonfinite: str = "raise", rng: str = "per_solve", reversal: str | None = None,
                 frac_bits: int | None = None, replay_rng: bool | None = None):
        super().__init__()
        attach_f(self, f)
        self.settings = DEQSettings(
            solver=solver, adjoint=adjoint, max_steps=max_steps, tol=tol, beta=beta, m=m, lam=lam,
            backward_solver=backward_solver, backward_max_steps=backward_max_steps, backward_tol=backward_tol,
            backward_beta=backward_beta, phantom_steps=phantom_steps, phantom_beta=phantom_beta,
            checkpoint_every=checkpoint_every, state_dtype=state_dtype, backend=backend,
            on_nonfinite=on_nonfinite, rng=rng, reversal=reversal, frac_bits=frac_bits, replay_rng=replay_rng)
        self.last_stats: SolverStats | None = None
        self.last_adjoint_stats: SolverStats | None = None

    def _iterate(self, name: str):
        return iterative_solver(name, self.settings.memory(name), self.settings.lam)

    @eager_under_compile
    def forward(self, x, z0=None, *, states_at=None, **context):
        """z* = f(z*, x, **context); the context's tensors that require grad get gradients.
        x and z0 may be tuples of tensors, as for ``rk.solve``.

        ``states_at=(k1, k2, ...)`` returns instead the list of z after those steps (a step
        past the stop is the solution), for a loss on the trajectory. Their gradients: with
        adjoint="reversible" or "unrolled", the iteration's own (exact); with "phantom", each
        state's own phantom gradient, its phantom_steps damped steps taken from that state
        (the fixed-point correction of Bai et al. 2022, torchdeq's ``indexing``)."""
        s = self.settings
        keep = state_steps(states_at, s.max_steps)
        if keep and s.adjoint == "implicit":
            raise ValueError("states_at with adjoint='implicit': the implicit adjoint differentiates at the fixed "
                             "point only, and z after k steps is not one; use adjoint='phantom' (each state its "
                             "own phantom gradient, torchdeq's fixed-point correction) or 'unrolled' (the "
                             "iteration's exact gradients)")
        self.last_adjoint_stats = None
        f, context_tensors = bind_context(self.f, context)
        if is_several(x) or is_several(z0):
            states = solve_several(f, x, z0, lambda packed_f, x_flat, z0_flat: (
                self._solve(packed_f, x_flat, z0_flat, context_tensors, keep), None))[0]
        else:
            states = self._solve(f, x, z0, context_tensors, keep)
        return states if keep else states[0]

    def _solve(self, f, x: Tensor, z0: Tensor | None, context_tensors: list, keep: tuple[int, ...]) -> list[Tensor]:
        """[z*], or the states of ``keep``."""
        s = self.settings
        if s.solver == "reversible" and s.adjoint in ("reversible", "unrolled"):
            solution = solve(f, x, z0, settings=s.reversible_solve(), parameters=context_tensors or None,
                             states_at=keep or None)
            self.last_stats = solution.stats
            return solution.states if keep else [solution.z]
        return self._solve_at_equilibrium(f, x, z0, context_tensors, keep)

    def _solve_at_equilibrium(self, f, x: Tensor, z0: Tensor | None, context_tensors: list,
                              keep: tuple[int, ...]) -> list[Tensor]:
        s = self.settings
        params = gradient_inputs(f, context_tensors)
        problem, start = make_problem(f, x, z0, s, params)
        self.last_stats = problem.stats
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or (s.adjoint == "unrolled" and z0 is not None and z0.requires_grad))
        if not needs_grad:
            with torch.no_grad():
                return problem.as_output(self._solve_without_graph(problem, x, start, keep))
        if s.adjoint == "unrolled":
            return problem.as_output(self._solve_unrolled(problem, x, z0, start, keep))
        if s.adjoint == "implicit":
            self.last_adjoint_stats = SolverStats(backend=problem.backend)
            adjoint = ImplicitAdjoint(self._iterate(s.backward_solver), s.backward_beta, s.backward_max_steps,
                                      s.backward_tol, self.last_adjoint_stats)
        else:
            adjoint = PhantomAdjoint(s.phantom_steps, s.phantom_beta)
        versions = problem.parameter_versions()  # f may not change them until the backward
        with torch.no_grad():
            states = self._solve_without_graph(problem, x, start, keep)
        # z*, or each state of keep, gets the adjoint's backward from where it stands
        return problem.as_output([AtEquilibriumFunction.apply(problem, versions, partial(_given, state), adjoint, x,
                                                              *params) for state in states])

    def _solve_without_graph(self, problem, x: Tensor, start: Tensor, keep: tuple[int, ...] = ()) -> list[Tensor]:
        """[z*], or the states of ``keep``."""
        if self.settings.solver == "reversible":
            z, states = forward_solve(problem, x, start, keep)
            return states if keep else [z]
        trajectory = Trajectory(keep, copy=True)  # the fixed-point solve updates its state in place
        z = self._iterate(self.settings.solver)(problem, partial(_call_f, problem, x), start.clone(),
                                                visit=trajectory.visit if keep else None)
        problem.stats.nfe_forward = 1 + problem.stats.steps
        return trajectory.states(z) if keep else [z]

    def _solve_unrolled(self, problem, x: Tensor, z0: Tensor | None, start: Tensor,
                        keep: tuple[int, ...]) -> list[Tensor]:
        start = start if z0 is None else z0.to(problem.state_dtype)  # keeps the graph to z0
        trajectory = Trajectory(keep, copy=False)
        z = self._iterate(self.settings.solver)(problem, partial(_call_f, problem, x), start, differentiable=True,
                                                visit=trajectory.visit if keep else None)
        problem.stats.nfe_forward = 1 + problem.stats.steps
        return trajectory.states(z) if keep else [z]

    replaying_rng = ReversibleDEQ.replaying_rng

    def extra_repr(self) -> str:
        """The settings in use: the defaults filled in, the unused ones (None) left out."""
        values = ((field.name, getattr(self.settings, field.name)) for field in dataclasses.fields(self.settings))
        return ", ".join(f"{name}={value!r}" for name, value in values if value is not None)


def _call_f(problem, x: Tensor, state: Tensor, index: int) -> Tensor:
    return problem.call_f(state, x, index)


def _given(state: Tensor) -> Tensor:
    return state
