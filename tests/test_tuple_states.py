"""States and inputs of several tensors (a multiscale DEQ's resolutions): f((z1, z2), (x1, x2)).
Gradients match autograd through the same iteration, the result is the flat solve's bit for
bit, and every malformed tuple names its component."""

from __future__ import annotations

import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import bench_module, relative_error

F64 = torch.float64


class TwoScale(torch.nn.Module):
    """z1: [B, 4, 8] (fine), z2: [B, 8, 4] (coarse); each scale mixes in the other, as MDEQ does."""

    def __init__(self):
        super().__init__()
        self.fine, self.coarse = torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.Conv1d(8, 8, 3, padding=1)
        self.down, self.up = torch.nn.Conv1d(4, 8, 2, stride=2), torch.nn.ConvTranspose1d(8, 4, 2, stride=2)

    def forward(self, z, x, scale=1.0):
        (z1, z2), (x1, x2) = z, x
        return (torch.tanh(self.fine(z1) + self.up(z2) + scale * x1),
                torch.tanh(self.coarse(z2) + self.down(z1) + x2))


def setup():
    torch.manual_seed(0)
    f = TwoScale().double()
    x = (torch.randn(3, 4, 8, dtype=F64, requires_grad=True), torch.randn(3, 8, 4, dtype=F64, requires_grad=True))
    z0 = (0.1 * torch.randn(3, 4, 8, dtype=F64)).requires_grad_(), (0.1 * torch.randn(3, 8, 4, dtype=F64)).requires_grad_()
    return f, x, z0


def gradients(deq, f, x, z0=None, **context):
    tensors = [*x, *(z0 or ()), *f.parameters()]
    for t in tensors:
        t.grad = None
    z1, z2 = deq(x, z0, **context)
    (z1.square().sum() + z2.sin().sum()).backward()
    return torch.cat([t.grad.flatten() for t in tensors])


LAYERS = {
    "exact": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0),
    "float": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="float"),
    "checkpointed": lambda f: rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, checkpoint_every=3),
    "DEQ(reversible)": lambda f: rk.DEQ(f, solver="reversible", adjoint="reversible", beta=0.5, max_steps=8, tol=0),
}


@pytest.mark.parametrize("with_z0", [False, True], ids=["z0=zeros", "z0 given"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_tuple_states_get_the_unrolled_gradients(name, with_z0):
    f, x, z0 = setup()
    z0 = z0 if with_z0 else None
    expected = gradients(rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, adjoint="unrolled"), f, x, z0)
    error = relative_error(gradients(LAYERS[name](f), f, x, z0), expected)
    assert error <= 1e-12, f"{name}: relative gradient error {error:.3g} > 1e-12 against unrolled"


@pytest.mark.parametrize("adjoint", ["implicit", "phantom"])
def test_deq_adjoints_on_tuple_states(adjoint):
    """Anderson, 40 steps: converged, so the implicit and phantom gradients are the unrolled ones."""
    f, x, _ = setup()
    solve = dict(solver="anderson", max_steps=40, tol=0)
    expected = gradients(rk.DEQ(f, adjoint="unrolled", **solve), f, x)
    backward = dict(backward_max_steps=60, backward_tol=0) if adjoint == "implicit" else dict(phantom_steps=60)
    error = relative_error(gradients(rk.DEQ(f, adjoint=adjoint, **solve, **backward), f, x), expected)
    assert error <= 1e-10, f"{adjoint}: relative gradient error {error:.3g} > 1e-10 against unrolled"


def test_the_tuple_solve_is_the_flat_solve_bit_for_bit():
    f, x, _ = setup()

    def flat_f(z, x_flat):
        z1, z2 = z[:, :32].view(3, 4, 8), z[:, 32:].view(3, 8, 4)
        x1, x2 = x_flat[:, :32].view(3, 4, 8), x_flat[:, 32:].view(3, 8, 4)
        return torch.cat([t.flatten(1) for t in f((z1, z2), (x1, x2))], dim=1)

    x_flat = torch.cat([t.detach().flatten(1) for t in x], dim=1)
    flat = rk.solve(flat_f, x_flat, beta=0.5, max_steps=6, tol=1e-4, parameters=list(f.parameters())).z
    solution = rk.solve(f, tuple(t.detach() for t in x), beta=0.5, max_steps=6, tol=1e-4)
    assert isinstance(solution.z, tuple) and len(solution.z) == 2
    assert torch.equal(torch.cat([t.flatten(1) for t in solution.z], dim=1), flat)
    assert solution.steps >= 1 and solution.residual.shape == (3,), "one residual per sample, over every component"


class OneInput(TwoScale):
    def forward(self, z, x, scale):
        return super().forward(z, (x, x.view(-1, 8, 4)), scale=scale)


def test_tuple_state_with_one_input_tensor_and_context():
    """z0 gives the state's components; x is a single tensor, and a keyword reaches f."""
    torch.manual_seed(0)
    f = OneInput().double()
    x = torch.randn(3, 4, 8, dtype=F64, requires_grad=True)
    z0 = (torch.zeros(3, 4, 8, dtype=F64), torch.zeros(3, 8, 4, dtype=F64))
    results = {}
    for adjoint, scale in (("reversible", 0.5), ("unrolled", 0.5), ("reversible", 1.0)):
        deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=6, tol=0, adjoint=adjoint)
        z1, z2 = deq(x, z0, scale=scale)
        results[adjoint, scale] = torch.cat([t.flatten() for t in torch.autograd.grad(
            z1.sum() + z2.square().sum(), [x, *f.parameters()])])
    error = relative_error(results["reversible", 0.5], results["unrolled", 0.5])
    assert error <= 1e-12, f"relative gradient error {error:.3g} > 1e-12 against unrolled"
    assert relative_error(results["reversible", 1.0], results["reversible", 0.5]) > 1e-3, "scale did not reach f"


