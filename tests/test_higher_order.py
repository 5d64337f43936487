"""Second derivatives and Jacobians through each adjoint.

The reversible, implicit and phantom adjoints are first-order: a second derivative through
them must raise, naming adjoint='unrolled', by every route a user takes (torch's
once_differentiable returned None from ``autograd.grad`` and zeros from ``hessian``).
What does work is checked against plain autograd through the same iteration, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import revdeq_kernels as rk
from tests.helpers import ResidualBlock, relative_error

F64 = torch.float64
BETA, STEPS = 0.5, 5

FIRST_ORDER = {
    "reversible-exact": lambda f: rk.ReversibleDEQ(f, beta=BETA, max_steps=STEPS, tol=0),
    "reversible-float": lambda f: rk.ReversibleDEQ(f, beta=BETA, max_steps=STEPS, tol=0, reversal="float"),
    "implicit": lambda f: rk.DEQ(f, solver="fixed_point", beta=BETA, max_steps=STEPS, tol=0),
    "phantom": lambda f: rk.DEQ(f, solver="fixed_point", adjoint="phantom", beta=BETA, max_steps=STEPS, tol=0),
}


def unrolled(f):
    return rk.ReversibleDEQ(f, beta=BETA, max_steps=STEPS, tol=0, adjoint="unrolled", reversal="float")


def setup(seed: int = 0, width: int = 8):
    torch.manual_seed(seed)
    f = ResidualBlock(width, scale=0.3).to(F64)
    x = torch.randn(3, width, dtype=F64, requires_grad=True)
    return f, x


def plain_iteration(f, x):
    """The RevDEQ iteration in plain PyTorch ops: autograd differentiates it to any order."""
    y = z = torch.zeros_like(x)
    f_z = f(z, x)
    for _ in range(STEPS):
        y = (1 - BETA) * y + BETA * f_z
        z = (1 - BETA) * z + BETA * f(y, x)
        f_z = f(z, x)
    return z


def plain_relaxation(f, x):
    """DEQ(solver="fixed_point")'s iteration, z <- (1-b) z + b f(z), in plain PyTorch ops."""
    z = torch.zeros_like(x)
    for _ in range(STEPS):
        z = (1 - BETA) * z + BETA * f(z, x)
    return z


def loss_of(z):
    return z.square().sum() + z.sin().sum()


def penalty_gradient(deq, x):
    """dL/dx with a graph: the start of a gradient penalty."""
    (g,) = torch.autograd.grad(loss_of(deq(x)), x, create_graph=True)
    return g


SECOND_ORDER_ROUTES = {
    "grad-of-grad": lambda deq, f, x: torch.autograd.grad(penalty_gradient(deq, x).square().sum(), x),
    "allow-unused": lambda deq, f, x: torch.autograd.grad(penalty_gradient(deq, x).square().sum(), x,
                                                          allow_unused=True),
    "parameters-only": lambda deq, f, x: torch.autograd.grad(penalty_gradient(deq, x).square().sum(),
                                                             list(f.parameters())),
    "penalty-backward": lambda deq, f, x: (loss_of(deq(x)) + penalty_gradient(deq, x).square().sum()).backward(),
    "hessian": lambda deq, f, x: torch.autograd.functional.hessian(lambda v: loss_of(deq(v)), x.detach()),
    # dL/dz constant: the incoming gradient needs no grad, the saved inputs still anchor the refusal
    "hessian-linear-loss": lambda deq, f, x: torch.autograd.functional.hessian(lambda v: deq(v).sum(), x.detach()),
    "initial-state": lambda deq, f, x: initial_state_mixed_derivative(deq, x),
}


def initial_state_mixed_derivative(deq, x):
    """d/dz0 of dL/dx for a loss linear in z: only z0 itself can anchor the refusal."""
    z0 = torch.randn_like(x).mul(0.1).requires_grad_()
    (g,) = torch.autograd.grad(deq(x, z0).sum(), x, create_graph=True)
    return torch.autograd.grad(g.square().sum(), z0, allow_unused=True)


# The implicit and phantom adjoints treat z* as independent of z0 (no first-order gradient
# to z0 either), so only the reversible adjoint has a mixed derivative in z0 to refuse.
REFUSALS = [(method, route) for method in FIRST_ORDER for route in SECOND_ORDER_ROUTES
            if route != "initial-state" or method.startswith("reversible")]


