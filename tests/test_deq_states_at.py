"""``DEQ(solver="fixed_point" | "anderson" | "broyden")(x, states_at=...)``: the states of the
accelerated solvers. With adjoint="unrolled" each state is the iteration's z_k with its exact
gradient; with adjoint="phantom" each state gets its own phantom gradient from where it
stands (the fixed-point correction of DEQ-Flow, torchdeq's ``indexing``). The reference for
the state after k steps is a k-step solve of the same DEQ, which must agree bit for bit:
a state recorded one step early or late, or before Broyden's rejection, cannot match it."""

from __future__ import annotations

import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import TanhBlock, relative_error

F64 = torch.float64
STEPS = (1, 3, 6, 8)
SOLVERS = ["fixed_point", "anderson", "broyden"]


def setup(width=6, batch=4):
    torch.manual_seed(0)
    f = TanhBlock(width, contraction=0.9).double()
    x = torch.randn(batch, width, dtype=F64, requires_grad=True)
    weights = [torch.randn(batch, width, dtype=F64) for _ in STEPS]
    return f, x, weights


def deq(f, solver, adjoint, max_steps=8, **options):
    extra = dict(phantom_steps=3, phantom_beta=0.7) if adjoint == "phantom" else {}
    return rk.DEQ(f, solver=solver, adjoint=adjoint, max_steps=max_steps, tol=0.0, beta=0.8, **extra, **options)


def grads(f, x, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [x, *f.parameters()], retain_graph=True))  # the states share one graph


