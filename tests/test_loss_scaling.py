"""Non-finite gradients that the DEQ did not make: float16 loss scaling and the like.

torch.amp.GradScaler multiplies a float16 model's loss by up to 2**16 and expects some
backward passes to overflow: it finds the Inf/NaN in the gradients, skips that optimizer step
and lowers its scale. Every adjoint here must therefore hand such an overflow on as autograd
does, with one warning, instead of raising. Outside float16 the same overflow is a bug and
raises (on_nonfinite="raise"), naming where it arose: the gradient arriving from the loss, or
f's vector-Jacobian product at a reverse step. A non-finite *state* rebuilt by the float
reversal is the DEQ's own failure and still raises in float16 (test_exact_reversal.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import revdeq_kernels as rk
from tests.helpers import devices

WIDTH = 32
OVERFLOW_WARNING = "overflowed float16"


class Block(nn.Module):
    def __init__(self, amplify_vjp: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.amplify_vjp = amplify_vjp

    def forward(self, z, x):
        return torch.tanh(self.linear(AmplifyVjp.apply(z, self.amplify_vjp))) + x


class AmplifyVjp(torch.autograd.Function):
    """The identity, whose vector-Jacobian product is multiplied by ``factor``: a forward
    pass that stays finite with a backward that overflows, in every dtype."""

    @staticmethod
    def forward(ctx, z, factor):
        ctx.factor = factor
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


ADJOINTS = {
    "exact": lambda f, **kw: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="exact", **kw),
    "float": lambda f, **kw: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="float", **kw),
    "implicit": lambda f, **kw: rk.DEQ(f, solver="fixed_point", beta=0.5, max_steps=8, tol=0,
                                       adjoint="implicit", **kw),
    "unrolled": lambda f, **kw: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, adjoint="unrolled", **kw),
}


def scaled_training_step(adjoint: str, init_scale: float, device: str = "cpu"):
    """One float16-autocast step of a DEQ classifier under GradScaler: (whether the optimizer
    moved the parameters, the scale after the update, the warnings, the block's gradients)."""
    torch.manual_seed(0)
    block, head = Block().to(device), nn.Linear(WIDTH, 10).to(device)
    deq = ADJOINTS[adjoint](block)
    params = [*block.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    x, target = torch.randn(8, WIDTH, device=device), torch.randint(0, 10, (8,), device=device)
    with torch.autocast(device, dtype=torch.float16):
        loss = nn.functional.cross_entropy(head(deq(x)).float(), target)
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    moved = any(not torch.equal(old, p) for old, p in zip(before, params))
    return moved, scaler.get_scale(), [str(w.message) for w in caught], [p.grad for p in block.parameters()]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_grad_scaler_skips_an_overflowing_step_as_with_autograd(adjoint, device):
    moved, scale, messages, grads = scaled_training_step(adjoint, 2.0 ** 40, device)
    assert not moved and scale == 2.0 ** 39, (
        f"{adjoint}: an overflowing float16 step must be skipped and the scale halved; moved={moved}, "
        f"scale={scale:g}, warnings={messages}")
    assert not all(torch.isfinite(g).all() for g in grads), f"{adjoint}: the overflow must reach the gradients"
    if adjoint != "unrolled":  # plain autograd warns of nothing; the DEQ's adjoints say it once
        assert sum(OVERFLOW_WARNING in m for m in messages) == 1, messages


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_grad_scaler_steps_when_the_scale_fits(adjoint, device):
    moved, scale, messages, grads = scaled_training_step(adjoint, 2.0 ** 8, device)
    assert moved and scale == 2.0 ** 8, f"{adjoint}: moved={moved}, scale={scale:g}, warnings={messages}"
    assert all(torch.isfinite(g).all() for g in grads)
    assert not any(OVERFLOW_WARNING in m for m in messages), messages


@pytest.mark.parametrize("adjoint", ["exact", "float", "implicit"])
def test_gradient_arriving_nonfinite_in_float32_raises_naming_the_loss(adjoint):
    deq = ADJOINTS[adjoint](Block())
    z = deq(torch.randn(4, WIDTH))
    with pytest.raises(FloatingPointError, match="dL/dz reached the DEQ's output non-finite"):
        z.backward(torch.full_like(z, float("inf")))


@pytest.mark.parametrize("adjoint, where", [
    ("exact", r"f's vector-Jacobian product overflowed at reverse step 7 of 8"),
    ("float", r"f's vector-Jacobian product overflowed at reverse step 7 of 8"),
    ("implicit", r"the implicit adjoint's solve of u = .* went non-finite"),
])
def test_vjp_overflow_in_float32_raises_naming_where_and_can_warn(adjoint, where):
    x = torch.randn(4, WIDTH)
    z = ADJOINTS[adjoint](Block(amplify_vjp=1e38))(x)
    assert torch.isfinite(z).all()
    with pytest.raises(FloatingPointError, match=where):
        z.sum().backward()
    block = Block(amplify_vjp=1e38)
    z = ADJOINTS[adjoint](block, on_nonfinite="warn")(x)
    with pytest.warns(RuntimeWarning, match=where):
        z.sum().backward()
    assert not torch.isfinite(block.linear.weight.grad).all(), "the gradients must keep the overflow"


@pytest.mark.parametrize("adjoint", ["exact", "float", "implicit"])
def test_vjp_overflow_in_float16_warns_even_with_on_nonfinite_raise(adjoint):
    block = Block(amplify_vjp=1e6)  # one vjp passes float16's 65504; eight compound past float32's range
    deq = ADJOINTS[adjoint](block)
    with torch.autocast("cpu", dtype=torch.float16):
        z = deq(torch.randn(4, WIDTH))
    with pytest.warns(RuntimeWarning, match=OVERFLOW_WARNING):
        z.float().sum().backward()
    assert not torch.isfinite(block.linear.weight.grad).all()
    with pytest.raises(FloatingPointError, match="vector-Jacobian product overflowed|went non-finite"):
        ADJOINTS[adjoint](block)(torch.randn(4, WIDTH)).sum().backward()  # float32: the same raises


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_float16_model_iterates_in_float32_and_returns_float16(adjoint):
    # a .half() model: the layer after the DEQ takes only float16, so z must come back in it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), ADJOINTS[adjoint](Block()), nn.Linear(WIDTH, 10)).half()
    x = torch.randn(4, WIDTH, dtype=torch.float16)
    out = model(x)
    assert out.dtype == torch.float16, f"{adjoint}: a float16 model must give float16 logits, got {out.dtype}"
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads), f"{adjoint}: gradients"
    injected = model[0](x).detach()
    z = model[1](injected)
    wide = ADJOINTS[adjoint](model[1].f, state_dtype=torch.float32)(injected)
    assert wide.dtype == torch.float32 and torch.equal(z, wide.half()), (
        f"{adjoint}: z must be the float32 states' solve rounded once to float16; "
        f"max |diff| {(z.float() - wide.half().float()).abs().max().item():.3g}")
    with pytest.raises(TypeError, match="state_dtype must be one of"):
        rk.ReversibleDEQ(Block(), state_dtype=torch.float16)


def scaled_training_run(adjoint: str, steps: int = 40):
    """``steps`` Adam steps of a float16-autocast DEQ classifier under GradScaler, started at a
    scale of 2**24 that overflows until the scaler has lowered it: (skipped steps, last loss)."""
    torch.manual_seed(0)
    embed, block, head = nn.Linear(20, WIDTH), Block(), nn.Linear(WIDTH, 10)
    deq = ADJOINTS[adjoint](block)
    optimizer = torch.optim.Adam([*embed.parameters(), *block.parameters(), *head.parameters()], lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(512, 20, generator=generator)
    targets = inputs[:, :10].argmax(dim=1)
    skipped = 0
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (32,), generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(head(deq(embed(inputs[batch]))).float(), targets[batch])
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale
    return skipped, loss.item()


def test_grad_scaler_training_follows_autograd():
    want_skipped, want_loss = scaled_training_run("unrolled")
    got_skipped, got_loss = scaled_training_run("exact")
    assert want_skipped >= 3, f"the run must start by overflowing; autograd skipped {want_skipped} steps"
    assert got_skipped == want_skipped, f"skipped {got_skipped} steps, autograd {want_skipped}"
    assert abs(got_loss - want_loss) <= 1e-3 * want_loss, f"last loss {got_loss:.6f}, autograd {want_loss:.6f}"
