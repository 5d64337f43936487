"""reversal="exact" end to end, and the float reversal's safety nets.

Exact: on an expansive residual block the gradients match float32 backprop of the same
iteration at every depth (the float reversal's error is printed next to it), the backward
lands on the start bit for bit (reconstruction_error is exactly 0.0), the saved memory is
the states plus the digit planes, dropout replays, and f that is not bitwise
deterministic is caught. Float: a NaN in the backward is raised naming the reverse step,
reconstruction_error is NaN-aware, and a large drift warns once with the remedy."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import revdeq_kernels as rk
from revdeq_kernels import fixed_point as fp
from revdeq_kernels.reversal import RECONSTRUCTION_WARNING
from revdeq_kernels.settings import SettingError
from tests.helpers import ResidualBlock, TanhBlock, relative_error

WIDTH = 32


def block_and_input(seed=0, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(seed)
    f = ResidualBlock(WIDTH, dropout=dropout).to(dtype)
    return f, torch.randn(6, WIDTH, dtype=dtype)


def parameter_grads(f, x, loss_of):
    f.zero_grad()
    loss_of(x).backward()
    return torch.cat([p.grad.flatten() for p in f.parameters()])


def float64_truth(f, x, beta, steps):
    f64 = ResidualBlock(WIDTH).double()
    f64.load_state_dict(f.state_dict())
    return parameter_grads(f64, x.double(), lambda x64: rk.solve(
        f64, x64, beta=beta, max_steps=steps, tol=0, adjoint="unrolled").z.square().sum())


def grads_of(f, x, **settings):
    return parameter_grads(f, x, lambda x_: rk.solve(f, x_, tol=0, **settings).z.square().sum())


@pytest.mark.parametrize("beta", [0.5, 0.8])
@pytest.mark.parametrize("steps", [8, 32, 128])
def test_exact_gradients_match_float32_backprop_on_a_residual_block(beta, steps):
    f, x = block_and_input()
    truth = float64_truth(f, x, beta, steps)
    backprop = relative_error(grads_of(f, x, beta=beta, max_steps=steps, adjoint="unrolled"), truth)
    exact = relative_error(grads_of(f, x, beta=beta, max_steps=steps, reversal="exact"), truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        floating = relative_error(grads_of(f, x, beta=beta, max_steps=steps, on_nonfinite="warn",
                                           reversal="float"), truth)
    print(f"beta={beta} N={steps}: relative gradient error vs float64 autograd: exact {exact:.2e}, "
          f"float32 backprop {backprop:.2e}, float reversal {floating:.2e}")
    assert exact <= 10 * max(backprop, 1e-7), (
        f"exact reversal's gradient error {exact:.3g} is more than 10x float32 backprop's {backprop:.3g} "
        f"(beta={beta}, N={steps})")


def test_exact_backward_lands_on_the_start_bit_for_bit():
    f, x = block_and_input(1)
    z0 = torch.randn_like(x)
    deq = rk.ReversibleDEQ(f, beta=0.8, max_steps=40, tol=0, reversal="exact")
    deq(x, z0).sum().backward()
    assert deq.last_stats.reconstruction_error == 0.0


def test_stop_test_and_z0_gradient():
    f = TanhBlock(6, contraction=0.5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    f.double()
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=60, tol=1e-6, reversal="exact")
    z = deq(x, z0)
    assert 0 < deq.last_stats.steps < 60, "the fused stop test must stop the exact iteration early"
    z.sum().backward()
    assert deq.last_stats.reconstruction_error == 0.0
    assert z0.grad is not None and x.grad is not None


def test_gradcheck_tiny_float64():
    torch.manual_seed(3)
    f = TanhBlock(3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    # 50 fractional bits: the grid (1e-15) is far below gradcheck's finite-difference step.
    solve = lambda x_: rk.solve(f, x_, beta=0.5, max_steps=6, tol=0, reversal="exact", frac_bits=50).z
    assert torch.autograd.gradcheck(solve, (x,), eps=1e-6, atol=1e-7)


def saved_bytes(deq, x):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = deq(x)
    return sum(total), z


def test_saved_memory_is_the_states_plus_the_digit_planes():
    f, x = block_and_input(2)
    x.requires_grad_(True)
    for beta, steps in [(0.5, 64), (0.8, 64), (0.8, 4)]:
        deq = rk.ReversibleDEQ(f, beta=beta, max_steps=steps, tol=0, reversal="exact")
        got, z = saved_bytes(deq, x)
        capacity = fp.plane_capacity(fp.beta_ratio(beta))
        planes = 2 * math.ceil(steps / capacity)  # y and z each multiply `steps` times
        expected = x.numel() * 4 + (2 + planes) * x.numel() * 8  # x, the two int64 states, the planes
        assert got == expected, (f"beta={beta} N={steps}: saved {got} bytes, expected {expected} = x + y + z + "
                                 f"{planes} digit planes of {capacity} steps")
        z.sum().backward()


def test_dropout_is_replayed_exactly():
    f, x = block_and_input(4, dropout=0.3)
    f.train()
    deq = rk.ReversibleDEQ(f, beta=0.8, max_steps=12, tol=0, reversal="exact")
    deq(x).sum().backward()
    assert deq.last_stats.reconstruction_error == 0.0


def test_nondeterministic_f_is_detected():
    f, x = block_and_input(5, dropout=0.3)
    f.train()
    deq = rk.ReversibleDEQ(f, beta=0.8, max_steps=6, tol=0, reversal="exact", rng="global")
    z = deq(x)
    with pytest.raises(RuntimeError, match="did not compute the same bits.* rng=.global., so any random op"):
        z.sum().backward()


class SmallLinear(torch.nn.Module):
    """f(z, x) = W z + x with ||W||_2 = 0.5: the states stay at the scale of x."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.mix = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.mix.weight.mul_(0.5 / torch.linalg.matrix_norm(self.mix.weight, 2))

    def forward(self, z, x):
        return self.mix(z) + x


