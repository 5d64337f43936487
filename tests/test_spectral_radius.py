"""rk.spectral_radius: the largest |eigenvalue| of df/dz at (z, x), per sample, against the
dense Jacobian's eigenvalues (torch.linalg.eigvals of each sample's diagonal block), on
matrices built to be hard for a plain power iteration (non-normal, a complex dominant pair,
a dominant pair of opposite signs) and on the tests' blocks at their solutions.
rk.iteration_rate: the reversible step's, against the dense step matrix, and against the
rate at which rk.solve's residual actually falls."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import revdeq_kernels as rk
from revdeq_kernels.convergence import NOT_A_FIXED_POINT, TWO_CYCLE_RATIO
from tests.helpers import ResidualBlock, TanhBlock

F64 = torch.float64


def dense_radius(f, z, x) -> torch.Tensor:
    """max |eig| of each sample's block of the dense Jacobian of z -> f(z, x)."""
    jac = torch.autograd.functional.jacobian(lambda state: f(state, x), z.detach())
    n = z[0].numel()
    jac = jac.reshape(z.shape[0], n, z.shape[0], n)
    return torch.stack([torch.linalg.eigvals(jac[b, :, b, :]).abs().max() for b in range(z.shape[0])])


class Linear(nn.Module):
    """f(z, x) = s_b A z + x, with s_b = x[b, 0]: sample b's Jacobian is s_b A."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, z, x):
        return x[:, :1] * (z @ self.matrix.T) + x


def with_eigenvalues(blocks: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Q diag(blocks) Q^-1 for a random, ill-conditioned Q: a non-normal matrix whose
    eigenvalues are those of the blocks (1x1 reals, 2x2 rotation-scalings)."""
    g = torch.Generator().manual_seed(seed)
    core = torch.block_diag(*blocks).to(F64)
    q = torch.randn(core.shape, generator=g, dtype=F64) + 2 * torch.eye(core.shape[0], dtype=F64)
    return q @ core @ torch.linalg.inv(q)


