"""The ``rng`` setting: how f's dropout draws within one solve.

"per_solve" (the default) gives every evaluation of f in one solve the same random numbers:
one dropout mask per solve, so f is one function with a fixed point. "per_evaluation" gives
each evaluation its own mask; the iteration then has no fixed point, which the convergence
and implicit-gradient tests below show by failing under it. Both replay the forward's masks
in the backward; "global" does not (tests/test_reversible.py covers what that breaks).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import revdeq_kernels as rk
from revdeq_kernels.settings import DEQSettings, SettingError, SolveSettings
from tests.helpers import TanhBlock, devices, relative_error

WIDTH, BATCH, DROPOUT = 16, 6, 0.2


class MaskRecorder(nn.Module):
    """f(z, x) = 0.5 * tanh(z + x), times a dropout mask it records at each evaluation."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.masks: list[torch.Tensor] = []

    def forward(self, z, x):
        mask = self.drop(torch.ones_like(z))
        self.masks.append(mask.detach().clone())
        return mask * 0.5 * torch.tanh(z + x)


def block_and_input(device: str, seed: int = 0):
    torch.manual_seed(seed)
    f = TanhBlock(WIDTH, dropout=DROPOUT, contraction=0.5).double().to(device)
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, device=device)
    return f, x


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reversal", ["exact", "float"])
def test_per_solve_uses_one_mask_in_every_evaluation_of_a_solve(device, reversal):
    f = MaskRecorder()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, device=device, requires_grad=True)
    deq = rk.ReversibleDEQ(f, max_steps=4, tol=0, reversal=reversal)
    deq(x).sum().backward()
    forward_and_backward = f.masks  # 2N+1 forward evaluations, then 2N recomputations
    assert len(forward_and_backward) == 17, f"{len(forward_and_backward)} evaluations, not 9 + 8"
    first = forward_and_backward[0]
    differing = [k for k, mask in enumerate(forward_and_backward) if not torch.equal(mask, first)]
    assert not differing, f"evaluations {differing} drew another dropout mask than evaluation 0 of the same solve"
    assert 0 < int((first == 0).sum()) < first.numel(), "the mask drops nothing or everything: the test proves nothing"
    f.masks.clear()
    deq(x)
    assert not torch.equal(f.masks[0], first), "a second solve drew the first solve's mask again"


@pytest.mark.parametrize("device", devices())
def test_per_evaluation_draws_a_new_mask_at_every_evaluation(device):
    f = MaskRecorder()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, device=device)
    rk.solve(f, x, max_steps=3, tol=0, rng="per_evaluation")
    distinct = {tuple(mask.flatten().tolist()) for mask in f.masks}
    assert len(distinct) == len(f.masks) == 7, f"{len(distinct)} distinct masks in {len(f.masks)} evaluations"