@pytest.mark.parametrize("case,error,match", [
    ("empty", ValueError, r"x is an empty tuple"),
    ("batch", ValueError, r"x\[1\] has batch size 2 but x\[0\] has 3"),
    ("dtype", TypeError, r"x\[1\] is torch.float32 but x\[0\] is torch.float64"),
    ("not a tensor", TypeError, r"z0\[1\] is a float, not a Tensor"),
    ("returns a tensor", ValueError, r"the state has 2 components, so f must return a tuple of 2 tensors; "
                                     r"it returned a Tensor"),
    ("component shape", ValueError, r"f's output \[1\] is \(3, 8, 3\) but the state's component 1 has shape "
                                    r"\(3, 8, 4\)"),
])
def test_malformed_tuples_name_the_component(case, error, match):
    f, x, z0 = setup()
    x, z0 = tuple(t.detach() for t in x), tuple(t.detach() for t in z0)
    if case == "empty":
        x = ()
    elif case == "batch":
        x = (x[0], x[1][:2])
    elif case == "dtype":
        x = (x[0], x[1].float())
    elif case == "not a tensor":
        z0 = (z0[0], 0.0)
    elif case == "returns a tensor":
        f = lambda z, x: z[0]  # noqa: E731
    else:
        f = lambda z, x: (z[0], z[1][..., :3])  # noqa: E731
    with pytest.raises(error, match=match):
        rk.ReversibleDEQ(f, beta=0.5, max_steps=2)(x, z0)


def test_jacobian_penalty_of_a_tuple_state_is_that_of_the_flat_state():
    f, x, _ = setup()
    z = rk.ReversibleDEQ(f, beta=0.5, max_steps=4)(x)
    torch.manual_seed(5)
    penalty = rk.jacobian_penalty(f, z, x)
    torch.manual_seed(5)
    x_flat = torch.cat([t.flatten(1) for t in x], dim=1)
    z_flat = torch.cat([t.flatten(1) for t in z], dim=1)

    def flat_f(z, x_flat):
        z1, z2 = z[:, :32].view(3, 4, 8), z[:, 32:].view(3, 8, 4)
        return torch.cat([t.flatten(1) for t in f((z1, z2), (x_flat[:, :32].view(3, 4, 8),
                                                             x_flat[:, 32:].view(3, 8, 4)))], dim=1)

    assert torch.equal(penalty, rk.jacobian_penalty(flat_f, z_flat, x_flat))
    grads = torch.autograd.grad(penalty, [*x, *f.parameters()])
    assert all(g.abs().sum() > 0 for g in grads), "the penalty must reach both inputs and every parameter"


@pytest.mark.parametrize("block", ["cross-attention", "two-resolution"])
def test_structured_residual_blocks_are_exact(block):
    """bench/structured_f.py's blocks, both expansive (residual): a cross-attention block fed its
    memory as a context keyword and a two-resolution GroupNorm block with a tuple state. The
    exact reversal gives float64 autograd's gradients through 16 steps; the float one is far off."""
    bench = bench_module("structured_f")
    truth, _ = bench.gradients(block, F64, adjoint="unrolled")
    exact, stats = bench.gradients(block, F64, reversal="exact")
    assert stats.reconstruction_error == 0.0
    error = relative_error(exact, truth)
    assert error <= 1e-12, f"{block}: exact reversal {error:.3g} off unrolled"
    with pytest.warns(RuntimeWarning, match="the gradients are inexact"):
        drifted, _ = bench.gradients(block, F64, reversal="float")
    assert relative_error(drifted, truth) > 1e-3, "the block is not expansive: the test proves less than it says"
