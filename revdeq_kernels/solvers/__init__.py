"""Classic DEQ solvers and adjoints behind ``revdeq_kernels.DEQ``.

Forward solvers (all generic over a map ``g(state, index)``, shared with the adjoint solve):
    fixed_point.py   relaxed fixed-point iteration (damping beta), in place through ops.relax_
    anderson.py      Anderson acceleration (window m, regularisation lam), safe on singular systems
    broyden.py       Broyden's method (m stored inverse-Jacobian pairs), safeguarded per sample
Adjoints that differentiate at z* only, each an object run by at_equilibrium.py's Function:
    implicit.py      implicit-function-theorem adjoint, its own fixed-point/Anderson solve
    phantom.py       k damped steps from the fixed point, differentiated by autograd
The unrolled adjoint is the forward solver run under autograd (``differentiable=True``);
the reversible solver and adjoint live in ``revdeq_kernels.reversible``.
"""

from __future__ import annotations

from functools import partial

from .anderson import anderson_solve, mixing_weights
from .broyden import broyden_solve
from .fixed_point import fixed_point_solve
from .at_equilibrium import AtEquilibriumFunction
from .implicit import ImplicitAdjoint
from .phantom import PhantomAdjoint, phantom_steps



def iterative_solver(name: str, m: int | None = None, lam: float | None = None):
    """``iterate(problem, evaluate, start, *, differentiable=False, visit=None)`` for a solver name
    (one of settings.ITERATIVE_SOLVERS, validated with the settings)."""
    if name == "anderson":
        return partial(anderson_solve, m=m, lam=lam)
    if name == "broyden":
        return partial(broyden_solve, m=m)
    return fixed_point_solve


__all__ = [
    "iterative_solver", "fixed_point_solve", "anderson_solve", "broyden_solve", "mixing_weights",
    "AtEquilibriumFunction", "ImplicitAdjoint", "PhantomAdjoint", "phantom_steps",
]