SOLVERS = {
    "reversible": dict(solver="reversible", adjoint="reversible"),
    "anderson": dict(solver="anderson"),
    "fixed_point": dict(solver="fixed_point"),
    "broyden": dict(solver="broyden"),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_dropout_block_has_a_fixed_point_per_solve_and_none_per_evaluation(device, solver):
    """Under "per_solve" every solver reaches tol = 1e-9 on a contractive block with dropout
    before max_steps; under "per_evaluation" none gets below the masks' noise."""
    f, x = block_and_input(device)
    residuals = {}
    for mode in ("per_solve", "per_evaluation"):
        deq = rk.DEQ(f, max_steps=60, tol=1e-9, rng=mode, **SOLVERS[solver])
        deq(x)
        residuals[mode] = (deq.last_stats.steps, float(deq.last_stats.residual.max()))
    steps, residual = residuals["per_solve"]
    assert residual <= 1e-9 and steps < 60, (
        f"{solver}, rng='per_solve': residual {residual:.3g} after {steps} steps; one mask per solve should converge")
    steps, residual = residuals["per_evaluation"]
    assert residual > 1e-2, (
        f"{solver}, rng='per_evaluation': residual {residual:.3g}; a new mask per evaluation should leave noise")


def gradient(f, x: torch.Tensor, seed: int, **settings) -> torch.Tensor:
    torch.manual_seed(seed)  # the solve's one draw from the global generator: the same masks for every adjoint
    x = x.clone().requires_grad_()
    z = rk.DEQ(f, **{"max_steps": 60, "tol": 1e-11, **settings})(x)
    (z.square().sum() + z.sin().sum()).backward()
    return x.grad


@pytest.mark.parametrize("device", devices())
def test_implicit_gradient_under_dropout_is_exact_per_solve(device):
    """The implicit adjoint differentiates f at its fixed point: with one mask per solve that is
    the gradient of the iteration the unrolled adjoint backpropagates through (float64, 1e-8);
    with a mask per evaluation there is no such f, and it is off by percents."""
    f, x = block_and_input(device, seed=1)
    errors = {}
    for mode in ("per_solve", "per_evaluation"):
        unrolled = gradient(f, x, 7, solver="fixed_point", adjoint="unrolled", rng=mode)
        for solver in ("anderson", "fixed_point"):
            implicit = gradient(f, x, 7, solver=solver, adjoint="implicit", backward_tol=1e-12, rng=mode)
            errors[mode, solver] = relative_error(implicit, unrolled)
    for solver in ("anderson", "fixed_point"):
        assert errors["per_solve", solver] <= 1e-8, (
            f"{solver} + implicit, rng='per_solve': gradient {errors['per_solve', solver]:.3g} from unrolled")
        assert errors["per_evaluation", solver] > 1e-2, (
            f"{solver} + implicit, rng='per_evaluation': only {errors['per_evaluation', solver]:.3g} from unrolled; "
            "the control should show the missing fixed point")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["per_solve", "per_evaluation"])
@pytest.mark.parametrize("reversal", ["exact", "float"])
def test_reversible_gradients_equal_unrolled_in_both_replayed_modes(device, mode, reversal):
    f, x = block_and_input(device, seed=2)
    common = dict(solver="reversible", beta=0.5, max_steps=10, tol=0, rng=mode)
    reversible = gradient(f, x, 3, adjoint="reversible", reversal=reversal, **common)
    unrolled = gradient(f, x, 3, adjoint="unrolled", **common)
    error = relative_error(reversible, unrolled)
    assert error <= 1e-9, f"rng={mode!r}, reversal={reversal!r}: reversible gradient {error:.3g} from unrolled"


@pytest.mark.parametrize("mode", ["per_solve", "per_evaluation"])
def test_a_solve_draws_once_from_the_global_generator(mode):
    """torch.manual_seed makes a run reproducible, and a solve advances the global stream by
    one draw whatever the number of evaluations (dropout outside f sees the same numbers)."""
    f, x = block_and_input("cpu")
    torch.manual_seed(11)
    first = rk.solve(f, x, max_steps=5, tol=0, rng=mode).z
    after_solve = torch.rand(3)
    torch.manual_seed(11)
    torch.randint(0, 2**62, (1,))
    after_one_draw = torch.rand(3)
    torch.manual_seed(11)
    again = rk.solve(f, x, max_steps=5, tol=0, rng=mode).z
    assert torch.equal(first, again), "the same seed gave another solution"
    assert torch.equal(after_solve, after_one_draw), "the solve advanced the global generator by more than one draw"


def test_deprecated_replay_rng_maps_to_rng_with_a_warning():
    for old, new in ((True, "per_evaluation"), (False, "global")):
        with pytest.warns(DeprecationWarning, match=f"replay_rng={old} is deprecated: pass rng='{new}'"):
            deq = rk.ReversibleDEQ(TanhBlock(), replay_rng=old)
        assert deq.settings.rng == new and deq.settings.replay_rng is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the cleared old name does not warn again
            assert dataclasses.replace(deq.settings, max_steps=3).rng == new
        with pytest.warns(DeprecationWarning):
            assert rk.DEQ(TanhBlock(), replay_rng=old).settings.rng == new


@pytest.mark.parametrize("settings, message", [
    (dict(rng="per_step"), r"^rng must be one of \('per_solve', 'per_evaluation', 'global'\), got 'per_step'$"),
    (dict(rng=True), r"^rng must be one of .*got True$"),
    (dict(rng="global", replay_rng=True), r"^replay_rng and rng='global' are both given"),
    (dict(replay_rng="yes"), r"^replay_rng must be True or False, got 'yes'"),
], ids=["unknown", "bool", "both", "not-bool"])
@pytest.mark.parametrize("kind", [SolveSettings, DEQSettings])
def test_bad_rng_settings_are_one_line_errors(settings, message, kind):
    with pytest.raises(SettingError, match=message):
        kind(**settings)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layer", ["ReversibleDEQ", "DEQ"])