def rotation(radius: float, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return radius * torch.tensor([[c, -s], [s, c]], dtype=F64)


def scalars(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([[v]], dtype=F64) for v in values]


CASES = {
    "real, non-normal": scalars(0.9, -0.5, 0.3, 0.1, 0.05, -0.2),
    "complex pair": [rotation(0.8, 1.0), *scalars(0.5, -0.3, 0.2, 0.1)],
    "opposite signs": scalars(0.7, -0.7, 0.4, 0.2, -0.1, 0.05),
    "expansive": [rotation(1.3, 2.0), *scalars(1.1, 0.9, -0.4, 0.3)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_maps_of_known_spectrum(case):
    matrix = with_eigenvalues(CASES[case])
    rho = torch.linalg.eigvals(matrix).abs().max()
    f = Linear(matrix)
    scales = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    x = torch.randn(3, matrix.shape[0], dtype=F64)
    x[:, 0] = scales
    z = torch.randn(3, matrix.shape[0], dtype=F64)
    got = rk.spectral_radius(f, z, x)
    want = scales * rho
    error = ((got - want).abs() / want).max().item()
    assert error < 1e-12, f"{case}: estimates {got.tolist()} against {want.tolist()} ({error:.2e} off)"


@pytest.mark.parametrize("block", ["tanh", "residual"])
def test_the_tests_blocks_at_their_solutions(block):
    """At the solution of the layer (the iteration's z after its steps), against the dense
    Jacobian: a contractive tanh block under 1 (its next eigenvalues are well below the top),
    the residual block at 1 or above (a cluster of eigenvalues just above 1 converges slowly)."""
    torch.manual_seed(0)
    f = (TanhBlock(16, contraction=0.9) if block == "tanh" else ResidualBlock(16)).double()
    x = torch.randn(4, 16, dtype=F64)
    with torch.no_grad():
        z = rk.ReversibleDEQ(f, beta=0.5, max_steps=16, tol=0.0)(x)
    got, want = rk.spectral_radius(f, z, x, iters=100), dense_radius(f, z, x)
    error = ((got - want).abs() / want).max().item()
    bound = 1e-9 if block == "tanh" else 1e-2
    assert error < bound, f"{block}: estimates {got.tolist()} against the dense {want.tolist()} ({error:.2e} off)"
    assert (want < 0.9 + 1e-12).all() if block == "tanh" else (want >= 0.99).all(), want.tolist()


def test_a_layer_with_context_and_tuple_states():
    """The layer in place of its block, context keywords bound, a state of two tensors: the
    Jacobian of the packed state."""
    torch.manual_seed(0)

    class TwoResolutions(nn.Module):
        def __init__(self):
            super().__init__()
            self.fine, self.coarse = nn.Linear(3, 3), nn.Linear(5, 5)

        def forward(self, z, x, gain):
            return (torch.tanh(gain * self.fine(z[0]) + x[0]),
                    torch.tanh(gain * self.coarse(z[1]) + x[1] + z[0].mean(1, keepdim=True)))

    f = TwoResolutions().double()
    layer = rk.DEQ(f, solver="anderson", adjoint="unrolled", max_steps=20, tol=0.0)
    x = (torch.randn(2, 3, dtype=F64), torch.randn(2, 5, dtype=F64))
    gain = torch.tensor(0.7, dtype=F64)
    with torch.no_grad():
        z = layer(x, gain=gain)
    got = rk.spectral_radius(layer, z, x, iters=100, gain=gain)

    def packed(state, x_packed):
        out = f((state[:, :3], state[:, 3:]), (x_packed[:, :3], x_packed[:, 3:]), gain)
        return torch.cat(out, dim=1)

    want = dense_radius(packed, torch.cat(z, dim=1), torch.cat(x, dim=1))
    assert torch.allclose(got, want, rtol=1e-3), (got.tolist(), want.tolist())


class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, z, x):
        return torch.tanh(self.norm(self.linear(z)) + x)


def test_nothing_is_left_changed():
    """Running statistics, the global RNG and the parameters' gradients are as before; the
    result repeats."""
    torch.manual_seed(0)
    f = Normalised().double()
    z, x = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    stats = f.norm.running_mean.clone()
    state = torch.get_rng_state()
    first, second = rk.spectral_radius(f, z, x), rk.spectral_radius(f, z, x)
    assert torch.equal(first, second), "two calls with the same seed differ"
    assert torch.equal(f.norm.running_mean, stats), "BatchNorm's running mean moved"
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was drawn from"
    assert all(p.grad is None for p in f.parameters()), "a gradient was accumulated"


def test_a_nonfinite_sample_is_nan_and_the_others_are_not():
    f = Linear(with_eigenvalues(CASES["real, non-normal"]))
    x = torch.ones(2, 6, dtype=F64)
    x[1, 0] = float("inf")
    got = rk.spectral_radius(f, torch.randn(2, 6, dtype=F64), x)
    assert math.isclose(got[0].item(), 0.9, rel_tol=1e-6) and math.isnan(got[1].item()), got.tolist()


@pytest.mark.parametrize("option, match", [(dict(iters=0), "iters must be an int >= 1, got 0"),
                                           (dict(iters=True), "iters must be an int >= 1, got True"),
                                           (dict(vectors=2.0), "vectors must be an int >= 1, got 2.0")])
def test_bad_settings_are_named(option, match):
    with pytest.raises(ValueError, match=match):
        rk.spectral_radius(TanhBlock(4), torch.zeros(2, 4), torch.zeros(2, 4), **option)


def test_an_f_of_another_shape_is_named():
    with pytest.raises(ValueError, match=r"f returned \(2, 3\) for z of shape \(2, 4\); spectral_radius needs"):
        rk.spectral_radius(lambda z, x: z[:, :3], torch.zeros(2, 4), torch.zeros(2, 4))


def dense_step(jacobian: torch.Tensor, beta: float) -> torch.Tensor:
    """The reversible step's matrix on (dy, dz) at a fixed point: y <- (1-b) y + b J z, then
    z <- (1-b) z + b J y."""
    eye = torch.eye(jacobian.shape[0], dtype=jacobian.dtype)
    return torch.cat([torch.cat([(1 - beta) * eye, beta * jacobian], 1),
                      torch.cat([beta * (1 - beta) * jacobian, (1 - beta) * eye + beta ** 2 * jacobian @ jacobian], 1)])


RATE_CASES = {**CASES,
              "imaginary pair above 1": [rotation(1.2, math.pi / 2), *scalars(0.5, -0.3)],
              "real above 1": scalars(1.1, 0.5, -0.2, 0.1)}


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
@pytest.mark.parametrize("case", list(RATE_CASES))
def test_iteration_rate_of_linear_maps_of_known_spectrum(case, beta):
    matrix = with_eigenvalues(RATE_CASES[case])
    want = torch.linalg.eigvals(dense_step(matrix, beta)).abs().max().item()
    # Every eigenvalue of this one's step has modulus |1 - beta|: no Ritz pair converges, and
    # the estimate is that floor or up to 30% above it (jacobian.py), never below
    degenerate = case == "opposite signs" and beta > 1
    x = torch.ones(3, matrix.shape[0], dtype=F64)
    for seed in range(3):
        got = rk.iteration_rate(Linear(matrix), torch.randn(3, matrix.shape[0], dtype=F64), x, beta=beta, seed=seed)
        error = ((got - want).abs() / want).max().item()
        if degenerate:
            assert bool((got >= want * (1 - 1e-12)).all() and (got <= 1.35 * want).all()), (seed, got.tolist(), want)
        else:
            assert error < 1e-8, f"{case}, beta {beta}, seed {seed}: {got.tolist()} against the dense {want:.12g}"


def test_the_rate_decides_whether_the_iteration_converges_where_the_spectral_radius_does_not():
    """J with eigenvalues +-1.2i: spectral radius 1.2, yet the reversible step damps them
    (rate 0.48 at beta 0.8) and rk.solve converges; a real eigenvalue 1.1: rate above 1, and
    the state runs off (the relative residual levels at 0.1/1.1 on the way)."""
    for blocks, converges in (([rotation(1.2, math.pi / 2), *scalars(0.5, -0.3)], True),
                              (scalars(1.1, 0.5, -0.2, 0.1), False)):
        matrix = with_eigenvalues(blocks)
        f, x = Linear(matrix), torch.ones(1, matrix.shape[0], dtype=F64)
        solution = rk.solve(f, x, beta=0.8, max_steps=200, tol=0.0, reversal="float")
        rate, radius = rk.iteration_rate(f, solution.z, x, beta=0.8), rk.spectral_radius(f, solution.z, x)
        assert radius.item() > 1, radius
        if converges:
            assert rate.item() < 0.5 and solution.stats.residual_history[-1] < 1e-12, (
                rate.item(), solution.stats.residual_history[-1])
        else:
            assert rate.item() > 1 and solution.z.norm() > 1e6, (rate.item(), solution.z.norm())


@pytest.mark.parametrize("block", ["tanh", "rotating"])
def test_the_rate_is_how_fast_the_residual_falls(block):
    """At a nonlinear block's solution, the estimate equals the per-step factor by which
    rk.solve's residual shrinks late in the solve. The rotating block, tanh(W z + x) with a
    dominant pair of W at 1.15 e^(+-1.4i), has a spectral radius above 1 at its solution."""
    torch.manual_seed(0)
    if block == "tanh":
        f = TanhBlock(16, contraction=0.95).double()
    else:  # W = Q diag(...) Q^T, Q orthogonal; a small x keeps tanh near its slope 1
        core = torch.block_diag(rotation(1.15, 1.4), rotation(0.6, 0.5), *scalars(0.7, -0.4, 0.2, 0.1, -0.1, 0.05,
                                                                                 0.3, -0.2, 0.15, -0.05, 0.02, 0.01))
        q = torch.linalg.qr(torch.randn(16, 16, dtype=F64))[0]
        weight = q @ core @ q.T

        def f(z, x):
            return torch.tanh(z @ weight.T + x)
    x = (0.1 if block == "rotating" else 1.0) * torch.randn(1, 16, dtype=F64)
    solution = rk.solve(f, x, beta=0.8, max_steps=400, tol=0.0, reversal="float")
    history = torch.tensor(solution.stats.residual_history)
    late = history[(history < 1e-4) & (history > 1e-11)]
    assert len(late) >= 10, f"{block}: the solve did not pass through 1e-4..1e-11: {history[::20].tolist()}"
    observed = (late[-1] / late[0]) ** (1 / (len(late) - 1))
    rate = rk.iteration_rate(f, solution.z, x, beta=0.8, iters=300).item()
    assert abs(observed - rate) / rate < 2e-2, f"{block}: the residual fell by {observed:.6f} a step, the rate is {rate:.6f}"
    if block == "rotating":
        assert rk.spectral_radius(f, solution.z, x).item() > 1


def test_the_rate_takes_beta_from_a_reversible_layer_and_names_what_lacks_one():
    torch.manual_seed(0)
    f = TanhBlock(8).double()
    z, x = torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    want = rk.iteration_rate(f, z, x, beta=0.6)
    assert torch.equal(rk.iteration_rate(rk.ReversibleDEQ(f, beta=0.6), z, x), want)
    assert torch.equal(rk.iteration_rate(rk.DEQ(f, solver="reversible", beta=0.6), z, x), want)
    with pytest.raises(ValueError, match="iteration_rate needs beta: f is a block, not a reversible layer"):
        rk.iteration_rate(f, z, x)
    with pytest.raises(ValueError, match="f is a DEQ with solver='anderson'"):
        rk.iteration_rate(rk.DEQ(f, solver="anderson"), z, x)
    with pytest.raises(ValueError, match="beta"):
        rk.iteration_rate(f, z, x, beta=1.0)
    with pytest.raises(ValueError, match="iters must be an int >= 1, got 0"):
        rk.iteration_rate(f, z, x, beta=0.5, iters=0)


class TwoCycleMap(nn.Module):
    """f(z) = -2 tanh(z), elementwise: its one fixed point, 0, has f'(0) = -2, and it has the
    2-cycle z -> -z at +-p, p = 2 tanh(p) = 1.91501."""

    def forward(self, z, x):
        return -2 * torch.tanh(z) + 0 * x


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.8, 1.2])
def test_the_reversible_iteration_rests_at_a_two_cycle_of_f_where_a_damped_one_finds_the_fixed_point(beta):
    """The reversible iteration stands still wherever y = f(z) and z = f(y): at f's fixed
    points (y = z), and at its 2-cycles, whatever beta. Its residual then stays put, and the
    rate and the spectral radius at z describe no equilibrium (docs/api.md)."""

    f = TwoCycleMap()
    x = torch.zeros(3, 4, dtype=F64)
    z0 = 1e-3 * torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    sol = rk.solve(f, x, z0=z0, beta=beta, max_steps=300, tol=0)
    p = 1.9150080481545
    assert torch.allclose(sol.z.abs(), torch.full_like(sol.z, p), atol=1e-9), f"beta {beta}: z = {sol.z[0].tolist()}"
    residual, cycle_gap, at_two_cycle = rk.fixed_point_gaps(f, sol.z, x)
    assert torch.allclose(residual, torch.full_like(residual, 2.0), atol=1e-5), residual  # f(z) = -z
    assert cycle_gap.max() < 1e-12 and (cycle_gap <= TWO_CYCLE_RATIO * residual).all(), cycle_gap
    assert (residual > NOT_A_FIXED_POINT).all() and at_two_cycle.all()
    # the solve's own stats say so, from the y it holds: y = f(z) while z != f(z)
    assert sol.at_two_cycle.all() and sol.pair_residual.max() < 1e-12, (sol.pair_residual, sol.residual)
    # the fixed point is there: a damped single-state iteration and Anderson reach it from z0
    for solver, options in (("fixed_point", dict(beta=0.5)), ("anderson", {})):
        deq = rk.DEQ(f, solver=solver, adjoint="unrolled", max_steps=100, tol=1e-10, **options)
        assert deq(x, z0=z0).abs().max() < 1e-9, f"{solver} did not reach 0"


