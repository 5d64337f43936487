"""rk.DEQ(solver="broyden"): fewer evaluations than fixed point and Anderson where the
iteration is slow, the exact solve of a linear map, the per-sample safeguards (singular
updates, a rejected step, converged samples), and its gradients under every adjoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import revdeq_kernels as rk
from tests.helpers import TanhBlock, bench_module, relative_error

F64 = torch.float64


@pytest.mark.parametrize("seed", [0, 1])
def test_broyden_needs_fewer_evaluations_than_fixed_point_and_anderson(seed):
    measure = bench_module("solvers").measure  # its block and measurement (one reference)
    nfe = {solver: measure(solver, 16, 1e-10, seed)[0] for solver in ("fixed_point", "anderson", "broyden")}
    # Measured: seed 0 225 / 51 / 33, seed 1 105 / 40 / 24 (Broyden's convergence is superlinear).
    assert nfe["broyden"] < nfe["anderson"] < nfe["fixed_point"], f"evaluations to tol 1e-10: {nfe}"
    assert nfe["broyden"] <= 0.8 * nfe["anderson"], f"Broyden saves under 20% against Anderson: {nfe}"


def test_broyden_solves_a_linear_map_exactly():
    torch.manual_seed(0)
    width = 8
    A = 0.9 * torch.randn(width, width, dtype=F64) / width ** 0.5
    x = torch.randn(3, width, dtype=F64)
    deq = rk.DEQ(lambda z, x: z @ A.T + x, solver="broyden", adjoint="implicit", max_steps=100, tol=1e-13,
                 m=2 * width, backend="torch")
    with torch.no_grad():
        z = deq(x)
    exact = torch.linalg.solve(torch.eye(width, dtype=F64) - A, x.T).T
    err = relative_error(z, exact)
    # Good Broyden ends on a linear map in at most 2 * width steps (Gay 1979).
    assert deq.last_stats.steps <= 2 * width + 1, f"took {deq.last_stats.steps} steps on a linear map of width {width}"
    assert err <= 1e-11, f"Broyden vs torch.linalg.solve: relative error {err:.3g}"


def test_singular_updates_reset_to_the_relaxed_step_without_nan():
    x = torch.randn(3, 5, dtype=F64)
    # f(z) = z + c: the residual never changes (y = 0, a zero denominator at every step);
    # f(z) = x: solved by the first step, then every step is zero (s = y = 0).
    for name, f, steps in (("z + 1", lambda z, x: z + 1.0, 20), ("x", lambda z, x: x, 20)):
        deq = rk.DEQ(f, solver="broyden", adjoint="implicit", max_steps=steps, tol=0, backend="torch")
        with torch.no_grad():
            z = deq(x)
        assert torch.isfinite(z).all() and all(map(math.isfinite, deq.last_stats.residual_history)), (
            f"f(z) = {name}: non-finite state or residual {deq.last_stats.residual_history}")
    assert torch.equal(z, x), "f(z) = x: the relaxed step lands on x and stays"
    deq = rk.DEQ(lambda z, x: z + 1.0, solver="broyden", adjoint="implicit", max_steps=20, tol=0, beta=0.5)
    with torch.no_grad():
        z = deq(torch.zeros(2, 4, dtype=F64))
    assert torch.allclose(z, torch.full_like(z, 10.0)), "20 relaxed steps of 0.5 * (f(z) - z) = 0.5 each"


class FailsOnce(nn.Module):
    """A contraction whose evaluation number ``at`` returns NaN for sample 0."""

    def __init__(self, at: int):
        super().__init__()
        self.block, self.at, self.calls = TanhBlock(6, contraction=0.9).to(F64), at, 0

    def forward(self, z, x):
        out = self.block(z, x)
        self.calls += 1
        if self.calls == self.at + 1:
            out = out.clone()
            out[0] = float("nan")
        return out


def test_a_step_that_returns_nan_is_rejected_for_that_sample_only():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=F64)
    clean = FailsOnce(at=-1)
    failing = FailsOnce(at=3)  # evaluation 3 follows step 3, a quasi-Newton step
    failing.load_state_dict(clean.state_dict())
    runs = {}
    for name, f in (("clean", clean), ("failing", failing)):
        deq = rk.DEQ(f, solver="broyden", adjoint="implicit", max_steps=12, tol=0, backend="torch")
        with torch.no_grad():
            runs[name] = (deq(x), deq.last_stats)
    (z_clean, _), (z_failing, stats) = runs["clean"], runs["failing"]
    assert torch.isfinite(z_failing).all() and stats.max_residual < 1e-4, (
        f"after the rejected step: finite {bool(torch.isfinite(z_failing).all())}, residual {stats.max_residual:.3g}")
    assert torch.equal(z_failing[1:], z_clean[1:]), "the other samples must not notice sample 0's failure"
    assert not torch.equal(z_failing[0], z_clean[0]), "sample 0 was not set back by its rejected step"


def test_a_converged_sample_stops_moving_while_the_others_go_on():
    torch.manual_seed(0)
    f, x = TanhBlock(6, contraction=0.9).to(F64), torch.randn(3, 6, dtype=F64)
    reference = rk.DEQ(f, solver="fixed_point", adjoint="implicit", max_steps=500, tol=1e-14)
    with torch.no_grad():
        z_star = reference(x)
        z0 = torch.zeros_like(x)
        z0[0] = z_star[0]
        deq = rk.DEQ(f, solver="broyden", adjoint="implicit", max_steps=100, tol=1e-10, backend="torch")
        z = deq(x, z0)
    assert torch.equal(z[0], z0[0]), "a sample that starts converged must stay exactly where it is"
    assert deq.last_stats.steps > 1 and deq.last_stats.max_residual <= 1e-10


def test_implicit_gradient_with_broyden_both_ways_approaches_the_converged_unrolled_one():
    torch.manual_seed(0)
    f, x = TanhBlock(6, contraction=0.9).to(F64), torch.randn(3, 6, dtype=F64, requires_grad=True)

    def grads(**settings):
        x.grad = None
        f.zero_grad()
        deq = rk.DEQ(f, backend="torch", **settings)
        z = deq(x)
        (z.square().sum() + z.sin().sum()).backward()
        return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])

    truth = grads(solver="fixed_point", adjoint="unrolled", max_steps=400, tol=0)
    errors = [relative_error(grads(solver="broyden", adjoint="implicit", backward_solver="broyden", max_steps=200,
                                   tol=tol), truth) for tol in (1e-2, 1e-4, 1e-6, 1e-9)]
    assert all(b < a for a, b in zip(errors, errors[1:])), f"error does not fall with tol: {errors}"
    assert errors[-1] <= 1e-8, f"at tol 1e-9 the implicit gradient is {errors[-1]:.3g} off"


def test_unrolled_broyden_passes_gradcheck():
    torch.manual_seed(0)
    f = TanhBlock(4, contraction=0.8).to(F64)
    deq = rk.DEQ(f, solver="broyden", adjoint="unrolled", max_steps=6, tol=0, m=3, backend="torch")
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,)), "autograd through the Broyden steps"


def test_broyden_keeps_low_precision_states_finite_and_converging():
    torch.manual_seed(0)
    f, x = TanhBlock(6, contraction=0.5), torch.randn(4, 6)
    for dtype in (torch.float32, torch.bfloat16):
        deq = rk.DEQ(f, solver="broyden", adjoint="implicit", max_steps=30, tol=1e-2, state_dtype=dtype)
        with torch.no_grad():
            z = deq(x)
        assert z.dtype == dtype and torch.isfinite(z).all() and deq.last_stats.max_residual <= 1e-2, (
            dtype, deq.last_stats.max_residual)
