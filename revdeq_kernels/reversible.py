"""Reversible DEQ: the forward iteration, its exact algebraic inverse in the backward pass,
the autograd.Function that connects them, and the ``ReversibleDEQ`` module.

Forward (b = beta), from y_0 = z_0 and F = f(z_0):
    y_{n+1} = (1-b) y_n + b F              F = f(z_n), reused from the previous step
    z_{n+1} = (1-b) z_n + b f(y_{n+1})
    F       = f(z_{n+1})                   for the next y-update and the stop test
Backward, for n = N-1 .. 0, from gz = dL/dz_N, gy = 0:
    fy  = f(y_{n+1})  with graph; vjp with cotangent b*gz
    z_n = (z_{n+1} - b fy) / (1-b);        gy <- gy + b J_f(y_{n+1})^T gz
    fz  = f(z_n)      with graph; vjp with cotangent b*gy
    y_n = (y_{n+1} - b fz) / (1-b);        gz <- (1-b) gz + b J_f(z_n)^T gy;  gy <- (1-b) gy
Each reverse step evaluates f exactly twice and reuses those outputs for the
reconstruction. Only x, z_N, y_N (and the optional checkpoints) are saved.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import Tensor, nn

from . import ops
from .first_order import first_order
from .ops.reference import accumulation_dtype
from .f_module import BufferSnapshot, attach_f, bind_context, gradient_inputs
from .packing import is_several, solve_several
from .problem import Problem, eager_under_compile, make_problem
from .reversal import (FloatReversal, forward_iteration, forward_solve, kept_states, make_reversal, relative_gap,
                       state_scale)
from .rng import replaying
from .settings import SolveSettings, state_steps
from .stats import Solution, SolverStats
from .unrolled import unrolled_solve


def _accumulate(total: Tensor | None, grad: Tensor | None) -> Tensor | None:
    if grad is None:
        return total
    return grad.detach().clone() if total is None else total.add_(grad)


class NonfiniteLog:
    """Per record, the float64 sums of some adjoints and of some rebuilt states, each
    non-finite exactly when its tensor holds a NaN or Inf (a float64 sum of float32 values
    cannot overflow). One small stack per record; read once, after the sweep: no device sync
    per step."""

    def __init__(self):
        self.records: list[tuple[int, str, int]] = []  # (step, kind, how many of its sums are adjoints')
        self.sums: list[Tensor] = []

    def record(self, step: int, adjoints: tuple[Tensor, ...], states: tuple[Tensor, ...] = (), *,
               arriving: bool = False) -> None:
        """``arriving``: the adjoints are cotangents as the loss hands them in, not the sweep's."""
        self.records.append((step, "arriving" if arriving else "gradient", len(adjoints)))
        self.sums.append(torch.stack([t.sum(dtype=torch.float64) for t in (*adjoints, *states)]))

    def first_bad(self) -> tuple[int, str] | None:
        """(step, "state") for the first record the backward reached with a non-finite rebuilt
        state, else (step, "arriving" or "gradient") for the first with a non-finite adjoint,
        else None. A state goes first: past a drifted state the adjoints are non-finite too."""
        if not self.records:
            return None
        finite = torch.isfinite(torch.cat(self.sums)).tolist()
        adjoints_ok, states_ok, start = [], [], 0
        for (*_, n_adjoints), sums in zip(self.records, self.sums):
            end = start + len(sums)
            adjoints_ok.append(all(finite[start:start + n_adjoints]))
            states_ok.append(all(finite[start + n_adjoints:end]))
            start = end
        bad_state = next((step for (step, *_), ok in zip(self.records, states_ok) if not ok), None)
        if bad_state is not None:
            return bad_state, "state"
        return next(((step, kind) for (step, kind, _), ok in zip(self.records, adjoints_ok) if not ok), None)


