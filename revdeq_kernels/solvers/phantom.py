"""The phantom-gradient adjoint (Geng et al., NeurIPS 2021): backpropagate through k
damped steps taken from the fixed point instead of through the solver.

The forward pass returns the solver's z* unchanged and saves x and z*. The backward pass
recomputes  s_0 = z*,  s_{i+1} = (1-t) s_i + t f(s_i, x)  for i < k with a graph, and
returns the vector-Jacobian product of s_k with the incoming gradient (at_equilibrium.py):
z* itself is treated as a constant (no gradient flows through the solver, and none to
z0). Costs k evaluations of f and k VJPs in the backward pass; memory O(k) there, O(1)
between passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.reference import relax


def phantom_steps(problem, z_star, x, steps: int, damping: float):
    """s_k from s_0 = z_star (detached) under the current grad mode; evaluation i of the
    k uses the random stream after the forward solver's (under rng="per_solve" that is
    the solve's one stream: the f whose fixed point z_star is)."""
    state = z_star.detach()
    first = problem.stats.steps + 1
    for i in range(steps):
        state = relax(state, problem.call_f(state, x, first + i), damping)
    return state


@dataclass(frozen=True)
class PhantomAdjoint:
    steps: int
    damping: float

    def backward_output(self, problem, z_star: Tensor, x_in: Tensor, grad_z: Tensor):
        out = phantom_steps(problem, z_star, x_in, self.steps, self.damping)
        problem.stats.nfe_backward += self.steps  # once per state, with states_at
        return out, grad_z
