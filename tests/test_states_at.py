"""Losses on the trajectory: ``states_at=(k1, k2, ...)`` returns z after those steps, each with
the exact gradient of the iteration (torchdeq's fixed-point correction supervises such states).
The reference is plain autograd through the same iteration (``adjoint="unrolled"``) in float64.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import ResidualBlock, TanhBlock, backend_device_pairs, bench_module, pair_id, relative_error

F64 = torch.float64
STEPS = (1, 3, 6, 8)


def weighted_loss(solution, weights):
    """A different weight per returned state, so a cotangent injected at the wrong step shows."""
    return sum((w * s).sum() for w, s in zip(weights, solution.states)) + (solution.z ** 2).sum()


def gradients(f, x, weights, z0=None, **options):
    tensors = [x, *([z0] if z0 is not None else []), *f.parameters()]
    for t in tensors:
        t.grad = None
    solution = rk.solve(f, x, z0, **options)
    weighted_loss(solution, weights).backward()
    return solution, [t.grad.clone() for t in tensors]


def setup(dtype=F64, device="cpu", width=16, batch=4):
    torch.manual_seed(0)
    f = ResidualBlock(width).to(device, dtype)
    x = torch.randn(batch, width, dtype=dtype, device=device, requires_grad=True)
    weights = [torch.randn(batch, width, dtype=dtype, device=device) for _ in STEPS]
    return f, x, weights


REVERSALS = {"exact": dict(reversal="exact"), "float": dict(reversal="float"),
             "float-checkpointed": dict(checkpoint_every=3)}


@pytest.mark.parametrize("pair", backend_device_pairs(), ids=pair_id)
@pytest.mark.parametrize("reversal", list(REVERSALS))
def test_state_gradients_match_unrolled_autograd(pair, reversal):
    """On the expansive residual block, float64, 8 steps: the states and the gradients (x, z0 and
    every parameter) of a loss on four of them and on z equal plain autograd through the same
    iteration."""
    backend, device = pair
    f, x, weights = setup(device=device)
    z0 = (0.1 * torch.randn_like(x)).requires_grad_()  # its gradient collects every injected cotangent
    common = dict(beta=0.5, max_steps=8, tol=0.0, states_at=STEPS)
    want_solution, want = gradients(f, x, weights, z0, adjoint="unrolled", **common)
    got_solution, got = gradients(f, x, weights, z0, backend=backend, **REVERSALS[reversal], **common)
    # exact: fixed point at 2^-48 (states ~1) and float64 backprop; float: 8 reverse steps of drift
    bound = 1e-12 if reversal == "exact" else 1e-10
    for name, solution in (("unrolled", want_solution), (f"{backend}/{reversal}", got_solution)):
        assert solution.states[-1].data_ptr() != solution.z.data_ptr(), f"{name}: z_8 aliases the solution z_8"
    for k, got_state, want_state in zip(STEPS, got_solution.states, want_solution.states):
        error = relative_error(got_state.detach(), want_state.detach())
        assert error < bound, f"{backend}/{reversal}: z_{k} is {error:.2e} off the unrolled iteration's"
    names = ["x", "z0"] + [name for name, _ in f.named_parameters()]
    for name, g, w in zip(names, got, want):
        error = relative_error(g, w)
        assert error < bound, f"{backend}/{reversal}: the gradient of {name} is {error:.2e} off plain autograd"


def test_each_state_gets_its_own_cotangent():
    """A loss on z_k alone, from an 8-step solve, has the gradient of a k-step solve's z, and
    k = 3 differs from k = 6: each cotangent lands at its own step (a shift by one step could
    pass a test that only sums them all)."""
    f, x, _ = setup()
    grads = {}
    for k in (3, 6):
        x.grad = None
        states = rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0.0)(x, states_at=(k,))
        states[0].sum().backward()
        grads[k] = x.grad.clone()
        x.grad = None
        rk.solve(f, x, beta=0.5, max_steps=k, tol=0.0, adjoint="unrolled").z.sum().backward()
        error = relative_error(grads[k], x.grad)
        assert error < 1e-12, f"dL/dx for a loss on z_{k} is {error:.2e} off a {k}-step solve's"
    assert relative_error(grads[3], grads[6]) > 1e-3, "the gradients of losses on z_3 and z_6 coincide"


@pytest.mark.parametrize("adjoint", ["reversible", "unrolled"])
def test_states_past_the_stop_are_the_solution(adjoint):
    """With tol > 0 the solve stops at s < max_steps; a state asked for after s is the returned z
    (a tensor of its own, whichever adjoint) and its gradient is z's."""
    torch.manual_seed(0)
    f = TanhBlock(width=6, contraction=0.5).double()
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    solution = rk.solve(f, x, beta=0.5, max_steps=40, tol=1e-6, states_at=(2, 39, 40), adjoint=adjoint)
    assert 2 < solution.steps < 39, f"the solve was meant to stop early, it ran {solution.steps} steps"
    late = solution.states[1:]
    for state in late:
        assert torch.equal(state, solution.z), f"{adjoint}: a state past the stop differs from the solution"
        assert state.data_ptr() != solution.z.data_ptr(), f"{adjoint}: a state past the stop aliases the solution"
    assert late[0].data_ptr() != late[1].data_ptr(), f"{adjoint}: two states past the stop alias each other"
    late[0].sum().backward()
    from_state = x.grad.clone()
    x.grad = None
    rk.solve(f, x, beta=0.5, max_steps=40, tol=1e-6, adjoint=adjoint).z.sum().backward()
    error = relative_error(from_state, x.grad)
    assert error < 1e-13, f"{adjoint}: the gradient through a state past the stop is {error:.2e} off the solution's"