def _report_backward_nonfinite(problem: Problem, step: int, kind: str) -> None:
    steps = problem.stats.steps
    if kind == "arriving":
        problem.report_nonfinite_gradient(
            "" if step == steps else f"the loss's gradient with respect to z after step {step} (states_at) is non-finite")
        return
    if kind == "gradient":
        problem.report_nonfinite_gradient(f"f's vector-Jacobian product overflowed at reverse step {step} of {steps}")
        return
    message = (f"the reversible backward rebuilt a non-finite state (NaN or Inf) at reverse step {step} of {steps}: "
               "the float reconstruction drifted; use reversal='exact' or checkpoint_every=K")
    if problem.on_nonfinite == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, checkpoint_every, keep, x, z0, start, *params):
        ctx.parameter_versions = problem.parameter_versions()
        reversal = make_reversal(problem)
        y, z, checkpoints, ctx.f_out_dtype, kept = forward_iteration(problem, reversal, x, start,
                                                                     checkpoint_every, keep)
        ctx.problem, ctx.reversal, ctx.keep = problem, reversal, keep
        ctx.checkpoint_steps = sorted(checkpoints)
        ctx.z0_given = z0 is not None
        ctx.z0_dtype = z0.dtype if z0 is not None else None
        ctx.z0_anchor = z0 is not None and z0.requires_grad
        # z0 itself only anchors the refusal of second derivatives (first_order.py): the
        # backward reads its detached copy `start`.
        saved = [x, z, y] + ([start] if z0 is not None else []) + ([z0] if ctx.z0_anchor else [])
        for step in ctx.checkpoint_steps:
            saved.extend(checkpoints[step])
        if problem.exact:
            planes_y, planes_z, used_y, used_z = reversal.saved()
            ctx.planes_used, ctx.plane_counts = (used_y, used_z), (len(planes_y), len(planes_z))
            saved.extend(planes_y + planes_z)
            reversal.planes = {}  # from here on held by autograd only, freed after the backward
        ctx.save_for_backward(*saved)
        z_out = reversal.output(z)
        return (z_out, *kept_states(reversal, kept, z_out, keep))

    @staticmethod
    @first_order("the reversible adjoint")
    def backward(ctx, grad_z, *grad_states):
        with ctx.problem.as_solved(ctx.parameter_versions) as params:
            return _ReversibleFunction.reverse_sweep(ctx, grad_z, grad_states, params)

    @staticmethod
    def reverse_sweep(ctx, grad_z, grad_states, params: list[Tensor]):
        """``params``: what the VJPs differentiate for ``problem.params`` (their aliases)."""
        problem: Problem = ctx.problem
        reversal: FloatReversal = ctx.reversal
        x, z_final, y_final, *rest = ctx.saved_tensors
        true_start = rest.pop(0) if ctx.z0_given else torch.zeros(z_final.shape, dtype=problem.state_dtype,
                                                                    device=z_final.device)
        if ctx.z0_anchor:
            rest.pop(0)
        checkpoints = {s: (rest[2 * i], rest[2 * i + 1]) for i, s in enumerate(ctx.checkpoint_steps)}
        if problem.exact:
            planes = rest[2 * len(ctx.checkpoint_steps):]
            count_y = ctx.plane_counts[0]
            reversal.restore((planes[:count_y], planes[count_y:], *ctx.planes_used))
        b, backend, stats = problem.beta, problem.backend, problem.stats
        needs_x, needs_z0 = ctx.needs_input_grad[3], ctx.needs_input_grad[4]

        z, y = z_final.clone(), y_final.clone()  # z_N may be referenced downstream: never mutate it
        # Adjoints accumulate over every step: never narrower than float32 (bf16 states).
        gz = grad_z.to(accumulation_dtype(problem.state_dtype)).contiguous().clone()
        gy = torch.zeros_like(gz)
        # The returned states (states_at): a step past the stop is z_N, whose cotangent joins
        # grad_z; an earlier one joins the sweep where it has rebuilt that step's adjoint.
        state_cotangents = {}
        for step, g in zip(ctx.keep, grad_states):
            if g is not None:
                if step >= stats.steps:
                    gz.add_(g)
                else:
                    state_cotangents[step] = g
        cotangent = torch.mul(gz, b).to(ctx.f_out_dtype)
        x_in = x.detach().requires_grad_(needs_x)
        grad_x, grad_params = None, [None] * len(params)
        scale = None if problem.exact else state_scale(z_final)  # exact compares as integers instead
        checkpoint_gaps: list[float] = []
        nonfinite = NonfiniteLog()
        nonfinite.record(stats.steps, (gz,), arriving=True)

        def evaluate_with_vjp(state: Tensor, index: int):
            nonlocal grad_x
            state = reversal.f_input(state)
            f_in = (state.detach() if state.dtype == problem.f_dtype else state.to(problem.f_dtype))
            f_in.requires_grad_(True)
            out = problem.call_f(f_in, x_in, index)
            # f(z_0)'s VJP in z_0 only feeds dL/dz0: skipped without z0's gradient (one of 2N VJPs' halves)
            wants_state = index > 0 or needs_z0
            inputs = ([f_in] if wants_state else []) + ([x_in] if needs_x else []) + params
            if index == 2 * stats.steps - 1:  # the sweep's first evaluation: the rest have the same graph
                problem.check_parameters_read_through(out, params)
            if out.requires_grad:
                grads = _vjp(out, inputs, cotangent, step=index // 2)
            else:  # f ignores everything that needs a gradient
                grads = (None,) * len(inputs)
            if not wants_state:
                grads = (None, *grads)
            # Take x's and the parameters' shares before `cotangent` is overwritten: a vjp
            # may alias the cotangent (f = identity in some argument returns it as is).
            if needs_x:
                grad_x = _accumulate(grad_x, grads[1])
            for i, g in enumerate(grads[1 + needs_x:]):
                grad_params[i] = _accumulate(grad_params[i], g)
            vjp_state = grads[0] if grads[0] is not None else torch.zeros_like(out)
            if vjp_state.untyped_storage().data_ptr() == cotangent.untyped_storage().data_ptr():
                vjp_state = vjp_state.clone()
            return out.detach(), vjp_state

        with torch.enable_grad(), problem.autocast_context(), BufferSnapshot(problem.f):
            for n in reversed(range(stats.steps)):
                f_y, vjp = evaluate_with_vjp(y, 2 * n + 1)            # f(y_{n+1})
                reversal.undo_z(z, f_y, n)                            # z_n
                ops.adjoint_accumulate_(gy, vjp, cotangent, b, True, backend=backend)
                f_z, vjp = evaluate_with_vjp(z, 2 * n)                # f(z_n)
                reversal.undo_y(y, f_z, n)                            # y_n
                ops.adjoint_accumulate_(gz, vjp, cotangent, b, False, backend=backend)
                if n in state_cotangents:  # gz is dL/dz_n through the iteration: add z_n's own
                    nonfinite.record(n, (state_cotangents[n],), arriving=True)
                    gz.add_(state_cotangents[n])
                    cotangent.copy_(torch.mul(gz, b))
                nonfinite.record(n, (gz, gy), () if problem.exact else (y, z))
                if n in checkpoints:  # restart from the stored states: drift bounded by K steps
                    y_true, z_true = checkpoints[n]
                    checkpoint_gaps += [relative_gap(y, y_true, scale), relative_gap(z, z_true, scale)]
                    y.copy_(y_true)
                    z.copy_(z_true)
        stats.nfe_backward = 2 * stats.steps
        def finish() -> float:
            return reversal.finish(y, z, true_start, scale, checkpoint_gaps, probe=(reversal.f_input(z_final), x))

        # The exact reversal's kernels flag a state that went wrong, the cause, before the adjoints it spoiled
        if problem.exact:
            stats.reconstruction_error = finish()
        bad = nonfinite.first_bad()
        if bad is not None:
            _report_backward_nonfinite(problem, *bad)
        if not problem.exact:
            stats.reconstruction_error = finish()
        if problem.exact and math.isnan(stats.reconstruction_error):  # flagged, on_nonfinite="warn"
            for g in [gz, gy, grad_x, *grad_params]:
                if g is not None:
                    g.fill_(math.nan)

        grad_z0 = None
        if needs_z0:
            grad_z0 = gz.add_(gy).to(ctx.z0_dtype)  # y_0 = z_0 = z0: both states start from z0
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, problem.params)]
        return (None, None, None, grad_x, grad_z0, None, *grad_params)


