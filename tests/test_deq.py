"""rk.DEQ: the classic solvers (fixed point, Anderson) and adjoints (unrolled, implicit,
phantom) against autograd, the reversible solver behind the same interface, the stats of
every method, and every documented error."""

from __future__ import annotations

import math

import pytest
import torch

import revdeq_kernels as rk
from revdeq_kernels.solvers import mixing_weights
from tests.helpers import TanhBlock, backend_device_pairs, pair_id, relative_error

F64 = torch.float64


def contractive(width: int = 6) -> TanhBlock:
    """||W||_2 = 0.5: a unique fixed point, and the iteration contracts by about 2x per step."""
    return TanhBlock(width, contraction=0.5)


def setup(seed: int = 0, batch: int = 3, width: int = 6):
    torch.manual_seed(seed)
    f = contractive(width).to(F64)
    x = torch.randn(batch, width, dtype=F64, requires_grad=True)
    return f, x


def loss_of(z):
    return z.square().sum() + z.sin().sum()


def gradients(deq, f, x, z0=None):
    z = deq(x, z0)
    loss_of(z).backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])


def method_gradients(seed=0, **settings):
    f, x = setup(seed)
    deq = rk.DEQ(f, backend="torch", **settings)
    return gradients(deq, f, x), deq


@pytest.mark.parametrize("solver,backward_solver", [
    ("fixed_point", "fixed_point"), ("fixed_point", "anderson"), ("anderson", "fixed_point"),
    ("fixed_point", "broyden")])
def test_implicit_gradient_approaches_unrolled_as_both_converge(solver, backward_solver):
    errors = []
    for steps in (4, 8, 16, 32):
        implicit, deq = method_gradients(solver=solver, adjoint="implicit", max_steps=steps, tol=0,
                                         backward_solver=backward_solver)
        unrolled, _ = method_gradients(solver=solver, adjoint="unrolled", max_steps=steps, tol=0)
        errors.append(relative_error(implicit, unrolled))
        assert deq.last_adjoint_stats.steps == steps, "tol=0 must run every adjoint step"
    assert all(b < a for a, b in zip(errors, errors[1:])), f"error does not shrink with steps: {errors}"
    assert errors[0] > 1e-6, f"at 4 steps the two gradients should still differ, got {errors[0]:.3g}"
    assert errors[-1] <= 1e-10, f"{solver}/{backward_solver}: implicit vs unrolled at 32 steps {errors[-1]:.3g} > 1e-10"


@pytest.mark.parametrize("k,damping", [(1, 1.0), (3, 0.6), (6, 0.9)])
def test_phantom_equals_autograd_through_its_k_steps_from_the_fixed_point(k, damping):
    f, x = setup()
    deq = rk.DEQ(f, solver="fixed_point", adjoint="phantom", max_steps=12, tol=0, beta=0.9,
                 phantom_steps=k, phantom_beta=damping, backend="torch")
    z_star = deq(x)
    cotangent = torch.autograd.grad(loss_of(z_star), z_star, retain_graph=True)[0]
    params = list(f.parameters())
    got = torch.autograd.grad(z_star, [x] + params, cotangent)
    state = z_star.detach()
    for _ in range(k):
        state = (1 - damping) * state + damping * f(state, x)
    want = torch.autograd.grad(state, [x] + params, cotangent)
    for name, g, w in zip(["x"] + [n for n, _ in f.named_parameters()], got, want):
        err = relative_error(g, w)
        assert err <= 1e-14, f"phantom k={k} t={damping}: d/d{name} differs from autograd by {err:.3g}"
    assert deq.last_stats.nfe_backward == k


