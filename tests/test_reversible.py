"""ReversibleDEQ against autograd through the unrolled iteration, memory, stopping,
randomness, and every documented error."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings

import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import TanhBlock as Block, backend_device_pairs, pair_id, relative_error


def run(adjoint, beta, steps, *, dtype=torch.float64, dropout=0.0, checkpoint_every=None,
        tol=0.0, z0=False, backend="torch", state_dtype=None, seed=0, batch=4, width=6, reversal=None):
    """Loss gradients w.r.t. x, z0 and every parameter, for one fixed set of weights/inputs."""
    torch.manual_seed(seed)
    f = Block(width, dropout).to(dtype)
    x = torch.randn(batch, width, dtype=dtype, requires_grad=True)
    start = torch.randn(batch, width, dtype=dtype, requires_grad=True) if z0 else None
    torch.manual_seed(seed + 1)  # the solve draws its dropout seed from here
    sol = rk.solve(f, x, start, beta=beta, max_steps=steps, tol=tol, adjoint=adjoint,
                   checkpoint_every=checkpoint_every, backend=backend, state_dtype=state_dtype,
                   reversal=reversal if adjoint == "reversible" else None)
    loss = (sol.z.double().square().sum() + sol.z.double().sin().sum())
    loss.backward()
    grads = [x.grad] + ([start.grad] if z0 else []) + [p.grad for p in f.parameters()]
    return torch.cat([g.flatten().double() for g in grads]), sol


@pytest.mark.parametrize("beta,steps", [(0.5, 12), (0.8, 6), (1.2, 8), (0.3, 30)])
def test_gradients_match_unrolled_float64(beta, steps):
    got, sol = run("reversible", beta, steps, z0=True)
    want, _ = run("unrolled", beta, steps, z0=True)
    err = relative_error(got, want)
    assert err <= 1e-9, f"beta={beta} N={steps}: relative gradient error {err:.3g} > 1e-9"
    assert sol.steps == steps and sol.nfe_forward == 1 + 2 * steps and sol.nfe_backward == 2 * steps
    assert sol.reconstruction_error is not None and sol.reconstruction_error < 1e-6


@pytest.mark.parametrize("steps", [2, 5, 8])
def test_gradients_match_unrolled_float32(steps):
    got, _ = run("reversible", 0.5, steps, dtype=torch.float32)
    want, _ = run("unrolled", 0.5, steps, dtype=torch.float32)
    err = relative_error(got, want)
    assert err <= 1e-4, f"float32 N={steps}: relative gradient error {err:.3g} > 1e-4"


def test_gradcheck_tiny():
    torch.manual_seed(0)
    f = Block(3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, z0):
        return rk.solve(f, x, z0, beta=0.7, max_steps=4, tol=0, backend="torch").z

    assert torch.autograd.gradcheck(fn, (x, z0), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_checkpoints_bound_the_drift():
    want, _ = run("unrolled", 0.8, 20)
    with pytest.warns(RuntimeWarning, match="rebuilt the start state with a relative error .* inexact"):
        plain, plain_sol = run("reversible", 0.8, 20, reversal="float")
    checkpointed, ck_sol = run("reversible", 0.8, 20, checkpoint_every=4)
    err_plain, err_ck = relative_error(plain, want), relative_error(checkpointed, want)
    assert err_ck <= 1e-9, f"checkpoint_every=4: gradient error {err_ck:.3g} > 1e-9"
    assert err_plain > 10 * err_ck, (
        f"without checkpoints the 20-step reconstruction should drift (error {err_plain:.3g}) "
        f"well beyond the checkpointed one ({err_ck:.3g}); otherwise this test proves nothing")
    assert ck_sol.reconstruction_error < plain_sol.reconstruction_error


def saved_bytes(steps: int, checkpoint_every=None, grad=True, adjoint="reversible") -> int:
    """Saved-for-backward bytes of the float reversal (the exact one: tests/test_exact_reversal.py)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)
    f = Block(16)
    x = torch.randn(8, 16, requires_grad=grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.set_grad_enabled(grad):
            rk.solve(f, x, beta=0.5, max_steps=steps, tol=0, backend="torch", checkpoint_every=checkpoint_every,
                     adjoint=adjoint, reversal="float" if adjoint == "reversible" else None)
    return total


def test_saved_memory_is_flat_in_steps():
    small, large = saved_bytes(4), saved_bytes(64)
    assert small == large, f"saved-for-backward bytes grow with steps: {small} at 4 steps, {large} at 64"
    state = 8 * 16 * 4
    assert small == 3 * state, f"expected x, z_N, y_N ({3 * state} bytes), saved {small}"
    # Checkpoints cost two states each, every K steps.
    assert saved_bytes(64, checkpoint_every=16) == small + 3 * 2 * state
    unrolled_growth = [saved_bytes(steps, adjoint="unrolled") for steps in (4, 8)]
    assert unrolled_growth[1] > unrolled_growth[0], "the unrolled baseline should save more with more steps"


def test_nothing_saved_without_grad():
    assert saved_bytes(8, grad=False) == 0
    torch.manual_seed(0)
    f = Block(16)
    x = torch.randn(8, 16)
    with torch.no_grad():
        z_nograd = rk.solve(f, x, beta=0.5, max_steps=6, tol=0, backend="torch").z
    z_grad = rk.solve(f, x, beta=0.5, max_steps=6, tol=0, backend="torch").z
    assert torch.equal(z_nograd, z_grad.detach())
    assert not z_nograd.requires_grad


def test_early_stopping_reports_steps_and_residuals():
    torch.manual_seed(0)
    f = Block(6)
    with torch.no_grad():
        f.mix.weight.mul_(0.3)  # contractive: converges in a few steps
    x = torch.randn(5, 6)
    deq = rk.ReversibleDEQ(f, beta=0.9, max_steps=50, tol=1e-4, backend="torch")
    z = deq(x)
    stats = deq.last_stats
    assert 1 <= stats.steps < 50, f"expected early stop, ran {stats.steps} steps"
    assert stats.residual.shape == (5,) and float(stats.residual.max()) <= 1e-4
    assert len(stats.residual_history) == stats.steps
    assert stats.residual_history[-1] <= 1e-4 < stats.residual_history[-2]
    direct = (z - f(z, x)).norm(dim=1) / (1e-5 + f(z, x).norm(dim=1))
    assert torch.allclose(stats.residual, direct, rtol=1e-4, atol=1e-7), "reported residual is not ||z - f(z)||/||f(z)||"
    absolute = (z - f(z, x)).norm(dim=1)
    assert torch.allclose(stats.abs_residual.float(), absolute, rtol=1e-4, atol=1e-7), (
        f"abs_residual {stats.abs_residual} is not ||z - f(z)|| {absolute}")
    assert stats.max_abs_residual == pytest.approx(float(absolute.detach().max()), rel=1e-4)
    exact = rk.ReversibleDEQ(f, beta=0.9, max_steps=50, tol=0, backend="torch")
    exact(x)
    assert exact.last_stats.steps == 50, "tol=0 must run exactly max_steps steps"


def test_early_stop_gradients_match_unrolled():
    """The stop test runs fused with a speculative y-update that is undone on a stop."""
    for tol, checkpoint_every in ((1e-3, None), (1e-6, 4)):
        got, sol = run("reversible", 0.6, 40, tol=tol, checkpoint_every=checkpoint_every)
        want, ref = run("unrolled", 0.6, 40, tol=tol)
        assert sol.steps == ref.steps < 40, f"tol={tol}: {sol.steps} vs {ref.steps} steps"
        err = relative_error(got, want)
        assert err <= 1e-9, f"tol={tol}: early-stopped gradients differ from unrolled by {err:.3g}"


def test_dropout_masks_are_replayed():
    got, _ = run("reversible", 0.5, 8, dropout=0.3)
    want, _ = run("unrolled", 0.5, 8, dropout=0.3)
    without_dropout, _ = run("unrolled", 0.5, 8, dropout=0.0)
    err = relative_error(got, want)
    assert err <= 1e-9, f"dropout: reversible vs unrolled gradient error {err:.3g}"
    assert relative_error(want, without_dropout) > 1e-3, "dropout had no effect: the test proves nothing"


def test_without_rng_replay_dropout_gradients_are_wrong():
    torch.manual_seed(0)
    f = Block(6, dropout=0.3).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    sol = rk.solve(f, x, beta=0.5, max_steps=6, tol=0, backend="torch", rng="global", reversal="float")
    with pytest.warns(RuntimeWarning, match="the gradients are inexact. rng=.global., so any random op"):
        sol.z.sum().backward()
    assert sol.reconstruction_error > 1e-3, "unreplayed dropout should break the reconstruction"


def test_batchnorm_running_stats_take_one_update_per_solve():
    """f's buffers are held for the whole solve: the forward's 2N+1 = 11 evaluations all start
    from the same running statistics, the last one's update is kept, and the backward's
    recomputations move nothing."""
    torch.manual_seed(0)
    block = Block(6, batchnorm=True).double()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    deq = rk.ReversibleDEQ(block, beta=0.5, max_steps=5, tol=0, backend="torch")
    z = deq(x)
    after_forward = (block.norm.running_mean.clone(), block.norm.num_batches_tracked.clone())
    with torch.no_grad():  # the last evaluation is f(z_N): BatchNorm saw mix(z_N) + inject(x)
        expected = block.norm.momentum * (block.mix(z) + block.inject(x)).mean(0)
    assert int(after_forward[1]) == 1, f"num_batches_tracked {int(after_forward[1])} after one solve, not 1"
    error = (after_forward[0] - expected).abs().max().item()
    assert error <= 1e-14, f"running_mean is not the last evaluation's single update: off by {error:.3g}"
    z.sum().backward()
    assert torch.equal(block.norm.running_mean, after_forward[0]), "backward recomputation moved running_mean"
    assert torch.equal(block.norm.num_batches_tracked, after_forward[1])


class SpectralNormBlock(torch.nn.Module):
    """tanh(SN(W) z + U x): spectral_norm runs a power iteration, updating its buffers, on every
    call in training mode, so unheld it is a different function at every evaluation."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.mix = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(width, width))
        self.inject = torch.nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + self.inject(x))


@pytest.mark.parametrize("reversal", ["exact", "float"])
def test_spectral_norm_block_is_one_function_per_solve(reversal):
    """The gradient equals plain autograd through the iteration of one fixed f: the module after
    one power iteration (what a single call in training mode computes, and what eval mode then
    applies), and the solve leaves the module with exactly that one iteration done."""
    torch.manual_seed(0)
    f = SpectralNormBlock().double()
    with torch.no_grad():  # new weights: the power iteration is far from converged, each call moves u
        f.mix.parametrizations.weight.original.normal_()
    frozen = copy.deepcopy(f)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    frozen(x, x)  # one power iteration, then eval mode: the buffers stay put
    frozen.eval()
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal=reversal, backend="torch")
    z = deq(x)
    loss = z.square().sum() + z.sin().sum()
    got = torch.autograd.grad(loss, [x, *f.parameters()])

    xr = x.detach().requires_grad_()
    y = zr = torch.zeros_like(xr)
    f_z = frozen(zr, xr)
    for _ in range(8):
        y = 0.5 * y + 0.5 * f_z
        zr = 0.5 * zr + 0.5 * frozen(y, xr)
        f_z = frozen(zr, xr)
    want = torch.autograd.grad(zr.square().sum() + zr.sin().sum(), [xr, *frozen.parameters()])
    error = relative_error(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want]))
    assert error <= 1e-12, f"{reversal}: gradient vs one fixed f, relative error {error:.3g} > 1e-12"
    if reversal == "exact":
        assert deq.last_stats.reconstruction_error == 0.0
    for name, held in f.named_buffers():
        assert torch.equal(held, dict(frozen.named_buffers())[name]), f"{name}: not one power iteration"


def test_state_dtype_float64_with_float32_f():
    got, sol = run("reversible", 0.8, 10, dtype=torch.float32, state_dtype=torch.float64)
    want, _ = run("unrolled", 0.8, 10, dtype=torch.float32, state_dtype=torch.float64)
    assert sol.z.dtype == torch.float64
    err = relative_error(got, want)
    assert err <= 1e-5, f"float64 states / float32 f: gradient error {err:.3g}"


def test_autocast_bfloat16_matches_unrolled():
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        torch.manual_seed(0)
        f = Block(16)
        x = torch.randn(4, 16, requires_grad=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sol = rk.solve(f, x, beta=0.5, max_steps=4, tol=0, adjoint=adjoint, backend="torch")
        assert sol.z.dtype == torch.float32
        sol.z.square().sum().backward()
        grads[adjoint] = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])
    err = relative_error(grads["reversible"], grads["unrolled"])
    assert err <= 2e-2, f"bf16 autocast: gradient error {err:.3g} (bf16 has 8 significant bits)"


class ContextBlock(Block):
    def forward(self, z, x, context=None):
        return super().forward(z, x if context is None else x + context)


IN_PLACE_MODULES = {
    "exact": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=6, tol=0),
    "float": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=6, tol=0, reversal="float"),
    "checkpointed": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=6, tol=0, checkpoint_every=2),
    "implicit": lambda f: rk.DEQ(f, solver="fixed_point", adjoint="implicit", max_steps=6, tol=0),
    "phantom": lambda f: rk.DEQ(f, solver="fixed_point", adjoint="phantom", max_steps=6, tol=0),
}


@pytest.mark.parametrize("name", list(IN_PLACE_MODULES))
@pytest.mark.parametrize("modified", ["parameter", "context"])
def test_parameters_modified_before_backward_are_refused(name, modified):
    """An optimizer step between the forward pass and backward(): the backward recomputes f,
    and before it differentiated the stepped f (a 1% weight change: the float reversal rebuilt
    its start 0.75 off and only warned of drift; exact blamed nondeterministic kernels). Autograd refuses the
    same for unrolled, and so do these adjoints, naming the tensor."""
    torch.manual_seed(0)
    f = ContextBlock(6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = IN_PLACE_MODULES[name](f)
    z = deq(x, context=context) if modified == "context" else deq(x)
    with torch.no_grad():
        (context if modified == "context" else f.mix.weight).mul_(1.01)
    named = r"a tensor \(3, 6\)" if modified == "context" else r"mix\.weight \(6, 6\)"
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: 1 of f's .*" + named):
        z.sum().backward()


def test_plain_function_with_parameters():
    torch.manual_seed(0)
    w = (0.3 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ w + x)

    grads = {}
    for adjoint in ("reversible", "unrolled"):
        w.grad = x.grad = None
        rk.solve(f, x, beta=0.7, max_steps=6, tol=0, adjoint=adjoint, parameters=[w],
                 backend="torch").z.sum().backward()
        grads[adjoint] = torch.cat([w.grad.flatten(), x.grad.flatten()])
    assert relative_error(grads["reversible"], grads["unrolled"]) <= 1e-9


def test_a_partials_module_has_its_buffers_held():
    """spectral_norm inside functools.partial: one function per solve, as for the module itself."""
    torch.manual_seed(0)
    f = SpectralNormBlock().double()
    with torch.no_grad():
        f.mix.parametrizations.weight.original.normal_()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    once = copy.deepcopy(f)
    once(x, x)
    sol = rk.solve(functools.partial(f), x, beta=0.5, max_steps=8, tol=0, reversal="float", backend="torch")
    sol.z.sum().backward()
    assert sol.stats.reconstruction_error <= 1e-12, \
        f"float reversal drifted {sol.stats.reconstruction_error:.3g}: the buffers moved between evaluations"
    for name, held in f.named_buffers():
        assert torch.equal(held, dict(once.named_buffers())[name]), f"{name}: not one power iteration"


BACKEND_PAIRS = backend_device_pairs()


@pytest.mark.parametrize("pair", BACKEND_PAIRS, ids=[pair_id(p) for p in BACKEND_PAIRS])
def test_every_backend_gives_the_torch_gradients(pair):
    backend, device = pair
    results = {}
    for name in (backend, "torch"):
        torch.manual_seed(0)
        f = Block(8).double().to(device)
        x = torch.randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
        torch.manual_seed(1)
        sol = rk.solve(f, x, beta=0.8, max_steps=6, tol=1e-8, backend=name)
        assert sol.stats.backend == name
        sol.z.square().sum().backward()
        results[name] = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])
    err = relative_error(results[backend], results["torch"])
    assert err <= 1e-10, f"backend {backend} on {device}: gradients differ from torch by {err:.3g}"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, -0.5, 2.5, float("nan")])
def test_bad_beta_is_rejected_at_construction(beta):
    with pytest.raises(ValueError, match="beta must be in \\(0, 2\\) and != 1"):
        rk.ReversibleDEQ(Block(), beta=beta)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_steps": 0}, "max_steps must be an int >= 1"),
    ({"tol": -1.0}, "tol must be >= 0"),
    ({"state_dtype": torch.int32}, "state_dtype must be one of"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1"),
    ({"adjoint": "implicit"}, "adjoint must be one of"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rk.ReversibleDEQ(Block(), **kwargs)


def test_wrong_output_shape_names_both_shapes():
    deq = rk.ReversibleDEQ(lambda z, x: z[:, :3], beta=0.5, backend="torch")
    with pytest.raises(ValueError, match=r"f returned shape \(4, 3\) but the state z has shape \(4, 6\)"):
        deq(torch.randn(4, 6))


def test_wrong_output_dtype():
    deq = rk.ReversibleDEQ(lambda z, x: z.long(), beta=0.5, backend="torch")
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        deq(torch.randn(4, 6))
    deq = rk.ReversibleDEQ(lambda z, x: (z, x), beta=0.5, backend="torch")
    with pytest.raises(TypeError, match="f must return a Tensor, got tuple"):
        deq(torch.randn(4, 6))


def test_z0_mismatch_names_shapes_and_devices():
    deq = rk.ReversibleDEQ(Block(), beta=0.5, backend="torch")
    with pytest.raises(ValueError, match=r"z0 has shape \(3, 6\) but x has shape \(4, 6\)"):
        deq(torch.randn(4, 6), z0=torch.randn(3, 6))
    with pytest.raises(ValueError, match="z0 is on meta but x is on cpu"):
        deq(torch.randn(4, 6), z0=torch.empty(4, 6, device="meta"))


def test_z0_feature_shape_mismatch_is_named_like_a_batch_mismatch():
    deq = rk.ReversibleDEQ(Block(), beta=0.5, backend="torch")  # Block: Linear(6, 6) on z
    with pytest.raises(ValueError, match=r"z0 has shape \(4, 7\) but x has shape \(4, 6\), and f failed on it "
                                         r"\(RuntimeError: .*\); z0 must have the shape f\(z, x\) returns"):
        deq(torch.randn(4, 6), z0=torch.randn(4, 7))


class OneArgument(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, z):
        return torch.tanh(self.lin(z))


class RaisesInside(torch.nn.Module):
    def forward(self, z, x):
        return torch.tanh(z, x, x)  # a TypeError from f's body, not from its signature


@pytest.mark.parametrize("adjoint", ["reversible", "unrolled"])
@pytest.mark.parametrize("make_f", [lambda: (lambda z: torch.tanh(z)), OneArgument,
                                    lambda: functools.partial(OneArgument())], ids=["lambda", "module", "partial"])
def test_a_one_argument_f_is_named_with_the_wrapper_that_fixes_it(make_f, adjoint):
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(TypeError, match=r"f is called as f\(z, x\), but its signature does not take two arguments "
                                        r"\(.*\); a one-argument f\(z\) that closes over x, as in torchdeq, "
                                        r"becomes lambda z, x: f\(z\)"):
        rk.solve(make_f(), x, beta=0.5, max_steps=2, adjoint=adjoint)
    with pytest.raises(TypeError, match="tanh") as raised:
        rk.solve(RaisesInside(), x, beta=0.5, max_steps=2, adjoint=adjoint)
    assert "f is called as" not in str(raised.value), "a TypeError inside f must reach the user as it is"


def test_beta_near_1_warns_with_the_amplification_of_the_float_reversal():
    with pytest.warns(RuntimeWarning, match=r"beta=1.0000001 is 1e-07 from 1: .* multiplying rounding errors by "
                                            r"1e\+07 \(up to 1e\+56 over max_steps=8\)"):
        rk.SolveSettings(beta=1.0000001, reversal="float")
    with pytest.raises(ValueError, match="beta"):  # the exact reversal cannot represent it at all
        rk.SolveSettings(beta=1.0000001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.SolveSettings(beta=0.98, reversal="float")  # 50x per step: far enough from 1 to stay quiet
        rk.SolveSettings(beta=1.0000001, reversal="float", adjoint="unrolled")  # no inverse is taken


class _Wrapped(torch.nn.Module):
    def __init__(self, deq):
        super().__init__()
        self.inject, self.deq = torch.nn.Linear(6, 6), deq

    def forward(self, x):
        return self.deq(self.inject(x)).square().sum()


@pytest.mark.parametrize("deq", [dict(), dict(reversal="float"), dict(solver="anderson")],
                         ids=["exact", "float", "anderson_implicit"])
def test_torch_compile_runs_the_solve_eagerly_with_the_same_gradients(deq):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    if deq.get("solver") == "anderson":
        layer = rk.DEQ(Block(contraction=0.5), solver="anderson", max_steps=6, tol=0, backend="torch")
    else:
        layer = rk.ReversibleDEQ(Block(contraction=0.5), beta=0.5, max_steps=4, tol=0, backend="torch", **deq)
    model, x = _Wrapped(layer), torch.randn(3, 6, requires_grad=True)
    eager = torch.autograd.grad(model(x), [x, *model.parameters()])
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 1, [r.reason for r in explained.break_reasons]
    # torch.compiler.disable takes the reason from torch 2.8; before, each version words the
    # break its own way (checked on 2.4 and 2.7: one break, the same gradients)
    takes_reason = "reason" in inspect.signature(torch.compiler.disable).parameters
    reason = "runs each solve eagerly: its backward recomputes f eagerly" if takes_reason else ""
    assert reason in str(explained.break_reasons[0]), explained.break_reasons[0]
    dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(model)(x), [x, *model.parameters()])
    for e, c in zip(eager, compiled):  # the solve ran eagerly: only the layers around it were compiled
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6), f"compiled gradient differs by {(e - c).abs().max():.2e}"
    dynamo.reset()
    with pytest.raises(Exception, match=reason):
        torch.compile(model, fullgraph=True)(x)
    dynamo.reset()


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.compiler.is_exporting: torch >= 2.5")
@pytest.mark.parametrize("layer", ["ReversibleDEQ", "DEQ"])
def test_torch_export_is_refused_in_one_line(layer):
    """torch.export's default (non-strict) tracing failed deep inside the solve on a data-dependent
    value ("GuardOnDataDependentSymNode", a page of trace)."""
    deq = rk.ReversibleDEQ(Block(), beta=0.5, max_steps=4, tol=0) if layer == "ReversibleDEQ" else \
        rk.DEQ(Block(), solver="anderson", max_steps=4, tol=0)
    with pytest.raises(RuntimeError, match="torch.export cannot trace a DEQ solve.*run the solve eagerly") as raised:
        torch.export.export(_Wrapped(deq).eval(), (torch.randn(3, 6),), strict=False)
    assert len(str(raised.value).splitlines()) == 1


def test_bad_parameters_name_the_problem():
    w = torch.randn(6, 6, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ w + x)

    with pytest.raises(TypeError, match=r"parameters must be a list of tensors, got one Tensor of shape \(6, 6\)"):
        rk.solve(f, torch.randn(4, 6), parameters=w)
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str, not a Tensor"):
        rk.solve(f, torch.randn(4, 6), parameters=[w, "w"])
    solution = rk.solve(f, torch.randn(4, 6), parameters=(t for t in [w]), max_steps=2)  # any iterable
    solution.z.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


class AttributeContextBlock(torch.nn.Module):
    """Keeps a tensor computed upstream as a plain attribute: not a parameter, so only a
    declaration gives it a gradient."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.memory = None

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + x * self.memory)