def test_float32_exact_states_are_float32_backprop():
    """float32, the residual block at 16 steps: the exact reversal's gradients of a trajectory loss
    are within 10x of float32 autograd's own error against float64 (the float reversal is not)."""
    f, x, _ = setup(width=32)
    steps = (4, 8, 12, 16)
    torch.manual_seed(1)
    weights = [torch.randn(4, 32, dtype=F64) for _ in steps]
    common = dict(beta=0.5, max_steps=16, tol=0.0, states_at=steps)
    _, truth = gradients(f, x, weights, adjoint="unrolled", **common)
    f32, x32 = f.float(), x.detach().float().requires_grad_()
    w32 = [w.float() for w in weights]
    _, unrolled32 = gradients(f32, x32, w32, adjoint="unrolled", **common)
    _, exact32 = gradients(f32, x32, w32, reversal="exact", **common)
    backprop_error = relative_error(unrolled32[0], truth[0])
    exact_error = relative_error(exact32[0], truth[0])
    assert exact_error <= 10 * backprop_error, (
        f"dL/dx: exact reversal {exact_error:.2e} off float64, float32 autograd {backprop_error:.2e}")


def test_tuple_states_and_context():
    """A state of two tensors with a context keyword: each returned state is a tuple, and the
    gradients (x's components, the context) match plain autograd."""
    from tests.test_tuple_states import TwoScale
    torch.manual_seed(0)
    block = TwoScale().double()
    x = (torch.randn(3, 4, 8, dtype=F64, requires_grad=True), torch.randn(3, 8, 4, dtype=F64, requires_grad=True))
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        for t in (*x, scale):
            t.grad = None
        deq = rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0.0, adjoint=adjoint)
        states = deq(x, states_at=(2, 6), scale=scale)
        assert len(states) == 2 and all(isinstance(s, tuple) and len(s) == 2 for s in states)
        assert states[0][0].shape == (3, 4, 8) and states[0][1].shape == (3, 8, 4)
        loss = states[0][0].sum() + 2 * states[0][1].sum() + (states[1][0] ** 2).sum() - states[1][1].sum()
        loss.backward()
        grads[adjoint] = [t.grad.clone() for t in (*x, scale)]
    for name, got, want in zip(("x[0]", "x[1]", "scale"), grads["reversible"], grads["unrolled"]):
        error = relative_error(got, want)
        assert error < 1e-12, f"the gradient of {name} is {error:.2e} off plain autograd"


def test_without_gradients_the_states_are_the_same():
    f, x, _ = setup()
    common = dict(beta=0.5, max_steps=8, tol=0.0, states_at=STEPS)
    with_grad = rk.solve(f, x, **common)
    with torch.no_grad():
        without = rk.solve(f, x, **common)
    for k, a, b in zip(STEPS, with_grad.states, without.states):
        assert torch.equal(a, b), f"z_{k} under no_grad differs from the training pass's"
        assert not b.requires_grad