@pytest.mark.parametrize("method,route", REFUSALS, ids=[f"{m}-{r}" for m, r in REFUSALS])
def test_second_derivative_through_a_first_order_adjoint_raises(method, route):
    f, x = setup()
    deq = FIRST_ORDER[method](f)
    with pytest.raises(RuntimeError, match=r"second derivative through .*adjoint='unrolled'") as raised:
        result = SECOND_ORDER_ROUTES[route](deq, f, x)
        raise AssertionError(f"{method}, {route}: returned instead of raising: {result!r}"[:300])
    assert "\n" not in str(raised.value), "the refusal must be one line"


@pytest.mark.parametrize("method", FIRST_ORDER)
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # the call under test
def test_create_graph_leaves_first_order_gradients_unchanged(method):
    """create_graph=True for a penalty elsewhere must not change or break the first-order gradients."""
    f, x = setup()
    deq = FIRST_ORDER[method](f)
    plain = torch.autograd.grad(loss_of(deq(x)), [x, *f.parameters()])
    with_graph = torch.autograd.grad(loss_of(deq(x)), [x, *f.parameters()], create_graph=True)
    for i, (a, b) in enumerate(zip(with_graph, plain)):
        assert torch.equal(a.detach(), b), f"{method}: gradient {i} differs under create_graph=True"
        assert a.requires_grad, f"{method}: gradient {i} lost its refusal node"
    loss_of(deq(x)).backward(create_graph=True)  # .grad accumulation, then the usual in-place edits
    torch.nn.utils.clip_grad_norm_(f.parameters(), 1e-3)
    for p in f.parameters():
        p.grad.mul_(0.5)


UNROLLED_ADJOINTS = {
    "reversible": (unrolled, plain_iteration),
    "deq-fixed-point": (lambda f: rk.DEQ(f, solver="fixed_point", adjoint="unrolled", beta=BETA, max_steps=STEPS,
                                         tol=0), plain_relaxation),
}


@pytest.mark.parametrize("method", UNROLLED_ADJOINTS)
def test_unrolled_adjoint_gives_the_second_derivative(method):
    f, x = setup()
    make, iteration = UNROLLED_ADJOINTS[method]
    deq = make(f)
    hessian = torch.autograd.functional.hessian(lambda v: loss_of(deq(v)), x.detach())
    expected = torch.autograd.functional.hessian(lambda v: loss_of(iteration(f, v)), x.detach())
    assert expected.abs().max() > 1e-3, "the check needs a nonzero second derivative"
    error = relative_error(hessian, expected)
    assert error <= 1e-12, f"{method}: unrolled Hessian vs plain autograd: relative error {error:.3g} > 1e-12"

    penalty = penalty_gradient(deq, x).square().sum()
    mixed = torch.autograd.grad(penalty, list(f.parameters()))
    penalty_plain = torch.autograd.grad(loss_of(iteration(f, x)), x, create_graph=True)[0].square().sum()
    mixed_plain = torch.autograd.grad(penalty_plain, list(f.parameters()))
    for i, (a, b) in enumerate(zip(mixed, mixed_plain)):
        error = relative_error(a, b)
        assert error <= 1e-12, f"{method}: gradient penalty's parameter gradient {i}: relative error {error:.3g} > 1e-12"


@pytest.mark.parametrize("method", ["reversible-exact", "reversible-float"])
def test_jacobian_through_the_reversible_adjoint(method):
    """torch.autograd.functional.jacobian (vectorize=False: one backward per output) is exact."""
    f, x = setup()
    jacobian = torch.autograd.functional.jacobian(FIRST_ORDER[method](f), x.detach())
    expected = torch.autograd.functional.jacobian(lambda v: plain_iteration(f, v), x.detach())
    error = relative_error(jacobian, expected)
    bound = 1e-12 if method == "reversible-float" else 1e-9  # exact: 48 fractional bits of state (f64)
    assert error <= bound, f"{method}: Jacobian vs plain autograd: relative error {error:.3g} > {bound:g}"


def test_vectorized_jacobian_through_the_unrolled_adjoint():
    f, x = setup()
    jacobian = torch.autograd.functional.jacobian(unrolled(f), x.detach(), vectorize=True)
    expected = torch.autograd.functional.jacobian(lambda v: plain_iteration(f, v), x.detach())
    assert relative_error(jacobian, expected) <= 1e-12, "jacobian(vectorize=True) through adjoint='unrolled'"