@pytest.mark.parametrize("adjoint", ["reversible", "unrolled"])
def test_module_f_takes_declared_parameters(adjoint):
    """rk.solve(module, x, parameters=[t]) adds t to the module's own parameters (listed again,
    they count once): the gradients equal plain autograd through the same iteration."""
    torch.manual_seed(0)
    block = AttributeContextBlock()
    x = torch.randn(4, 6, dtype=torch.float64)
    memory_value = torch.randn(4, 6, dtype=torch.float64)
    grads = {}
    for route in ("declared", "unrolled"):
        memory = memory_value.clone().requires_grad_()
        block.memory = memory * 0.5  # computed upstream: not a leaf
        block.zero_grad()
        declared = [block.memory, block.mix.weight] if route == "declared" else None
        solution = rk.solve(block, x, beta=0.5, max_steps=6, tol=0.0, parameters=declared,
                            adjoint=adjoint if route == "declared" else "unrolled")
        (solution.z ** 2).sum().backward()
        grads[route] = (memory.grad, block.mix.weight.grad.clone())
    for name, got, want in zip(("memory", "mix.weight"), grads["declared"], grads["unrolled"]):
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-12, f"{adjoint}: the gradient of {name} is {error:.2e} off plain autograd"


class InPlaceBlock(torch.nn.Module):
    """ReLU(inplace=True) on an argument: writes into the tensor the solver passed in."""

    def __init__(self, on: str):
        super().__init__()
        self.on, self.act, self.lin = on, torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 6)

    def forward(self, z, x):
        if self.on == "z":
            return torch.tanh(self.lin(self.act(z)) + x)
        return torch.tanh(self.lin(z) + self.act(x))