def saved_elements(run) -> int:
    """Elements of every tensor autograd saves for the backward while ``run()`` builds the graph."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


@pytest.mark.parametrize("reversal", ["exact", "float"])
def test_returned_states_add_nothing_to_the_saved_memory(reversal):
    """The states are outputs, not saved tensors: asking for four of them saves what the plain
    solve saves, at 8 and at 32 steps (memory flat in depth), while unrolled grows."""
    f, x, _ = setup()
    saved = {}
    for steps in (8, 32):
        common = dict(beta=0.5, max_steps=steps, tol=0.0, reversal=reversal)
        plain = saved_elements(lambda: rk.solve(f, x, **common))
        with_states = saved_elements(lambda: rk.solve(f, x, states_at=(1, 2, 4, steps), **common))
        assert with_states == plain, (f"{reversal}, {steps} steps: {with_states} saved elements with states_at, "
                                      f"{plain} without")
        saved[steps] = plain
    if reversal == "float":  # the exact reversal's digit planes grow by one int64 plane per 63 steps
        assert saved[32] == saved[8], f"saved elements grew with depth: {saved}"
    unrolled = {steps: saved_elements(functools.partial(rk.solve, f, x, beta=0.5, max_steps=steps, tol=0.0,
                                                        adjoint="unrolled")) for steps in (8, 32)}
    assert unrolled[32] > 3 * unrolled[8], f"unrolled saved {unrolled}: expected growth with depth"


def test_a_nonfinite_state_cotangent_is_reported_at_its_step():
    f, x, _ = setup()
    solution = rk.solve(f, x, beta=0.5, max_steps=8, tol=0.0, states_at=(3,))
    bad = torch.full_like(solution.states[0], float("nan"))
    with pytest.raises(FloatingPointError, match=r"with respect to z after step 3 \(states_at\) is non-finite"):
        (solution.states[0] * bad).sum().backward()


@pytest.mark.parametrize("states_at, error, match", [
    (4, TypeError, r"states_at must be a sequence of steps, got the int 4: pass \(4,\)"),
    ((), ValueError, "states_at is empty"),
    ((0, 2), ValueError, r"ints in 1\.\.max_steps=8, got 0"),
    ((2, 9), ValueError, r"ints in 1\.\.max_steps=8, got 9"),
    ((2, True), ValueError, "got True"),
    ((2.0,), ValueError, "got 2.0"),
    ((4, 2), ValueError, r"must be increasing, got \(4, 2\)"),
    ((2, 2), ValueError, r"must be increasing, got \(2, 2\)"),
    ("12", TypeError, r"a sequence of steps \(a tuple, list or range\), got str '12'"),
    ({2, 4}, TypeError, r"a sequence of steps \(a tuple, list or range\), got set"),
    ((torch.tensor(1.5),), ValueError, r"got tensor\(1\.5000\)"),
], ids=["int", "empty", "zero", "past-max", "bool", "float", "decreasing", "repeated", "str", "set", "float-tensor"])
def test_bad_states_at_is_named(states_at, error, match):
    f, x, _ = setup()
    with pytest.raises(error, match=match):
        rk.ReversibleDEQ(f, beta=0.5, max_steps=8)(x, states_at=states_at)


@pytest.mark.parametrize("steps", [range(2, 9, 3), [2, 5, 8], np.array([2, 5, 8]), torch.tensor([2, 5, 8])],
                         ids=["range", "list", "numpy", "tensor"])
def test_integer_sequences_name_the_same_steps(steps):
    """A range, a list, a numpy array or an integer tensor of steps returns what the tuple does."""
    f, x, _ = setup()
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0.0)
    with torch.no_grad():
        want = deq(x, states_at=(2, 5, 8))
        got = deq(x, states_at=steps)
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want)), (
        f"states_at={steps!r} returned other states than (2, 5, 8)")


@pytest.mark.parametrize("adjoint", ["reversible", "unrolled"])
def test_deq_with_the_reversible_solver_returns_states(adjoint):
    """rk.DEQ(solver="reversible") (the language model's layer) returns the same states and
    gradients as ReversibleDEQ."""
    f, x, weights = setup()
    results = []
    for layer in (rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0.0, adjoint=adjoint),
                  rk.DEQ(f, solver="reversible", adjoint=adjoint, beta=0.5, max_steps=8, tol=0.0)):
        x.grad = None
        states = layer(x, states_at=STEPS)
        sum((w * s).sum() for w, s in zip(weights, states)).backward()
        results.append((states, x.grad.clone()))
    (states_a, grad_a), (states_b, grad_b) = results
    for k, a, b in zip(STEPS, states_a, states_b):
        assert torch.equal(a, b), f"DEQ's z_{k} differs from ReversibleDEQ's"
    assert torch.equal(grad_a, grad_b), f"DEQ's dL/dx is {relative_error(grad_b, grad_a):.2e} off ReversibleDEQ's"


def test_trajectory_bench_runs(tmp_path, capsys):
    """bench/trajectory.py at a tiny size: its table prints and the exact reversal's row is float32
    backprop's error, so the figures in docs/api.md cannot rot unseen."""
    import json
    trajectory = bench_module("trajectory")
    out = tmp_path / "rows.json"
    assert trajectory.main(["--steps", "8", "--betas", "0.5", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "commit", "torch"} <= set(payload["header"]), payload["header"]
    (row,) = payload["rows"]
    assert row["exact"] <= 10 * row["autograd_f32"], row
    assert row["saved_exact_states"] == row["saved_exact"], row
    assert "| 0.5 | 8 |" in capsys.readouterr().out
