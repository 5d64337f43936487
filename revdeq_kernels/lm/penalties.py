"""The terms a DEQ's training objective may add to the loss, evaluated at its solution z*.

A DEQ trained on its loss alone is free to use the transient of its solver: the iterate at
``max_steps`` may be good while the fixed point it approaches is not, and then more steps
at inference make it worse. These terms make the solution an equilibrium the solver
actually reaches (``res_reg``), keep f contractive around it (``jac_reg``), or forbid the
loss to rise with one more evaluation of f (``depth_reg``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..penalties import jacobian_penalty, residual_penalty

__all__ = ["depth_penalty", "jacobian_penalty", "residual_penalty"]


def depth_penalty(loss: Tensor, deeper_loss: Tensor) -> Tensor:
    """``relu(deeper_loss - loss)``: the loss read out at f(z*) may not exceed the loss at z*.

    Both sides keep their gradients, on purpose. Near the fixed point f(z*) - z* ~ (J - I) e
    with e = z* - z_inf, and J contracting along e, so "one more evaluation does not raise the
    loss" means, to first order, that the trained iterate is no better than the fixed point
    it approaches. The loss at z* alone rewards the opposite: an iterate tuned to the
    solver's transient, which more steps at inference then undo. With the weight w, a model
    that uses the transient pays about w * (1 - rho) per unit of loss gained, rho the
    contraction along e (~0.8 per evaluation on `tiny`), so w above 1 / (1 - rho) makes it a
    loss. Measured (bench/RESULTS.md): it flattens the depth curve but costs more perplexity
    than the rise it removes, erratically across seeds; hence off by default."""
    return torch.relu(deeper_loss - loss)