def test_a_converging_transient_is_not_taken_for_a_two_cycle():
    """A contractive block a few steps from its fixed point: f(f(z)) - z is of the size of
    f(z) - z, far above the 2-cycle criterion; solved to the end, it is a fixed point."""

    torch.manual_seed(0)
    f = TanhBlock(16).to(F64)
    x = torch.randn(4, 16, dtype=F64)
    early = rk.solve(f, x, beta=0.8, max_steps=2, tol=0)
    residual, cycle_gap, at_two_cycle = rk.fixed_point_gaps(f, early.z, x)
    assert (residual > NOT_A_FIXED_POINT).all() and (cycle_gap > 10 * TWO_CYCLE_RATIO * residual).all(), (
        residual, cycle_gap)
    assert not at_two_cycle.any() and not early.at_two_cycle.any() and (early.pair_residual > 10 * TWO_CYCLE_RATIO * early.residual).all(), (
        early.pair_residual, early.residual)
    solved = rk.solve(f, x, beta=0.8, max_steps=60, tol=0)
    residual, _, at_two_cycle = rk.fixed_point_gaps(f, solved.z, x)
    assert (residual < 1e-9).all() and not at_two_cycle.any() and not solved.at_two_cycle.any(), residual


def test_fixed_point_gaps_finds_the_undamped_iterations_two_cycle_through_a_layer_and_tuple_states():
    """z <- f(z) (a DEQ with solver="fixed_point", beta=1) also stops at the 2-cycle of
    -2 tanh; its stats hold no y, so rk.fixed_point_gaps asks f, given the layer. A state of
    two tensors is judged as one (both at the cycle, or one not)."""
    f = TwoCycleMap()
    x = torch.zeros(3, 4, dtype=F64)
    deq = rk.DEQ(f, solver="fixed_point", beta=1.0, adjoint="unrolled", max_steps=100, tol=0)
    z = deq(x, z0=torch.full((3, 4), 0.5, dtype=F64))
    gaps = rk.fixed_point_gaps(deq, z, x)
    assert gaps.at_two_cycle.all() and gaps.cycle_gap.max() < 1e-12, gaps
    assert deq.last_stats.at_two_cycle is None

    def pair(state, x):
        return tuple(-2 * torch.tanh(part) for part in state)

    at_cycle = torch.full((2, 3), 1.9150080481545, dtype=F64)
    gaps = rk.fixed_point_gaps(pair, (at_cycle, at_cycle[:, :2].clone()), x[:2])
    assert gaps.at_two_cycle.all(), gaps
    gaps = rk.fixed_point_gaps(pair, (at_cycle, 0.5 * at_cycle[:, :2]), x[:2])
    assert not gaps.at_two_cycle.any() and (gaps.residual > NOT_A_FIXED_POINT).all(), gaps
    with pytest.raises(ValueError, match="fixed_point_gaps needs f"):
        rk.fixed_point_gaps(lambda z, x: z[:, :2], x, x)


