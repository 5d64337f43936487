"""Classic DEQ solvers and adjoints behind ``revdeq_kernels.DEQ``.

Forward solvers (all generic over a map ``g(state, index)``, shared with the adjoint solve):
    fixed_point.py   relaxed fixed-point iteration (damping beta), in place through ops.relax_
    anderson.py      Anderson acceleration (window m, regularisation lam), safe on singular systems
Adjoints:
    implicit.py      implicit-function-theorem adjoint, its own fixed-point/Anderson solve
    phantom.py       k damped steps from the fixed point, differentiated by autograd
The unrolled adjoint is the forward solver run under autograd (``differentiable=True``);
the reversible solver and adjoint live in ``revdeq_kernels.reversible``.
"""

from __future__ import annotations

from functools import partial

from .anderson import anderson_solve, mixing_weights
from .fixed_point import fixed_point_solve
from .implicit import AdjointSolve, ImplicitFunction
from .phantom import PhantomFunction, phantom_steps

ITERATIVE_SOLVERS = ("fixed_point", "anderson")


def iterative_solver(name: str, m: int | None = None, lam: float | None = None):
    """``iterate(problem, evaluate, start, *, differentiable=False)`` for a solver name."""
    if name == "fixed_point":
        return fixed_point_solve
    if name == "anderson":
        return partial(anderson_solve, m=m, lam=lam)
    raise ValueError(f"iterative solver must be one of {ITERATIVE_SOLVERS}, got {name!r}")


__all__ = [
    "ITERATIVE_SOLVERS", "iterative_solver", "fixed_point_solve", "anderson_solve", "mixing_weights",
    "AdjointSolve", "ImplicitFunction", "PhantomFunction", "phantom_steps",
]
