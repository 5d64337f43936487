"""rk.jacobian_penalty and rk.residual_penalty: what they estimate, what they differentiate,
and what they leave alone."""

from __future__ import annotations

import pytest
import torch

import revdeq_kernels as rk
from tests.helpers import TanhBlock

F64 = torch.float64


def tanh_setup():
    torch.manual_seed(0)
    weight = torch.randn(6, 6, dtype=F64) * 0.4
    f = lambda z, x: torch.tanh(z @ weight.T + x)  # noqa: E731
    z, x = torch.randn(2, 6, dtype=F64), torch.randn(2, 6, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda t: f(t, x), z)  # [2, 6, 2, 6]
    return f, z, x, float(jac.pow(2).sum()) / z.numel()


@pytest.mark.parametrize("probes,calls", [(1, 4000), (8, 500)])
def test_jacobian_penalty_estimates_the_mean_squared_singular_value(probes, calls):
    f, z, x, exact = tanh_setup()
    estimate = sum(float(rk.jacobian_penalty(f, z, x, probes=probes).detach()) for _ in range(calls)) / calls
    assert abs(estimate - exact) <= 0.05 * exact, f"Hutchinson mean {estimate:.4g} vs ||J||_F^2/n {exact:.4g}"


def test_more_probes_shrink_the_variance():
    """Averaging k independent probes divides the estimator's variance by k."""
    f, z, x, _ = tanh_setup()
    spread = {k: torch.tensor([float(rk.jacobian_penalty(f, z, x, probes=k).detach()) for _ in range(300)]).var()
              for k in (1, 16)}
    assert spread[16] <= spread[1] / 8, f"variance with 16 probes {spread[16]:.3g}, with 1 {spread[1]:.3g}"


class ContextTanh(TanhBlock):
    def forward(self, z, x, context):
        return super().forward(z, x + context)


@pytest.mark.parametrize("given", ["block", "layer"])
def test_jacobian_penalty_trains_f_x_and_the_context_but_not_z(given):
    torch.manual_seed(0)
    block = ContextTanh(6).double()
    deq = rk.ReversibleDEQ(block, beta=0.5, max_steps=4)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    context = torch.randn(3, 6, dtype=F64, requires_grad=True)
    z = deq(x, context=context)
    penalty = rk.jacobian_penalty(block if given == "block" else deq, z, x, context=context)
    grads = torch.autograd.grad(penalty, [x, context, z, *block.parameters()], allow_unused=True)
    assert grads[2] is None, "z* must be a constant of the penalty: its gradient is the DEQ's"
    for name, g in zip(["x", "context", "z", *dict(block.named_parameters())], grads):
        if name != "z":
            assert g is not None and g.abs().sum() > 0, f"the penalty does not reach {name}"


def test_jacobian_penalty_leaves_running_statistics_alone():
    torch.manual_seed(0)
    block = TanhBlock(6, batchnorm=True).double().train()
    z, x = torch.randn(8, 6, dtype=F64), torch.randn(8, 6, dtype=F64)
    before = {name: b.clone() for name, b in block.named_buffers()}
    rk.jacobian_penalty(block, z, x).backward()
    for name, b in block.named_buffers():
        assert torch.equal(b, before[name]), f"{name} moved: the penalty counted as a forward pass"


def test_jacobian_penalty_under_no_grad_still_measures():
    f, z, x, exact = tanh_setup()
    with torch.no_grad():
        value = float(rk.jacobian_penalty(f, z, x, probes=64))
    assert 0.5 * exact < value < 2 * exact


def test_jacobian_penalty_errors_name_the_problem():
    f, z, x, _ = tanh_setup()
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        rk.jacobian_penalty(f, z, x, probes=0)
    with pytest.raises(ValueError, match=r"f returned \(2, 3\) for z of shape \(2, 6\)"):
        rk.jacobian_penalty(lambda z, x: z[:, :3], z, x)
    with pytest.raises(TypeError, match="z and x must be tensors, got str and Tensor"):
        rk.jacobian_penalty(f, "z", x)
    with pytest.raises(TypeError, match=r"z\[0\] is a float, not a Tensor"):
        rk.jacobian_penalty(f, [1.0], x)


def test_residual_penalty_is_the_squared_relative_residual():
    torch.manual_seed(0)
    z, fz = torch.randn(4, 3, 5, dtype=F64), torch.randn(4, 3, 5, dtype=F64)
    per_sample = (fz - z).flatten(1).norm(dim=1) ** 2 / fz.flatten(1).norm(dim=1) ** 2
    assert torch.allclose(rk.residual_penalty(z, fz).double(), per_sample.mean(), rtol=1e-6)
