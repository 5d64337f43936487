"""f's kernels chosen alike whether autograd records or not.

A solve evaluates f without a graph in its forward pass and, for the reversible adjoint,
again with one in the backward's recomputation. A module that picks another kernel when
autograd is off computes other bits there: the exact reversal then rebuilds garbage, and
the float one drifts. PyTorch's own nn.MultiheadAttention and nn.TransformerEncoderLayer do
so in eval mode (their fused inference "fast path" runs only without a graph), so solves
that a backward will follow run with that path off; pure inference keeps it.

The switch, ``torch.backends.mha.set_fastpath_enabled``, is one process-wide flag: it is
turned off while at least one such solve runs in any thread and restored when the last ends.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .f_module import BufferSnapshot

if TYPE_CHECKING:
    from .problem import Problem


class _GraphKernelsOnly:
    """The switch's holder: off while any holder is inside, in any thread; restored by the last out."""

    _lock = threading.Lock()
    _holding = 0
    _before = True

    def __enter__(self) -> None:
        cls = _GraphKernelsOnly
        with cls._lock:
            if cls._holding == 0:
                cls._before = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            cls._holding += 1

    def __exit__(self, *exc) -> None:
        cls = _GraphKernelsOnly
        with cls._lock:
            cls._holding -= 1
            if cls._holding == 0:
                torch.backends.mha.set_fastpath_enabled(cls._before)


_HOLD, _NO_CHANGE = _GraphKernelsOnly(), contextlib.nullcontext()


def graph_kernels_only(active: bool = True):
    """A context within which nn.MultiheadAttention / nn.TransformerEncoderLayer take the path
    they take under autograd, also when it does not record. ``active=False``: no change. Entered
    once per evaluation of f, so it is kept cheap (a class, not a generator)."""
    return _HOLD if active else _NO_CHANGE


NONDETERMINISM = ("look for a nondeterministic kernel (atomics: index_add_, scatter_add_, some cuDNN/cuBLAS "
                  "algorithms; torch.use_deterministic_algorithms(True) names them), or state f keeps between calls "
                  "outside its buffers (an attribute; buffers are held for the solve)")


def recomputation_suspect(problem: Problem, state: Tensor, x: Tensor) -> str:
    """Why f's recomputation may differ from its forward evaluation, measured at ``state``:
    f(state, x) evaluated twice without a graph and once with one, with the same random stream
    and buffers. A sentence naming the cause, or "" when the three agree."""
    with BufferSnapshot(problem.f), problem.autocast_context():
        with torch.no_grad():
            first, second = problem.call_f(state, x, 1), problem.call_f(state, x, 1)
        with torch.enable_grad():
            recorded = problem.call_f(state.detach().requires_grad_(), x.detach(), 1).detach()
    if not torch.equal(first, second):
        return ("f computes other bits on two calls with the same input, random stream and buffers (measured "
                f"at the solve's last state): {NONDETERMINISM}")
    if not torch.equal(second, recorded):
        return ("f computes other bits when autograd records it than when it does not (measured at the solve's "
                "last state): the forward pass evaluates f without a graph, the backward's recomputation with "
                "one. A module in f picks its kernel by torch.is_grad_enabled() or by whether its inputs "
                "require grad (the fused inference paths of nn.MultiheadAttention and "
                "nn.TransformerEncoderLayer are switched off for these solves already); make it take one "
                "path in both: for scaled_dot_product_attention, pin its backend with "
                "torch.nn.attention.sdpa_kernel; an nn.LSTM on CPU runs oneDNN kernels that differ, so run the "
                "forward and the backward under torch.backends.mkldnn.flags(enabled=False)")
    return ""
