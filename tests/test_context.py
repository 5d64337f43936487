"""f's context: a tensor f uses besides z, x and its parameters (a cross-attention memory
computed upstream). Undeclared ones are refused; declared ones, and the keywords of the
modules' ``forward(x, z0, **context)``, get the gradients of plain autograd."""

from __future__ import annotations

import functools

import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import relative_error

F64 = torch.float64


class CrossBlock(torch.nn.Module):
    """f(z, x, context): a conditioning input computed upstream, as cross-attention has."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.mix, self.cond = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, z, x, context):
        return torch.tanh(self.mix(z) + self.cond(context) + x)


class AttributeBlock(CrossBlock):
    """The same block with the context kept as a plain attribute, set before each call."""

    def forward(self, z, x):
        return super().forward(z, x, self.context)


class MemoryBlock(CrossBlock):
    """f(z, x, memories, mask, scale): a list of tensors, a boolean mask and a float."""

    def forward(self, z, x, memories, mask=None, scale=1.0):
        context = sum(memories) if mask is None else sum(memories).masked_fill(mask, 0.0)
        return super().forward(z, x, scale * context)


def cross_setup(block_type=CrossBlock):
    torch.manual_seed(0)
    block, encoder = block_type().double(), torch.nn.Linear(5, 5).double()
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    source = torch.randn(3, 5, dtype=F64)
    return block, encoder, x, source


def gradient_of(loss, tensors) -> torch.Tensor:
    for t in tensors:
        t.grad = None
    loss.backward()
    return torch.cat([t.grad.flatten() for t in tensors])


UNDECLARED = r"depends on \d+ tensor\(s\) that require grad besides z, x and its parameters"


@pytest.mark.parametrize("how", ["ReversibleDEQ(partial)", "solve(partial)", "DEQ(partial)",
                                 "solve(partial, some parameters)"])
def test_undeclared_tensors_that_need_grad_are_refused(how):
    """Before: the block's and the encoder's gradients were silently zero (93% off unrolled)."""
    block, encoder, x, source = cross_setup()
    context = encoder(source)
    f = functools.partial(block, context=context)
    settings = dict(beta=0.5, max_steps=4, tol=0, backend="torch")
    with pytest.raises(ValueError, match=UNDECLARED):
        if how == "ReversibleDEQ(partial)":
            rk.ReversibleDEQ(f, **settings)(x)
        elif how == "solve(partial)":
            rk.solve(f, x, **settings)
        elif how == "DEQ(partial)":
            rk.DEQ(f, solver="fixed_point", max_steps=4, tol=0)(x)
        else:  # the block's parameters, but not the context
            rk.solve(f, x, parameters=list(block.parameters()), **settings)


@pytest.mark.parametrize("declared", ["context", "context and block"])
def test_declared_context_gets_the_unrolled_gradients(declared):
    """A partial's module's parameters are found; the context is declared, alone or with them."""
    block, encoder, x, source = cross_setup()
    tensors = [x, *block.parameters(), *encoder.parameters()]
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        context = encoder(source)
        f = functools.partial(block, context=context)
        parameters = [context] + (list(block.parameters()) if declared == "context and block" else [])
        z = rk.solve(f, x, beta=0.5, max_steps=6, tol=0, adjoint=adjoint, backend="torch",
                     parameters=parameters if adjoint == "reversible" else None).z
        grads[adjoint] = gradient_of(z.square().sum(), tensors)
    error = relative_error(grads["reversible"], grads["unrolled"])
    assert error <= 1e-12, f"declared {declared}: relative gradient error {error:.3g} > 1e-12"


REVERSIBLE_MODULES = {
    "exact": lambda block: rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0),
    "float": lambda block: rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0, reversal="float"),
    "checkpointed": lambda block: rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0, checkpoint_every=2),
    "DEQ(reversible)": lambda block: rk.DEQ(block, solver="reversible", adjoint="reversible", beta=0.5,
                                            max_steps=6, tol=0),
}


@pytest.mark.parametrize("name", list(REVERSIBLE_MODULES))
def test_forward_keywords_reach_f_and_get_the_unrolled_gradients(name):
    """``deq(x, context=c)`` calls f(z, x, context=c) and differentiates c: the encoder that made
    it trains, to the gradients of autograd through the same iteration."""
    block, encoder, x, source = cross_setup()
    tensors = [x, *block.parameters(), *encoder.parameters()]
    unrolled = rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0, adjoint="unrolled")
    expected = gradient_of(unrolled(x, context=encoder(source)).square().sum(), tensors)
    actual = gradient_of(REVERSIBLE_MODULES[name](block)(x, context=encoder(source)).square().sum(), tensors)
    encoder_share = sum(p.grad.norm() for p in encoder.parameters())
    assert encoder_share > 0, "the encoder got no gradient through the context"
    error = relative_error(actual, expected)
    assert error <= 1e-12, f"{name}: relative gradient error {error:.3g} > 1e-12 against unrolled"


@pytest.mark.parametrize("name", list(REVERSIBLE_MODULES))
def test_a_context_kept_as_an_attribute_gets_the_unrolled_gradients(name):
    """A tensor with a graph kept as a plain attribute of f's module is an input of the solve,
    as a keyword is (the rule that serves torchdeq's reset_norm): the encoder that made it
    trains. Before, it was refused as undeclared."""
    block, encoder, x, source = cross_setup(AttributeBlock)
    tensors = [x, *block.parameters(), *encoder.parameters()]
    block.context = encoder(source)
    expected = gradient_of(rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0, adjoint="unrolled")(x)
                           .square().sum(), tensors)
    block.context = encoder(source)
    actual = gradient_of(REVERSIBLE_MODULES[name](block)(x).square().sum(), tensors)
    assert sum(p.grad.norm() for p in encoder.parameters()) > 0, "the encoder got no gradient"
    error = relative_error(actual, expected)
    assert error <= 1e-12, f"{name}: relative gradient error {error:.3g} > 1e-12 against unrolled"


@pytest.mark.parametrize("adjoint", ["implicit", "phantom"])
def test_deq_adjoints_differentiate_the_context(adjoint):
    """At a converged fixed point the implicit and phantom adjoints give the unrolled gradients,
    the context's included (60 steps of a tanh block contracting ~2x each: converged to 1e-16)."""
    block, encoder, x, source = cross_setup()
    tensors = [x, *block.parameters(), *encoder.parameters()]
    solve = dict(solver="fixed_point", max_steps=60, tol=0)
    unrolled = rk.DEQ(block, adjoint="unrolled", **solve)
    expected = gradient_of(unrolled(x, context=encoder(source)).square().sum(), tensors)
    backward = dict(backward_max_steps=60, backward_tol=0) if adjoint == "implicit" else dict(phantom_steps=60)
    deq = rk.DEQ(block, adjoint=adjoint, **solve, **backward)
    actual = gradient_of(deq(x, context=encoder(source)).square().sum(), tensors)
    error = relative_error(actual, expected)
    assert error <= 1e-10, f"{adjoint}: relative gradient error {error:.3g} > 1e-10 against unrolled"


def test_nested_tensors_masks_and_numbers_in_the_context():
    """Tensors inside a list are differentiated; a boolean mask and a float are passed as they are."""
    block, encoder, x, source = cross_setup(MemoryBlock)
    tensors = [x, *block.parameters(), *encoder.parameters()]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = True

    def run(adjoint, scale=1.0):
        deq = rk.ReversibleDEQ(block, beta=0.5, max_steps=6, tol=0, adjoint=adjoint)
        memories = [encoder(source), encoder(source.flip(0))]
        z = deq(x, memories=memories, mask=mask, scale=scale)
        return z, gradient_of(z.square().sum(), tensors)

    z, actual = run("reversible")
    _, expected = run("unrolled")
    error = relative_error(actual, expected)
    assert error <= 1e-12, f"list of memories: relative gradient error {error:.3g} > 1e-12 against unrolled"
    halved, _ = run("reversible", scale=0.5)
    assert not torch.allclose(z, halved), "the float keyword did not reach f"
    assert mask.grad is None and not mask.requires_grad


@pytest.mark.parametrize("layer", ["ReversibleDEQ", "DEQ"])
def test_a_partials_module_is_registered(layer):
    """Before: ``ReversibleDEQ(partial(block, ...)).parameters()`` was empty, so an optimizer built
    from the model left the block untrained, and ``.to()``/``state_dict()`` skipped it."""
    block = MemoryBlock()
    make = rk.ReversibleDEQ if layer == "ReversibleDEQ" else rk.DEQ
    deq = make(functools.partial(block, scale=2.0))
    assert {id(p) for p in deq.parameters()} == {id(p) for p in block.parameters()}
    deq.double()
    assert all(p.dtype == F64 for p in block.parameters()), "deq.double() did not reach the partial's module"
    copy = MemoryBlock().double()
    make(functools.partial(copy, scale=2.0)).load_state_dict(deq.state_dict())
    for (name, p), q in zip(block.named_parameters(), copy.parameters()):
        assert torch.equal(p, q), f"{name} was not restored from the state_dict"


def test_a_tensor_derived_from_the_context_in_a_list_is_named():
    """f reads, besides its context keyword c, sin(c) kept in a list: each reverse step's VJP
    reaches c through sin's graph, which the first one frees. The error says what to pass."""

    class ListBlock(CrossBlock):
        def forward(self, z, x, context):
            return super().forward(z, x, context) + self.memory[0]

    block, encoder, x, source = cross_setup(ListBlock)
    context = encoder(source)
    block.memory = [torch.sin(context)]
    z = rk.ReversibleDEQ(block, beta=0.5, max_steps=4, tol=0)(x, context=context)
    with pytest.raises(RuntimeError, match=r"at reverse step \d+ f read a tensor whose graph .* Pass that tensor "
                                           r"itself as a keyword"):
        z.sum().backward()