def _vjp(out: Tensor, inputs: list[Tensor], cotangent: Tensor, step: int) -> tuple:
    try:
        return torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    except RuntimeError as error:
        if "backward through the graph a second time" not in str(error):
            raise
        # f read a tensor derived outside it, with a graph, from one the solve differentiates
        # (a context keyword, x): one reverse step's VJP freed that graph
        raise RuntimeError(
            f"the reversible backward differentiates f once per reverse step, and at reverse step {step} f read a "
            "tensor whose graph an earlier step's backward had freed: one computed once outside f from a tensor "
            "the solve differentiates (a context keyword, x) and kept where the DEQ does not look for it (a list, "
            "a closure). Pass that tensor itself as a keyword, deq(x, w=w), or compute it inside f") from None


@eager_under_compile
def solve(f, x, z0=None, *, settings: SolveSettings | None = None, parameters=None, states_at=None,
          **options) -> Solution:
    """Solve the RevDEQ fixed point of ``f(z, x)`` and return ``Solution(z, stats)``.

    The settings are a ``SolveSettings``, or its fields as keywords (``beta=0.5,
    max_steps=16``; the same as ``ReversibleDEQ``'s), or both: keywords override.
    Gradients flow to x, to z0 when it requires grad, and to the parameters of f: all of
    an nn.Module's trainable parameters (or those of the module a functools.partial wraps),
    plus the tensors given in ``parameters`` (a context a function or partial closes over, a
    tensor a module keeps as a plain attribute; a module's own parameters among them count
    once). ``adjoint="unrolled"`` backpropagates with plain autograd through the same
    iteration (exact, memory grows with steps): the reference the reversible adjoint is
    tested against.

    ``states_at=(k1, k2, ...)``: also return z after those steps (``Solution.states``), each
    with its exact gradient, for a loss on the trajectory; a step past the stop is the
    returned z.

    x and z0 may each be a tuple of tensors (one per resolution, as in a multiscale DEQ): f
    then takes and returns tuples, and ``Solution.z`` is a tuple (``packing.py``).
    """
    if is_several(x) or is_several(z0):
        def solve_flat(packed_f, x_flat, z0_flat):
            solution = solve(packed_f, x_flat, z0_flat, settings=settings, parameters=parameters,
                             states_at=states_at, **options)
            return [solution.z, *solution.states], solution.stats

        (z, *states), stats = solve_several(f, x, z0, solve_flat)
        return Solution(z, stats, states)
    settings = settings or SolveSettings()
    if options:
        names = [field.name for field in dataclasses.fields(SolveSettings)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"solve() got unknown settings {unknown}; the settings are the fields of "
                            f"SolveSettings: {', '.join(names)}")
        settings = dataclasses.replace(settings, **options)
    keep = state_steps(states_at, settings.max_steps)
    params = gradient_inputs(f, () if parameters is None else parameters)
    problem, start = make_problem(f, x, z0, settings, params)
    if settings.adjoint == "unrolled":
        z, _, states = unrolled_solve(problem, x, z0, start, keep)
    elif not problem.differentiated:
        with torch.no_grad():
            z, states = forward_solve(problem, x, start, keep)
    else:
        z, *states = _ReversibleFunction.apply(problem, settings.checkpoint_every, keep, x, z0, start, *params)
    z, *states = problem.as_output([z, *states])
    return Solution(z, problem.stats, states)