# The stop test reads its residuals back to the host; under torch.func.grad they are wrapped
# tensors, which torch 2.4 and 2.7 cannot read ("Cannot access data pointer"); 2.11 and 2.14
# can. The versions between were not checked.
@pytest.mark.skipif(torch.__version__ < "2.11", reason="torch.func.grad over the solve needs torch >= 2.11 "
                    "(checked: fails on 2.4 and 2.7, passes on 2.11 and 2.14)")
def test_torch_func_through_the_unrolled_adjoint():
    f, x = setup()
    deq = unrolled(f)
    x = x.detach()
    grad = torch.func.grad(lambda v: loss_of(deq(v)))(x)
    expected = torch.autograd.grad(loss_of(plain_iteration(f, x.requires_grad_())), x)[0]
    assert relative_error(grad, expected) <= 1e-12, "torch.func.grad through adjoint='unrolled'"
    jacobian = torch.func.jacrev(deq)(x.detach())
    expected = torch.autograd.functional.jacobian(lambda v: plain_iteration(f, v), x.detach())
    assert relative_error(jacobian, expected) <= 1e-12, "torch.func.jacrev through adjoint='unrolled'"


TRANSFORMS = {
    "func.grad": lambda deq, x: torch.func.grad(lambda v: deq(v).sum())(x),
    "func.jacrev": lambda deq, x: torch.func.jacrev(deq)(x),
    "func.vmap": lambda deq, x: torch.func.vmap(lambda v: deq(v[None]), randomness="same")(x),
    # per-sample gradients: the vmap is outside the grad, so the solve sees no batched tensor
    "func.vmap-grad": lambda deq, x: torch.func.vmap(torch.func.grad(lambda v: deq(v[None]).sum()),
                                                     randomness="same")(x),
    "jacobian-vectorize": lambda deq, x: torch.autograd.functional.jacobian(deq, x, vectorize=True),
}


UNSUPPORTED = [(method, transform) for method in ("reversible-exact", "implicit") for transform in TRANSFORMS]
UNSUPPORTED += [("unrolled", "func.vmap"), ("unrolled", "func.vmap-grad")]  # the stop test and the kernels have
# no batching rule


@pytest.mark.parametrize("method,transform", UNSUPPORTED, ids=[f"{m}-{t}" for m, t in UNSUPPORTED])
def test_function_transforms_raise_rather_than_return(method, transform):
    """The README and docs/api.md say these are unsupported; they must fail, and the torch.func ones with our
    advice, not torch's advice to the autograd.Function's author ("override setup_context")."""
    f, x = setup()
    deq = unrolled(f) if method == "unrolled" else FIRST_ORDER[method](f)
    vmap = "torch.func.vmap over a DEQ solve is not supported .* stack the samples along dim 0"
    match = {"func.vmap": vmap, "func.vmap-grad": vmap,
             "func.grad": "cannot differentiate through adjoint=.*; use adjoint='unrolled'",
             "func.jacrev": "cannot differentiate through adjoint=.*; use adjoint='unrolled'"}.get(transform)
    with pytest.raises(RuntimeError, match=match) as raised:
        TRANSFORMS[transform](deq, x.detach())
    assert len(str(raised.value).splitlines()) == 1, f"{method}/{transform}: a multi-line error: {raised.value}"


@pytest.mark.parametrize("method", list(FIRST_ORDER))
def test_forward_mode_dual_tensors_are_refused_by_the_first_order_adjoints(method):
    """A forward_ad dual tensor into a backward-only adjoint: torch's own error asked the user to
    implement the autograd.Function's jvp. The unrolled adjoint carries the tangent."""
    f, x = setup()
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        with pytest.raises(RuntimeError, match=r"forward-mode AD .* use adjoint='unrolled'") as raised:
            FIRST_ORDER[method](f)(forward_ad.make_dual(x.detach(), tangent))
        assert len(str(raised.value).splitlines()) == 1
        out = forward_ad.unpack_dual(unrolled(f)(forward_ad.make_dual(x.detach(), tangent)))
    expected = torch.func.jvp(lambda v: plain_iteration(f, v), (x.detach(),), (tangent,))[1]
    assert relative_error(out.tangent, expected) <= 1e-12, "forward mode through adjoint='unrolled'"