IN_PLACE_SOLVES = {
    "exact": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=4),
    "float": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=4, reversal="float"),
    "unrolled": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=4, adjoint="unrolled"),
    "anderson": lambda f: rk.DEQ(f, solver="anderson", max_steps=4),
    "anderson-unrolled": lambda f: rk.DEQ(f, solver="anderson", adjoint="unrolled", max_steps=4),
}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", list(IN_PLACE_SOLVES))
@pytest.mark.parametrize("on", ["z", "x"])
def test_f_writing_into_its_inputs_is_refused(on, name, grad):
    """Before: the unrolled iteration returned another z than the same f computing out of place
    (norm 2.15 against 2.72), silently; the reversible backward failed inside autograd with "a leaf
    Variable that requires grad is being used in an in-place operation"."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, requires_grad=grad) * 1  # from an upstream layer (torch itself refuses a leaf)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=f"f modified its input {on} in place"):
        IN_PLACE_SOLVES[name](InPlaceBlock(on))(x)


def test_inference_mode_solves():
    """Inference tensors have no version counter: the input check must not read one."""
    torch.manual_seed(0)
    f, x = Block(), torch.randn(3, 6)
    expected = rk.ReversibleDEQ(f, beta=0.5, max_steps=4)(x).detach()
    with torch.inference_mode():
        for deq in (rk.ReversibleDEQ(f, beta=0.5, max_steps=4), rk.DEQ(f, max_steps=4)):
            z = deq(x)
            assert z.shape == x.shape
        assert torch.equal(rk.ReversibleDEQ(f, beta=0.5, max_steps=4)(x), expected)


def test_bad_x():
    deq = rk.ReversibleDEQ(Block(), beta=0.5, backend="torch")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        deq(torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        deq(torch.tensor(1.0))
    for layer in (deq, rk.DEQ(Block(), solver="anderson")):  # shape inference on meta tensors
        with pytest.raises(ValueError, match="x is on the meta device"):
            layer(torch.ones(4, 6, device="meta"))


def test_nonfinite_state_raises_naming_the_step():
    def explode(z, x):
        return z * 1e200 + x  # float32 overflow after the first steps

    for tol in (0.0, 1e-3):
        deq = rk.ReversibleDEQ(explode, beta=0.5, max_steps=10, tol=tol, backend="torch")
        with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or Inf\) at step \d+ of 10"):
            deq(torch.ones(2, 3))


def test_nonfinite_state_can_warn():
    deq = rk.ReversibleDEQ(lambda z, x: z * 1e200 + x, beta=0.5, max_steps=4, tol=1e-3,
                           on_nonfinite="warn", backend="torch")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        deq(torch.ones(2, 3))


def test_solve_returns_stats_fields():
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    sol = rk.solve(Block(), x, beta=0.5, max_steps=3, tol=0, backend="torch")
    assert sol.z.shape == x.shape and sol.steps == 3 and sol.nfe_forward == 7
    assert sol.residual.shape == (2,) and sol.backend == "torch" and sol.reconstruction_error is None
    with pytest.raises(AttributeError):
        sol.not_a_field


def test_bfloat16_states_run_and_stay_close():
    """bf16 states keep 8 significant bits: the reconstruction drifts after a few steps,
    but short solves still give gradients close to autograd through the same iteration."""
    got, sol = run("reversible", 0.5, 2, dtype=torch.float32, state_dtype=torch.bfloat16)
    want, _ = run("unrolled", 0.5, 2, dtype=torch.float32, state_dtype=torch.bfloat16)
    assert sol.z.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err = relative_error(got, want)
    assert err <= 1e-2, f"bf16 states, 2 steps: gradient error {err:.3g} (measured ~1e-3)"


# ----------------------------------------------------------------------------- settings


def test_settings_are_validated_once_and_frozen():
    deq = rk.ReversibleDEQ(Block(), beta=0.5, max_steps=3, tol=None)
    assert deq.settings == rk.SolveSettings(beta=0.5, max_steps=3, tol=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        deq.settings.beta = 1.0
    with pytest.raises(ValueError, match="beta must be in \\(0, 2\\) and != 1"):
        dataclasses.replace(deq.settings, beta=1.0)  # replacing validates again


def test_solve_takes_settings_and_keyword_overrides():
    torch.manual_seed(0)
    f, x = Block(6).double(), torch.randn(4, 6, dtype=torch.float64)
    settings = rk.SolveSettings(beta=0.5, max_steps=3, tol=0, backend="torch")
    by_object = rk.solve(f, x, settings=settings)
    by_keywords = rk.solve(f, x, beta=0.5, max_steps=3, tol=0, backend="torch")
    assert torch.equal(by_object.z, by_keywords.z) and by_object.steps == 3
    assert rk.solve(f, x, settings=settings, max_steps=5).steps == 5
    with pytest.raises(TypeError, match="solve\\(\\) got unknown settings \\['max_iters'\\]"):
        rk.solve(f, x, settings=settings, max_iters=5)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        rk.solve(f, x, settings=settings, max_steps=0)