def test_replaying_rng_gives_f_the_last_solve_s_masks(device, layer):
    f = MaskRecorder()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, device=device)
    deq = rk.ReversibleDEQ(f, max_steps=3, tol=0) if layer == "ReversibleDEQ" else rk.DEQ(f, max_steps=3, tol=0)
    with pytest.raises(RuntimeError, match="^no solve to replay the random numbers of: call the DEQ layer first$"):
        deq.replaying_rng()
    z = deq(x)
    solved = f.masks[0]
    for _ in range(2):  # each entry replays from the solve's start, not from where the last one stopped
        with deq.replaying_rng():
            f(z, x)
        assert torch.equal(f.masks[-1], solved), f"{layer}: f in replaying_rng() drew another mask than the solve's"
    with deq.replaying_rng():
        f(z, x)
        f(z, x)
    assert not torch.equal(f.masks[-1], solved), "a second draw in one context repeated the first: not a stream"


@pytest.mark.parametrize("mode", ["per_evaluation", "global"])
def test_replaying_rng_refuses_a_solve_without_one_set_of_masks(mode):
    """No silent fresh draw: the layer raises, and the diagnostics, given it, use fresh masks
    as for the bare block (they still run)."""
    f = MaskRecorder()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    deq = rk.ReversibleDEQ(f, max_steps=3, tol=0, rng=mode)
    z = deq(x)
    with pytest.raises(RuntimeError, match=f"^the last solve ran with rng='{mode}', which gives f no one set"):
        deq.replaying_rng()
    assert rk.fixed_point_gaps(deq, z, x).residual.shape == (BATCH,)


@pytest.mark.parametrize("device", devices())
def test_diagnostics_given_the_layer_evaluate_the_f_it_solved(device):
    """fixed_point_gaps on the layer reads the residual the solve reported, with its masks
    (float64: rounding); on the bare block, f draws other masks and reads the masks' noise."""
    f, x = block_and_input(device, seed=4)
    deq = rk.ReversibleDEQ(f, max_steps=40, tol=1e-10)
    z = deq(x)
    reported = deq.last_stats.residual
    assert float(reported.max()) <= 1e-10, f"the solve did not converge: {float(reported.max()):.3g}"
    replayed = rk.fixed_point_gaps(deq, z, x).residual
    assert not replayed.requires_grad, "fixed_point_gaps returned a tensor attached to its own leaf"
    assert torch.allclose(replayed, reported, rtol=0, atol=1e-12), (
        f"fixed_point_gaps(layer) {float(replayed.max()):.3g} against the solve's {float(reported.max()):.3g}")
    fresh = rk.fixed_point_gaps(f, z, x).residual
    assert float(fresh.max()) > 1e-2, f"the bare block with fresh masks read {float(fresh.max()):.3g}"



@pytest.mark.parametrize("device", devices())
def test_jacobian_penalty_given_the_layer_differentiates_the_f_it_solved(device):
    f, x = block_and_input(device, seed=5)
    deq = rk.ReversibleDEQ(f, max_steps=40, tol=1e-10)
    z = deq(x).detach()
    torch.manual_seed(9)  # the probe's draw
    penalty = rk.jacobian_penalty(deq, z, x)
    torch.manual_seed(9)
    at = z.clone().requires_grad_()
    with deq.replaying_rng():
        fz = f(at, x)
    (vjp,) = torch.autograd.grad(fz, at, torch.randn_like(fz))
    by_hand = vjp.pow(2).sum() / z.numel()
    assert torch.allclose(penalty, by_hand, rtol=1e-12, atol=0), f"{penalty.item()} against {by_hand.item()}"
    torch.manual_seed(9)
    fresh = rk.jacobian_penalty(f, z, x)
    assert abs(fresh.item() / by_hand.item() - 1) > 1e-3, "the bare block's fresh masks gave the same penalty"
