"""Backward passes that are first-order only, and say so whenever a second derivative reaches them.

The reversible adjoint and the implicit and phantom adjoints compute gradients, not graphs
of gradients, so a second derivative through them (``create_graph=True``: a gradient
penalty, a Hessian, MAML's outer step) does not exist. torch's ``once_differentiable`` says
so only when ``loss.backward()`` happens to reach its error node, which hangs on detached
copies of the gradients: ``torch.autograd.grad(g, x)`` never reaches it, and the second
derivative comes back as None (``allow_unused=True``), as "x was not used in the graph", or
as zeros (``torch.autograd.functional.hessian``). Here the error node hangs on what the
gradients really depend on: the incoming gradient, the forward's inputs and f's parameters.
Any second derivative that has to pass through the backward then raises, naming the adjoint
that has one.

``torch.func`` transforms meet these backward passes before any second derivative: torch
refuses such a Function with advice for its author ("it must override setup_context").
``refuse_function_transforms`` raises first, with advice for its user.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd import forward_ad


class _SecondDerivativeRefused(torch.autograd.Function):
    """forward(message, count, *gradients, *anchors) -> gradients, unchanged; its backward raises."""

    @staticmethod
    def forward(ctx, message: str, count: int, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order(what: str):
    """Decorate the ``backward`` of an autograd.Function whose ctx holds the solve's Problem.

    The backward runs without a graph on detached incoming gradients (it is first-order by
    construction). Under ``create_graph=True`` its gradients come out attached to a node
    that raises, with this message, if anything differentiates them."""
    message = (f"a second derivative through {what} was requested (create_graph=True: a gradient penalty, "
               "a Hessian, MAML's outer step), but that backward computes gradients without a graph of them; "
               "use adjoint='unrolled', which differentiates through every step with plain autograd "
               "(its memory grows with the steps)")

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *(g.detach() if isinstance(g, Tensor) else g for g in grads))
            if not torch.is_grad_enabled():  # an ordinary backward: create_graph=False
                return outputs
            anchors = [t for t in (*grads, *ctx.saved_tensors, *ctx.problem.params)
                       if isinstance(t, Tensor) and t.requires_grad]
            filled = [i for i, g in enumerate(outputs) if isinstance(g, Tensor)]
            if not anchors or not filled:
                return outputs
            refused = _SecondDerivativeRefused.apply(message, len(filled), *(outputs[i] for i in filled), *anchors)
            outputs = list(outputs)
            for i, g in zip(filled, refused):
                outputs[i] = g
            return tuple(outputs)

        return wrapper

    return decorate


def _active_transforms() -> list[str]:
    """The torch.func transforms around this call ("vmap", "grad", ...), outermost first.
    torch has no public query for them; should these private names move, this returns []
    and torch's own error follows (tests/test_higher_order.py would then fail)."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        return [level.key().name.lower() for level in retrieve_all_functorch_interpreters()]
    except (ImportError, AttributeError):
        return []


def refuse_function_transforms(adjoint: str) -> None:
    """Raises if a ``torch.func`` transform is active around a solve that cannot run under it:
    ``vmap`` at any level (no batching rule for the stop test and the fused kernels) and
    every transform of the first-order adjoints (grad, vjp, jacrev)."""
    transforms = _active_transforms()
    if "vmap" in transforms:
        raise RuntimeError("torch.func.vmap over a DEQ solve is not supported (the stop test and the fused "
                           "kernels have no batching rule); the batch is dim 0 already: stack the samples "
                           "along dim 0 and solve once")
    if transforms and adjoint != "unrolled":
        raise RuntimeError(f"torch.func transforms (grad, vjp, jacrev) cannot differentiate through "
                           f"adjoint={adjoint!r}, a first-order backward; use adjoint='unrolled' (torch >= 2.11), "
                           "or torch.autograd.functional.jacobian(deq, x) for a Jacobian")


def refuse_forward_mode(adjoint: str, tensors) -> None:
    """Raises if a dual tensor of ``torch.autograd.forward_ad`` reaches a solve whose adjoint has
    a backward only (torch's own error asked the user to implement the Function's jvp)."""
    if adjoint != "unrolled" and any(t is not None and forward_ad.unpack_dual(t).tangent is not None
                                     for t in tensors):
        raise RuntimeError(f"forward-mode AD (a torch.autograd.forward_ad dual tensor) cannot go through "
                           f"adjoint={adjoint!r}, which has a backward pass only; use adjoint='unrolled'")