def test_states_small_against_the_grid_warn_once_with_the_frac_bits_that_fix_it():
    """At |z| ~ 1e-6 the 2^-32 grid keeps 13 bits of the states: exact, but 1e-4 off float32.
    The warning names frac_bits=42, which brings the gradient back to float32's accuracy."""
    torch.manual_seed(0)
    f = SmallLinear()
    x = (torch.randn(4, 16) * 1e-6).requires_grad_()

    def x_grad(**settings):
        z = rk.solve(f, x, beta=0.5, max_steps=8, tol=0, **settings).z
        return torch.autograd.grad(z.square().sum(), x)[0]

    truth = x_grad(reversal="float", adjoint="unrolled")
    with pytest.warns(RuntimeWarning, match=r"largest state is .*e-06, only \d+ steps of the fixed-point grid "
                                            r"2\^-32 .*about 1\.\de-04 relative\. Pass frac_bits=42") as caught:
        coarse = x_grad()
        x_grad()
    assert len([w for w in caught if "fixed-point grid" in str(w.message)]) == 1, "warn once per f"
    assert relative_error(coarse, truth) > 1e-5, "the warning's premise: the 2^-32 grid is too coarse here"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fine = x_grad(frac_bits=42)
        at_scale_one = rk.solve(SmallLinear(), torch.randn(4, 16), beta=0.5, max_steps=8, tol=0).z
    error = relative_error(fine, truth)
    assert error <= 1e-6, f"with the suggested frac_bits=42 the gradient is {error:.3g} off float32 unrolled"
    assert at_scale_one.abs().max() > 0.1, "states of order 1 must not warn"


