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

import torch


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