@pytest.mark.parametrize("adjoint", ["unrolled", "phantom"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_each_state_is_a_k_step_solve(solver, adjoint):
    """z_k from one 8-step solve equals the z of a k-step solve, value and gradient: bit for bit
    with the unrolled adjoint, and to rounding with the phantom one (the same backward)."""
    f, x, weights = setup()
    states = deq(f, solver, adjoint)(x, states_at=STEPS)
    assert len(states) == len(STEPS)
    for k, state, w in zip(STEPS, states, weights):
        alone = deq(f, solver, adjoint, max_steps=k)(x)
        assert torch.equal(state, alone), f"{solver}/{adjoint}: z_{k} is {relative_error(state, alone):.2e} off a {k}-step solve"
        got, want = grads(f, x, (w * state).sum()), grads(f, x, (w * alone).sum())
        names = ["x"] + [name for name, _ in f.named_parameters()]
        for name, g, h in zip(names, got, want):
            error = relative_error(g, h)
            assert error <= 1e-14, f"{solver}/{adjoint}: d(w . z_{k})/d{name} is {error:.2e} off a {k}-step solve's"
    assert relative_error(states[0].detach(), states[-1].detach()) > 1e-3, f"{solver}: z_1 and z_8 coincide; nothing was tested"


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_backward_sums_every_state_cotangent(solver):
    """A weighted loss on all the states, one backward: the sum of the per-state gradients, and
    the phantom backward evaluates f phantom_steps times for each state."""
    f, x, weights = setup()
    layer = deq(f, solver, "phantom")
    states = layer(x, states_at=STEPS)
    total = grads(f, x, sum((w * s).sum() for w, s in zip(weights, states)))
    assert layer.last_stats.nfe_backward == 3 * len(STEPS), layer.last_stats.nfe_backward
    separate = [grads(f, x, (w * deq(f, solver, "phantom", max_steps=k)(x)).sum()) for k, w in zip(STEPS, weights)]
    for i, g in enumerate(total):
        want = sum(parts[i] for parts in separate)
        assert relative_error(g, want) <= 1e-13, f"{solver}: gradient {i} of the summed loss is off the per-state sum"


@pytest.mark.parametrize("adjoint", ["unrolled", "phantom"])
def test_without_gradients_the_states_are_the_same(adjoint):
    """Under no_grad the fixed-point solve updates its state in place; the returned states are
    copies taken at their steps, equal to those of the graph-building solve."""
    f, x, _ = setup()
    layer = deq(f, "fixed_point", adjoint)
    with_graph = layer(x, states_at=STEPS)
    with torch.no_grad():
        without = layer(x, states_at=STEPS)
    for k, a, b in zip(STEPS, with_graph, without):
        assert relative_error(b, a.detach()) <= 1e-15, f"{adjoint}: z_{k} under no_grad differs"
    assert len({s.data_ptr() for s in without}) == len(STEPS), "two returned states share memory"


@pytest.mark.parametrize("adjoint", ["unrolled", "phantom"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_states_past_the_stop_are_the_solution(solver, adjoint):
    torch.manual_seed(0)
    f = TanhBlock(6, contraction=0.5).double()
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    layer = rk.DEQ(f, solver=solver, adjoint=adjoint, max_steps=40, tol=1e-6)
    states = layer(x, states_at=(1, 39, 40))
    steps = layer.last_stats.steps
    assert 1 < steps < 39, f"{solver}: the solve was meant to stop early, it ran {steps} steps"
    solution = layer(x)
    for state in states[1:]:
        assert torch.equal(state, solution), f"{solver}/{adjoint}: a state past the stop differs from the solution"
    assert states[1].data_ptr() != states[2].data_ptr(), f"{solver}/{adjoint}: two states past the stop alias"


def test_reversible_solver_with_the_phantom_adjoint():
    """The reversible iteration's states (as ReversibleDEQ returns them), each with the phantom
    gradient taken from it."""
    f, x, weights = setup()
    phantom = rk.DEQ(f, solver="reversible", adjoint="phantom", beta=0.5, max_steps=8, tol=0.0, phantom_steps=3)
    states = phantom(x, states_at=STEPS)
    with torch.no_grad():
        plain = rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0.0, reversal="float")(x, states_at=STEPS)
    for k, a, b in zip(STEPS, states, plain):
        assert torch.equal(a.detach(), b), f"z_{k} of the reversible solver differs from ReversibleDEQ's"
    alone = rk.DEQ(f, solver="reversible", adjoint="phantom", beta=0.5, max_steps=3, tol=0.0, phantom_steps=3)(x)
    error = relative_error(grads(f, x, (weights[1] * states[1]).sum())[0], grads(f, x, (weights[1] * alone).sum())[0])
    assert error <= 1e-14, f"the phantom gradient of z_3 is {error:.2e} off a 3-step solve's"


@pytest.mark.parametrize("solver", ["anderson", "reversible"])
def test_the_implicit_adjoint_refuses_states(solver):
    f, x, _ = setup()
    with pytest.raises(ValueError, match="states_at with adjoint='implicit'.*adjoint='phantom'"):
        rk.DEQ(f, solver=solver, adjoint="implicit")(x, states_at=(2,))


class TwoResolutions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fine, self.coarse = torch.nn.Linear(3, 3), torch.nn.Linear(5, 5)

    def forward(self, z, x):
        return (torch.tanh(0.5 * self.fine(z[0]) + x[0]),
                torch.tanh(0.5 * self.coarse(z[1]) + x[1] + z[0].mean(1, keepdim=True)))


def test_tuple_states():
    """Tuple x (several resolutions): each state is a tuple, the same as a k-step solve's."""
    torch.manual_seed(0)
    f = TwoResolutions().double()
    x = (torch.randn(2, 3, dtype=F64), torch.randn(2, 5, dtype=F64))
    states = rk.DEQ(f, solver="anderson", adjoint="unrolled", max_steps=6, tol=0.0)(x, states_at=(2, 6))
    for k, state in zip((2, 6), states):
        alone = rk.DEQ(f, solver="anderson", adjoint="unrolled", max_steps=k, tol=0.0)(x)
        assert isinstance(state, tuple) and all(torch.equal(s, t) for s, t in zip(state, alone)), f"z_{k} differs"


def test_a_broyden_state_after_a_rejected_step_is_where_the_sample_stayed():
    """Broyden rejects sample 0's step 3 (its evaluation returns NaN): z_3 of that sample is its
    z_2, not the rejected proposal, while the other samples move on."""
    from tests.test_broyden import FailsOnce

    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=F64)
    layer = rk.DEQ(FailsOnce(at=3), solver="broyden", adjoint="phantom", max_steps=12, tol=0, backend="torch")
    with torch.no_grad():
        z_2, z_3 = layer(x, states_at=(2, 3))
    assert torch.equal(z_3[0], z_2[0]), "sample 0's z_3 is not its z_2: the state was taken before the rejection"
    assert not torch.equal(z_3[1:], z_2[1:]), "the other samples did not move at step 3; nothing was tested"
