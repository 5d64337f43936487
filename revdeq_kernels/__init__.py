"""revdeq_kernels: Reversible Deep Equilibrium Models for PyTorch."""

from . import ops
from .deq import DEQ
from .ops import backends
from .reversible import ReversibleDEQ, solve
from .settings import SolveSettings
from .stats import Solution, SolverStats

__version__ = "0.1.0"

__all__ = ["DEQ", "ReversibleDEQ", "solve", "SolveSettings", "Solution", "SolverStats", "backends", "ops",
           "__version__"]