def test_exact_errors():
    with pytest.raises(SettingError, match=r"the nearest is 0\.7068965517241379"):
        rk.ReversibleDEQ(torch.nn.Identity(), beta=0.7071, reversal="exact")
    with pytest.raises(SettingError, match="frac_bits must be an int in"):
        rk.ReversibleDEQ(torch.nn.Identity(), reversal="exact", frac_bits=60)
    with pytest.raises(SettingError, match="checkpoint_every is not used by reversal='exact'"):
        rk.solve(lambda z, x: z, torch.zeros(2, 3), reversal="exact", checkpoint_every=2)
    with pytest.raises(SettingError, match="frac_bits is not used by reversal='float'"):
        rk.ReversibleDEQ(torch.nn.Identity(), frac_bits=32, reversal="float")
    assert rk.SolveSettings().resolved_reversal == "exact", "the default reversal is exact"
    assert rk.SolveSettings(checkpoint_every=4).resolved_reversal == "float", "checkpoints imply float"
    with pytest.raises(SettingError, match="or pass reversal='float'"):
        rk.SolveSettings(beta=0.7071)
    # From z = y = 0 with x = 1, max |y_n| is 0.5, 3.75, 19.9, 99.7: past the range +-64 at step
    # 4. (A random x, drawn from the suite's shared generator, moved that step with the order
    # the tests ran in.)
    with pytest.raises(FloatingPointError, match="left the exact range .* at step 4 of 8"):
        rk.solve(lambda z, x_: 4 * z + x_, torch.ones(2, 3), beta=0.5, max_steps=8, tol=0, reversal="exact",
                 frac_bits=56)
    x = torch.randn(2, 3)
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or Inf\) at step 1 of 4: f returned a NaN"):
        rk.solve(lambda z, x_: z + float("nan"), x, beta=0.5, max_steps=4, tol=0, reversal="exact")
    with pytest.raises(FloatingPointError, match="z0 has a value of magnitude"):
        rk.solve(lambda z, x_: z, x, x * 1e12, reversal="exact")
    with pytest.warns(RuntimeWarning, match="at step 1 of 4: f returned a NaN or Inf .*the result is NaN"):
        z = rk.solve(lambda z, x_: z + float("nan"), x, beta=0.5, max_steps=4, tol=0, reversal="exact",
                     on_nonfinite="warn").z
    assert bool(z.isnan().all()), "on_nonfinite='warn' must hand the NaN on, as the float reversal does"
    deq = rk.DEQ(torch.nn.Identity(), solver="reversible", adjoint="reversible", reversal="exact", beta=0.5)
    assert deq.settings.reversible_solve().reversal == "exact"
    with pytest.raises(SettingError, match="reversal='exact'"):
        rk.DEQ(torch.nn.Identity(), solver="anderson", reversal="exact")


@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_a_nan_from_f_is_reported_once_naming_f(tol):
    """With or without a tolerance (the monitor looks every step, or once at the end), one
    report, and it names f, not the generic advice for a state that overflowed."""
    x = torch.randn(2, 3)
    nan_f = lambda z, x_: z + float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="at step 1 of 4: f returned a NaN or Inf"):
        rk.solve(nan_f, x, beta=0.5, max_steps=4, tol=tol, reversal="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = rk.solve(nan_f, x, beta=0.5, max_steps=4, tol=tol, reversal="exact", on_nonfinite="warn").z
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "f returned a NaN or Inf" in messages[0], messages
    assert bool(z.isnan().all()), z


def test_float_backward_nan_is_raised_naming_the_reverse_step():
    f, x = block_and_input()
    z = rk.solve(f, x, beta=0.5, max_steps=64, tol=0, reversal="float").z
    with pytest.raises(FloatingPointError, match=r"rebuilt a non-finite state .* at reverse step \d+ of 64: the float "
                                                 "reconstruction drifted"):
        z.square().sum().backward()


def test_float_reconstruction_error_is_nan_aware_and_drift_warns_once():
    f, x = block_and_input()
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=64, tol=0, on_nonfinite="warn", reversal="float")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deq(x).square().sum().backward()
    assert math.isnan(deq.last_stats.reconstruction_error), (
        f"a NaN reconstruction must read NaN, got {deq.last_stats.reconstruction_error}")
    assert any("reverse step" in str(w.message) for w in caught)
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=16, tol=0, reversal="float")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            deq(x).square().sum().backward()
    drift = [w for w in caught if "reversal='exact'" in str(w.message) and "relative error" in str(w.message)]
    assert deq.last_stats.reconstruction_error > RECONSTRUCTION_WARNING
    assert len(drift) == 1, f"expected one drift warning for this f, got {len(drift)}"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_the_layer_inside_activation_checkpointing_gets_the_same_gradients(reentrant):
    """torch.utils.checkpoint around the layer (as in a large model's training) reruns the solve
    during the backward, dropout included: the gradients must be those of the plain step."""
    f, x = block_and_input(6, dropout=0.2)
    f.train()
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=12, tol=0, reversal="exact")
    inject = torch.nn.Linear(WIDTH, WIDTH)

    def gradients(wrapped: bool) -> torch.Tensor:
        torch.manual_seed(11)
        f.zero_grad()
        inject.zero_grad()
        x_in = x.clone().requires_grad_(True)
        step = lambda t: deq(inject(t)).square().sum()
        loss = torch.utils.checkpoint.checkpoint(step, x_in, use_reentrant=reentrant) if wrapped else step(x_in)
        loss.backward()
        return torch.cat([x_in.grad.flatten()] + [p.grad.flatten() for p in [*f.parameters(), *inject.parameters()]])

    plain = gradients(False)
    wrapped = gradients(True)
    assert torch.equal(wrapped, plain), (
        f"under activation checkpointing (use_reentrant={reentrant}) the gradients moved by "
        f"{relative_error(wrapped, plain):.3g} relative")