@pytest.mark.parametrize("options", [dict(reversal="float"), dict(reversal="exact"), dict(adjoint="unrolled")],
                         ids=["float", "exact", "unrolled"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_stats_tell_a_two_cycle_sample_from_a_converged_one(options, dtype):
    """One batch, half at the 2-cycle of -2 tanh (started off 0), half at its fixed point
    (started at 0): ``at_two_cycle`` marks exactly the first half, with tol > 0 (the solve
    runs to max_steps, the cycle never meets tol), in either reversal and unrolled. Other
    solvers hold no y, and say None."""
    f = TwoCycleMap().to(dtype)
    x = torch.zeros(4, 3, dtype=dtype)
    z0 = torch.cat([torch.full((2, 3), 0.3, dtype=dtype), torch.zeros(2, 3, dtype=dtype)])
    sol = rk.solve(f, x, z0=z0, beta=0.5, max_steps=80, tol=1e-4, **options)
    assert sol.steps == 80 and sol.at_two_cycle.tolist() == [True, True, False, False], (
        sol.residual, sol.pair_residual)
    converged = rk.solve(f, x, z0=torch.zeros_like(z0), beta=0.5, max_steps=80, tol=1e-4, **options)
    assert converged.steps < 80 and not converged.at_two_cycle.any(), converged.pair_residual
    deq = rk.DEQ(f, solver="anderson", max_steps=20)
    deq(x)
    assert deq.last_stats.pair_residual is None and deq.last_stats.at_two_cycle is None
