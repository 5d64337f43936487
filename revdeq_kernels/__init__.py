"""revdeq_kernels: Reversible Deep Equilibrium Models for PyTorch."""

from . import ops
from .deq import DEQ
from .jacobian import FixedPointGaps, fixed_point_gaps, iteration_rate, spectral_radius
from .ops import backends
from .penalties import jacobian_penalty, residual_penalty
from .reversible import ReversibleDEQ, solve
from .settings import SolveSettings
from .stats import Solution, SolverStats

__version__ = "0.1.0"

__all__ = ["DEQ", "ReversibleDEQ", "solve", "SolveSettings", "Solution", "SolverStats", "backends", "ops",
           "jacobian_penalty", "residual_penalty", "spectral_radius", "iteration_rate",
           "fixed_point_gaps", "FixedPointGaps", "__version__"]
