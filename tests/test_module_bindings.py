"""The tensors bound to f's module when it is solved, and when the backward recomputes it.

``torch.func.functional_call``: a DEQ run with tensors bound to its module for one call (fast
weights in meta-learning, an ensemble member, an EMA copy) must differentiate those tensors.
functional_call puts the module's own tensors back when it returns, before the loss's
backward; the backward's recomputations of f must still use the tensors the forward solved
with. Without that, the passed tensors got None gradients and the states were rebuilt with the
other weights.

``torch.nn.utils.parametrize``: a parametrized weight (orthogonal, spectral_norm, weight_norm)
is recomputed at every call of f, or once under ``parametrize.cached()``.

A weight derived once per forward pass and kept as a plain attribute (torchdeq's
``reset_norm``, MDEQ's weight-norm ``reset()``): every reverse step differentiates through it,
and the first VJP used to free its graph, so that the second raised.

Hooks that tools put on f's module: FlopCounterMode's module tracker registers gradient hooks
on each call's inputs, which failed on the backward's leaf inputs under torch.autograd.grad.
A parameter's own tensor hook (``p.register_hook``: a gradient mask or scale, wandb.watch) runs
once on its whole gradient, as with autograd; it ran at each of the backward's VJPs and again on
their sum."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize
from torch.utils.flop_counter import FlopCounterMode
from torch import nn
from torch.nn.utils import parametrizations

import revdeq_kernels as rk
from tests.helpers import RecurrentBlock, devices, relative_error

F64 = torch.float64
WIDTH = 6

LAYERS = {
    "exact": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="exact"),
    "float": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="float"),
    "unrolled": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, adjoint="unrolled"),
    "implicit": lambda f: rk.DEQ(f, solver="anderson", max_steps=30, tol=1e-12, adjoint="implicit",
                                 backward_tol=1e-12, backward_max_steps=60),
    "phantom": lambda f: rk.DEQ(f, solver="fixed_point", beta=0.5, max_steps=8, tol=0, adjoint="phantom"),
}


class ScaledBlock(nn.Module):
    """A residual block whose output is scaled by a buffer, so that a swapped buffer shows."""

    def __init__(self):
        super().__init__()
        self.mix, self.inject = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.register_buffer("gain", torch.tensor(0.4))

    def forward(self, z, x):
        return z + self.gain * torch.tanh(self.mix(z) + self.inject(x)) - 0.5 * z


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_functional_call_differentiates_the_tensors_it_binds(layer, device):
    torch.manual_seed(0)
    deq = LAYERS[layer](ScaledBlock()).to(device, F64)
    x = torch.randn(3, WIDTH, dtype=F64, device=device)
    fast = {name: (p + 0.2 * torch.randn_like(p)).detach().requires_grad_()
            for name, p in deq.named_parameters()}
    bound = {**fast, "f.gain": torch.tensor(0.3, dtype=F64, device=device)}
    torch.func.functional_call(deq, bound, (x,)).square().sum().backward()

    # the reference: a copy that holds the bound tensors as its own
    twin = copy.deepcopy(deq)
    with torch.no_grad():
        for name, t in bound.items():
            twin.get_parameter(name).copy_(t) if name in fast else twin.get_buffer(name).copy_(t)
    twin(x).square().sum().backward()

    assert all(p.grad is None for p in deq.parameters()), f"{layer}: the module's own parameters got gradients"
    for name, t in fast.items():
        assert t.grad is not None, f"{layer}: the tensor bound as {name} got no gradient"
        error = relative_error(t.grad, twin.get_parameter(name).grad)
        assert error < 1e-10, f"{layer}: the gradient of {name} is {error:.3g} off the copy holding it"


def test_the_module_keeps_its_own_tensors_after_the_backward():
    deq = LAYERS["exact"](ScaledBlock())
    own = {name: t for name, t in [*deq.named_parameters(), *deq.named_buffers()]}
    bound = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in own.items()}
    torch.func.functional_call(deq, bound, (torch.randn(2, WIDTH),)).sum().backward()
    now = dict([*deq.named_parameters(), *deq.named_buffers()])
    swapped = [name for name in own if now[name] is not own[name]]
    assert not swapped, f"the backward left {swapped} bound to functional_call's tensors"


class ParametrizedBlock(nn.Module):
    def __init__(self, parametrize):
        super().__init__()
        self.mix, self.inject = parametrize(nn.Linear(WIDTH, WIDTH)), nn.Linear(WIDTH, WIDTH)

    def forward(self, z, x):
        return z + 0.5 * torch.tanh(self.mix(z) + self.inject(x)) - 0.5 * z


PARAMETRIZATIONS = {"orthogonal": parametrizations.orthogonal, "spectral_norm": parametrizations.spectral_norm,
                    "weight_norm": parametrizations.weight_norm}


def parametrized_gradients(parametrization: str, layer: str, cached: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    deq = LAYERS[layer](ParametrizedBlock(PARAMETRIZATIONS[parametrization])).to(F64)
    x = torch.randn(3, WIDTH, dtype=F64)
    if cached:  # parametrize.cached()'s documented pattern: the forward pass inside, the backward after
        with torch.nn.utils.parametrize.cached():
            z = deq(x)
    else:
        z = deq(x)
    z.square().sum().backward()
    return [p.grad for p in deq.parameters()]


@pytest.mark.parametrize("cached", [False, True], ids=["every call", "cached"])
@pytest.mark.parametrize("parametrization", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("layer", ["exact", "float"])
def test_parametrized_weights_get_the_unrolled_gradients(layer, parametrization, cached):
    expected = parametrized_gradients(parametrization, "unrolled", cached)
    actual = parametrized_gradients(parametrization, layer, cached)
    for i, (a, e) in enumerate(zip(actual, expected)):
        error = relative_error(a, e)
        assert error < 1e-10, f"{layer}, {parametrization}: parameter {i}'s gradient is {error:.3g} off autograd's"


@pytest.mark.parametrize("layer", ["exact", "float", "implicit", "phantom"])
def test_a_backward_inside_parametrize_cached_names_it(layer):
    # the cached weight is derived from the parameters where the DEQ cannot see it: its share of
    # their gradient would be left out (it used to be, silently, or the second reverse step raised)
    deq = LAYERS[layer](ParametrizedBlock(parametrizations.orthogonal))
    with torch.nn.utils.parametrize.cached(), pytest.raises(RuntimeError, match=r"leave that share of their "
                                                                                 r"gradient out.*cached\(\)"):
        deq(torch.randn(2, WIDTH)).sum().backward()


class ResetWeightNorm(nn.Module):
    """torchdeq's weight norm: ``weight = v * g / ||v||`` derived once per training step by
    ``reset()`` (torchdeq.norm.reset_norm), kept as a plain attribute and read by every call.
    ``per_call=True`` derives it at every call instead: the same f, the usual way."""

    def __init__(self, per_call: bool):
        super().__init__()
        self.per_call = per_call
        self.weight_v = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH ** 0.5)
        self.weight_g = nn.Parameter(torch.full((WIDTH, 1), 0.9))
        self.bias = nn.Parameter(torch.zeros(WIDTH))
        self.reset()

    def reset(self):
        self.weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, z):
        if self.per_call:
            self.reset()
        return nn.functional.linear(z, self.weight, self.bias)


def reset_training(layer: str, per_call: bool = False, steps: int = 3, retain: bool = False,
                   device: str = "cpu") -> list[torch.Tensor]:
    """``steps`` SGD steps, each deriving the weight anew before the forward pass, as torchdeq's
    training loop does: the parameters after them."""
    torch.manual_seed(0)
    deq = LAYERS[layer](ParametrizedBlock(lambda linear: ResetWeightNorm(per_call))).to(device, F64)
    optimizer = torch.optim.SGD(deq.parameters(), lr=0.1)
    for _ in range(steps):
        deq.f.mix.reset()
        loss = deq(torch.randn(3, WIDTH, dtype=F64).to(device)).square().sum()
        optimizer.zero_grad()
        if retain:  # a retained graph backpropagated twice: twice the gradient
            loss.backward(retain_graph=True)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in deq.parameters()]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_weight_derived_once_per_step_trains_as_one_derived_per_call(layer, device):
    expected = reset_training(layer, per_call=True, device=device)
    actual = reset_training(layer, device=device)
    for name, a, e in zip(("weight_v", "weight_g", "bias"), actual, expected):
        error = relative_error(a, e)
        assert error < 1e-10, f"{layer}: {name} after 3 steps is {error:.3g} off the same f deriving it per call"


def test_a_derived_weight_survives_a_retained_graph():
    expected = reset_training("exact", per_call=True, steps=1, retain=True)
    actual = reset_training("exact", steps=1, retain=True)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert relative_error(a, e) < 1e-10, f"parameter {i}: {relative_error(a, e):.3g} off"


class LinearBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, z, x):
        return self.linear(z) + x


@pytest.mark.parametrize("z0_grad", [False, True], ids=["z0=None", "z0 requires grad"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_flop_counter_mode_counts_the_training_step(layer, z0_grad):
    torch.manual_seed(0)
    deq, batch = LAYERS[layer](LinearBlock()).to(F64), 5  # float64: no drift, no diagnosis's extra calls
    x = torch.randn(batch, WIDTH, dtype=F64, requires_grad=True)
    z0 = torch.zeros(batch, WIDTH, dtype=F64, requires_grad=True) if z0_grad else None
    with FlopCounterMode(display=False) as counter:
        deq(x, z0).sum().backward()
    per_matmul = 2 * batch * WIDTH * WIDTH
    if layer in ("exact", "float"):
        # 1 + 2N evaluations forward, 2N again backward, 2N VJPs of two matmuls each, less f(z_0)'s
        # VJP in z_0 when z0 needs no gradient
        steps = deq.last_stats.steps
        expected = (1 + 8 * steps - (0 if z0_grad else 1)) * per_matmul
        assert counter.get_total_flops() == expected, (
            f"{layer}: counted {counter.get_total_flops()} FLOPs, expected {expected}")
    else:
        assert counter.get_total_flops() > 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_parameter_hook_runs_once_on_the_whole_gradient(layer, device):
    def gradient(hooked: bool):
        torch.manual_seed(0)
        deq, calls = LAYERS[layer](LinearBlock()).to(device, F64), []
        if hooked:
            deq.f.linear.weight.register_hook(lambda g: calls.append(1) or 2 * g)
        deq(torch.randn(3, WIDTH, dtype=F64).to(device)).sum().backward()
        return deq.f.linear.weight.grad, len(calls)

    (plain, _), (hooked, calls) = gradient(False), gradient(True)
    assert calls == 1, f"{layer}: the hook ran {calls} times in one backward"
    error = relative_error(hooked, 2 * plain)
    assert error < 1e-12, f"{layer}: a hook doubling the gradient gave {error:.3g} off twice the gradient"


@pytest.mark.parametrize("layer", ["exact", "float", "implicit"])
def test_a_module_listing_its_own_weights_differentiates_the_aliases(layer):
    def gradient(name):
        torch.manual_seed(0)
        f = RecurrentBlock("GRU", WIDTH).to(F64)  # nn.GRU updates its _flat_weights in __setattr__
        LAYERS[name](f)(torch.randn(2, 5, WIDTH, dtype=F64)).square().sum().backward()
        assert all(flat is getattr(f.rnn, weight) for flat, weight in zip(f.rnn._flat_weights,
                                                                           f.rnn._flat_weights_names)), \
            f"{name}: the GRU's _flat_weights were left on the backward's aliases"
        return torch.cat([p.grad.flatten() for p in f.parameters()])

    reference = gradient("unrolled") if layer != "implicit" else None
    actual = gradient(layer)
    if reference is not None:
        error = relative_error(actual, reference)
        assert error < 1e-10, f"{layer}: the GRU's gradient is {error:.3g} off autograd's"
    else:
        assert actual.norm() > 0, "implicit: the GRU got no gradient"