class ReversibleDEQ(nn.Module):
    """A deep equilibrium layer solved by the reversible iteration, with exact gradients
    of that iteration and memory that does not grow with ``max_steps``.

    Args:
        f: ``f(z, x) -> z'``, an nn.Module (its parameters are trained) or a callable.
        beta: relaxation in (0, 2), != 1.
        max_steps: at most this many steps (each costs 2 evaluations of f).
        tol: stop when every sample's ||z - f(z)|| / (1e-5 + ||f(z)||) <= tol; 0 runs
            exactly ``max_steps`` steps.
        state_dtype: dtype of the states y, z (e.g. float64 states for float32 f).
        checkpoint_every: store the states every K steps and restart the backward's
            reconstruction from them (memory O(N/K), drift bounded by K steps).
        backend: kernel backend for the state updates (``None`` = $REVDEQ_BACKEND or auto).
        adjoint: "reversible", or "unrolled" (autograd through every step; the reference).
        on_nonfinite: "raise" a FloatingPointError naming the step, or "warn".
        rng: how f's random ops (dropout) draw, replayed exactly by the backward:
            "per_solve" (the default: the same numbers at every evaluation of one solve, one
            dropout mask per solve, so f has a fixed point), "per_evaluation" (a new mask at
            every evaluation) or "global" (not replayed: the backward draws other numbers).
            ``replay_rng`` (True: "per_evaluation", False: "global") is its deprecated name.
        reversal: how the backward rebuilds the states: "exact" (the default: fixed-point states
            with digit planes, bit-exact at any depth; beta must be 1 - n/d with d <= 64) or
            "float" (divide by 1 - beta: drifts on expansive f, measured in
            ``last_stats.reconstruction_error``; the default when checkpoint_every is given).
        frac_bits: "exact" only: fractional bits of the states, |value| < 2**(62 - frac_bits)
            (default 32, or 48 when f computes in float64).
    The validated settings are ``self.settings`` (a frozen ``SolveSettings``).
    """

    def __init__(self, f, beta: float = 0.8, max_steps: int = 8, tol: float | None = 1e-3,
                 state_dtype: torch.dtype | None = None, checkpoint_every: int | None = None,
                 backend: str | None = None, adjoint: str = "reversible", on_nonfinite: str = "raise",
                 rng: str = "per_solve", reversal: str | None = None, frac_bits: int | None = None,
                 replay_rng: bool | None = None):
        super().__init__()
        attach_f(self, f)
        self.settings = SolveSettings(
            beta=beta, max_steps=max_steps, tol=tol, state_dtype=state_dtype, checkpoint_every=checkpoint_every,
            backend=backend, adjoint=adjoint, on_nonfinite=on_nonfinite, rng=rng,
            reversal=reversal, frac_bits=frac_bits, replay_rng=replay_rng)
        self.last_stats: SolverStats | None = None

    def forward(self, x, z0=None, *, states_at=None, **context):
        """z* with z* = f(z*, x, **context): the keywords (a cross-attention memory, a mask)
        reach every evaluation of f, and the tensors among them that require grad get
        gradients, as f's parameters do. x and z0 may be tuples of tensors (see ``solve``).
        With ``states_at=(k1, k2, ...)`` it returns instead the list of z after those steps,
        each with its exact gradient (a step past the stop is the solution)."""
        f, context_tensors = bind_context(self.f, context)
        solution = solve(f, x, z0, settings=self.settings, parameters=context_tensors or None,
                         states_at=states_at)
        self.last_stats = solution.stats
        return solution.z if states_at is None else solution.states

    def replaying_rng(self):
        """A context in which f's random ops (dropout) draw what they drew in this layer's last
        solve, so that f evaluated at the solution for a penalty is the f the solve iterated:
        ``with deq.replaying_rng(): fz = deq.f(z, x)``. With rng="per_solve" only: under the
        other modes the solve had no one f, and it raises."""
        return replaying(self.last_stats)

    def extra_repr(self) -> str:
        s = self.settings
        return (f"beta={s.beta}, max_steps={s.max_steps}, tol={s.tol}, state_dtype={s.state_dtype}, "
                f"checkpoint_every={s.checkpoint_every}, adjoint={s.adjoint!r}, reversal={s.resolved_reversal!r}")