def linear_problem(width=24, batch=4, rate=0.98):
    """f(z, x) = A z + x with symmetric A, eigenvalues spread over [0, rate]: plain
    iteration contracts by only `rate` per step."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(width, width, dtype=F64))
    a = q @ torch.diag(torch.linspace(0.0, rate, width, dtype=F64)) @ q.T
    return (lambda z, x: z @ a.T + x), torch.randn(batch, width, dtype=F64)


def test_anderson_converges_where_plain_iteration_is_slow():
    f, x = linear_problem()
    anderson = rk.DEQ(f, solver="anderson", adjoint="unrolled", max_steps=60, tol=1e-5, m=5, backend="torch")
    plain = rk.DEQ(f, solver="fixed_point", adjoint="unrolled", max_steps=60, tol=1e-5, backend="torch")
    z = anderson(x)
    plain(x)
    a, p = anderson.last_stats, plain.last_stats
    assert a.steps < 60 and a.max_residual <= 1e-5, f"Anderson: {a.steps} steps, residual {a.max_residual:.3g}"
    assert p.steps == 60 and p.max_residual > 1e-3, f"plain iteration converged unexpectedly: {p.max_residual:.3g}"
    exact = torch.linalg.solve(torch.eye(x.shape[1], dtype=F64) - f(torch.eye(x.shape[1], dtype=F64), 0).T, x.T).T
    # A contraction by 0.98 turns a residual r into an error of at most r / (1 - 0.98).
    err = relative_error(z, exact)
    assert err <= 1e-5 / 0.02, f"Anderson's fixed point is off by {err:.3g} > 5e-4"


def test_anderson_singular_system_falls_back_to_the_relaxed_step():
    residuals = torch.zeros(2, 3, 5, dtype=F64)
    residuals[0, 0] = 1.0  # rows 2 and 3 of the bordered system coincide: singular
    residuals[1] = torch.randn(3, 5, dtype=F64)
    alpha = mixing_weights(residuals, lam=0.0)
    assert torch.equal(alpha[0], torch.tensor([0.0, 0.0, 1.0], dtype=F64)), f"singular sample: alpha {alpha[0]}"
    assert abs(float(alpha[1].sum()) - 1.0) <= 1e-12 and not torch.equal(alpha[1], alpha[0]), alpha[1]

    x = torch.randn(2, 5, dtype=F64, requires_grad=True)
    constant = lambda z, x: x + 0.0 * z  # noqa: E731  (exact after one step, then R = 0: singular)
    deq = rk.DEQ(constant, solver="anderson", adjoint="unrolled", max_steps=8, tol=0, lam=0.0, backend="torch")
    z = deq(x)
    assert torch.equal(z, x), f"max |z - x| = {(z - x).abs().max():.3g}"
    (grad,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(grad, torch.ones_like(x)), f"dz/dx through the singular steps: {grad}"


METHODS = [
    ("fixed_point", "unrolled"), ("fixed_point", "implicit"), ("fixed_point", "phantom"),
    ("anderson", "unrolled"), ("anderson", "implicit"), ("anderson", "phantom"),
    ("broyden", "unrolled"), ("broyden", "implicit"), ("broyden", "phantom"),
    ("reversible", "reversible"), ("reversible", "unrolled"), ("reversible", "implicit"),
    ("reversible", "phantom"),
]


@pytest.mark.parametrize("solver,adjoint", METHODS, ids=[f"{s}-{a}" for s, a in METHODS])
def test_stats_fields(solver, adjoint):
    f, x = setup()
    deq = rk.DEQ(f, solver=solver, adjoint=adjoint, max_steps=5, tol=0, backend="torch")
    z = deq(x)
    stats = deq.last_stats
    per_step = 2 if solver == "reversible" else 1
    assert isinstance(stats, rk.SolverStats) and stats.steps == 5
    assert stats.residual.shape == (3,) and len(stats.residual_history) == 5
    assert stats.residual_history[-1] == pytest.approx(float(stats.residual.max()), rel=1e-12)
    assert stats.nfe_forward == 1 + per_step * 5 and stats.backend == "torch"
    assert stats.nfe_backward == 0 and stats.reconstruction_error is None
    loss_of(z).backward()
    nfe_backward = {"unrolled": 0, "implicit": 1, "phantom": 5, "reversible": 10}[adjoint]
    assert stats.nfe_backward == nfe_backward, f"{solver}/{adjoint}: nfe_backward {stats.nfe_backward}"
    assert (stats.reconstruction_error is not None) == (adjoint == "reversible")
    if adjoint == "implicit":
        adj = deq.last_adjoint_stats
        assert adj.steps == 5 and adj.nfe_forward == 6 and len(adj.residual_history) == 5
    else:
        assert deq.last_adjoint_stats is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())


def test_tolerance_stops_early_and_reports_the_residual():
    f, x = setup()
    deq = rk.DEQ(f, solver="fixed_point", adjoint="implicit", max_steps=50, tol=1e-8, backend="torch")
    deq(x).sum().backward()
    stats, adj = deq.last_stats, deq.last_adjoint_stats
    assert 1 <= stats.steps < 50 and stats.max_residual <= 1e-8, (stats.steps, stats.max_residual)
    assert stats.residual_history[-2] > 1e-8, "stopped later than the first step meeting tol"
    assert adj.steps < 50 and adj.residual_history[-1] <= 1e-8, (adj.steps, adj.residual_history[-1])


def test_reversible_solver_behind_deq_is_reversible_deq():
    got, deq = method_gradients(solver="reversible", adjoint="reversible", max_steps=6, tol=0, beta=0.7)
    f, x = setup()
    want = gradients(rk.ReversibleDEQ(f, beta=0.7, max_steps=6, tol=0, backend="torch"), f, x)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max():.3g}"
    assert deq.last_stats.reconstruction_error is not None


def test_z0_gets_a_gradient_only_from_the_unrolled_adjoint():
    for adjoint, expect in (("unrolled", True), ("implicit", False), ("phantom", False)):
        f, x = setup()
        z0 = torch.randn(3, 6, dtype=F64, requires_grad=True)
        rk.DEQ(f, solver="fixed_point", adjoint=adjoint, max_steps=4, tol=0, backend="torch")(x, z0).sum().backward()
        assert (z0.grad is not None) == expect, f"{adjoint}: z0.grad is {z0.grad}"


def test_no_grad_saves_nothing_and_matches_the_graph_forward():
    f, x = setup()
    deq = rk.DEQ(f, solver="anderson", adjoint="implicit", max_steps=6, tol=0, backend="torch")
    with torch.no_grad():
        plain = deq(x)
    assert not plain.requires_grad
    assert torch.equal(plain, deq(x).detach())


@pytest.mark.parametrize("pair", backend_device_pairs(), ids=pair_id)
def test_fused_backends_match_torch(pair):
    backend, device = pair
    torch.manual_seed(0)
    f = contractive(8).to(device)
    x = torch.randn(4, 8, device=device)
    settings = dict(solver="fixed_point", adjoint="implicit", max_steps=6, tol=0, beta=0.7)
    want = rk.DEQ(f, backend="torch", **settings)(x).detach()
    deq = rk.DEQ(f, backend=backend, **settings)
    got = deq(x).detach()
    assert deq.last_stats.backend == backend
    err = relative_error(got, want)
    assert err <= 1e-6, f"{backend} on {device}: relative difference to torch {err:.3g}"


@pytest.mark.parametrize("settings,message", [
    (dict(solver="newton"), "solver must be one of"),
    (dict(adjoint="ift"), "adjoint must be one of"),
    (dict(solver="fixed_point", adjoint="reversible"), "needs solver='reversible'"),
    (dict(solver="anderson", adjoint="reversible"), "needs solver='reversible'"),
    (dict(solver="anderson", m=0), "m \\(Anderson window / Broyden memory\\) must be an int >= 1"),
    (dict(solver="anderson", m=2.5), "m \\(Anderson window / Broyden memory\\) must be an int >= 1"),
    (dict(solver="anderson", m=True), "m \\(Anderson window / Broyden memory\\) must be an int >= 1"),
    (dict(solver="anderson", lam=-1e-3), "lam \\(Anderson regularisation\\) must be finite and >= 0"),
    (dict(solver="anderson", lam=math.nan), "lam \\(Anderson regularisation\\) must be finite and >= 0"),
    (dict(solver="fixed_point", m=5), "m is not used by solver='fixed_point'"),
    (dict(solver="fixed_point", lam=1e-3, backward_solver="fixed_point"), "lam is not used"),
    (dict(solver="fixed_point", beta=0.0), "beta is a damping and must be in \\(0, 1\\]"),
    (dict(solver="anderson", beta=1.5), "beta is a damping and must be in \\(0, 1\\]"),
    (dict(solver="reversible", adjoint="reversible", beta=1.0), "beta must be in \\(0, 2\\) and != 1"),
    (dict(adjoint="implicit", backward_solver="newton"), "backward_solver must be one of"),
    (dict(solver="broyden", lam=1e-3), "lam is not used by solver='broyden'"),
    (dict(solver="broyden", m=0), "m \\(Anderson window / Broyden memory\\) must be an int >= 1"),
    (dict(solver="broyden", beta=1.5), "beta is a damping and must be in \\(0, 1\\]"),
    (dict(solver="broyden", adjoint="reversible"), "needs solver='reversible'"),
    (dict(adjoint="implicit", backward_beta=2.0), "backward_beta is a damping"),
    (dict(adjoint="implicit", backward_max_steps=0), "backward_max_steps must be an int >= 1"),
    (dict(adjoint="implicit", backward_tol=-1.0), "backward_tol must be >= 0"),
    (dict(adjoint="unrolled", backward_tol=1e-6), "backward_tol is not used by adjoint='unrolled'"),
    (dict(adjoint="implicit", phantom_steps=3), "phantom_steps is not used by adjoint='implicit'"),
    (dict(adjoint="phantom", phantom_steps=0), "phantom_steps must be an int >= 1"),
    (dict(adjoint="phantom", phantom_beta=0.0), "phantom_beta is a damping"),
    (dict(adjoint="implicit", checkpoint_every=2), "checkpoint_every is not used by adjoint='implicit'"),
    (dict(max_steps=0), "max_steps must be an int >= 1"),
    (dict(tol=-1.0), "tol must be >= 0"),
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_settings_raise_a_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        rk.DEQ(contractive(), **settings)


def test_bad_inputs_raise_a_clear_error():
    deq = rk.DEQ(contractive(6), solver="fixed_point", adjoint="implicit", backend="torch")
    with pytest.raises(TypeError, match="f must be callable"):
        rk.DEQ(3)
    with pytest.raises(ValueError, match="share the batch dimension"):
        deq(torch.randn(3, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="f returned shape"):
        rk.DEQ(lambda z, x: z[:, :2], solver="fixed_point", backend="torch")(torch.randn(3, 6))


def test_nonfinite_adjoint_names_the_backward_pass():
    # J = 3I: the forward's 2 steps stay finite, the adjoint iteration u <- g + 3u overflows.
    expansive = rk.DEQ(lambda z, x: 3.0 * z + x, solver="fixed_point", adjoint="implicit", max_steps=2,
                       tol=0, backward_max_steps=2000, backward_tol=0, backend="torch")
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    z = expansive(x)
    assert torch.isfinite(z).all()
    with pytest.raises(FloatingPointError, match=r"the implicit adjoint's solve of u = .* went non-finite"):
        z.sum().backward()


def test_settings_fill_the_defaults_of_the_choice_and_leave_the_rest_none():
    s = rk.DEQ(contractive(), solver="fixed_point", adjoint="phantom", beta=0.7).settings
    assert (s.max_steps, s.beta, s.phantom_steps, s.phantom_beta) == (30, 0.7, 5, 0.7)
    assert s.backward_solver is s.backward_beta is s.m is s.lam is None
    s = rk.DEQ(contractive(), solver="reversible", adjoint="implicit").settings
    assert (s.max_steps, s.beta, s.backward_solver, s.backward_beta) == (8, 0.8, "fixed_point", 1.0)
    own = rk.DEQ(contractive(), solver="reversible", adjoint="reversible", beta=0.6).settings.reversible_solve()
    assert own == rk.SolveSettings(beta=0.6, max_steps=8, tol=1e-3)


class DriftingBlock(torch.nn.Module):
    """Adds to its own bias on every call: each solver step evaluates another f."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, z, x):
        with torch.no_grad():
            self.lin.bias.add_(1e-3)
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("adjoint, states_at", [("implicit", None), ("phantom", None), ("phantom", (2, 5))])
def test_an_f_that_changes_its_parameters_while_solving_is_refused(adjoint, states_at):
    """The parameters' versions are taken before the solve, so the backward refuses an f that
    changed them during it, as it refuses an optimizer step between forward and backward."""
    x = torch.randn(2, 4, requires_grad=True)
    out = rk.DEQ(DriftingBlock(), solver="anderson", adjoint=adjoint, max_steps=5, tol=0)(x, states_at=states_at)
    loss = sum(s.sum() for s in out) if states_at else out.sum()
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: 1 of f's .*lin\.bias \(4,\)"):
        loss.backward()
