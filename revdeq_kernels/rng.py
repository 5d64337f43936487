"""Replayable randomness for the evaluations of f.

The reversible backward recomputes f(y_{n+1}) and f(z_n) in reverse order. If f draws
random numbers (dropout), each recomputation must see exactly the random stream its
forward evaluation saw, or the inverse reconstructs the wrong states. Saving the RNG
state before every evaluation (as torch.utils.checkpoint does) would make memory grow
with the number of steps, so instead each evaluation runs under a generator seeded from
``base_seed``, drawn once per solve from the global generator (so ``torch.manual_seed``
still makes a whole run reproducible). The global generator's state is restored after
each evaluation. Only the generator of the device the state lives on is touched.

The modes (the ``rng`` setting):
- ``"per_solve"``, the default: every evaluation is seeded with ``base_seed``, so f draws
  the same numbers at every evaluation of one solve: one dropout mask per solve, the
  variational dropout of DEQs (Bai et al. 2019). f is then one function, which has a fixed
  point the solve can reach and the implicit adjoint can differentiate.
- ``"per_evaluation"``: evaluation ``k`` is seeded with ``base_seed + k``, a fresh mask at
  every evaluation, replayed by the backward. The iteration is then a random one and has
  no fixed point: its residual stays at the noise's size.
- ``"global"``: no replay; f draws from the global generator as any layer does, so the
  backward's recomputation draws other numbers than the forward pass did.

``replaying(stats)`` gives a "per_solve" solve's numbers outside it: f evaluated at the
solution for a penalty is then the f the solve iterated (``ReversibleDEQ.replaying_rng``).
"""

from __future__ import annotations

import contextlib

import torch


class EvaluationRNG:
    def __init__(self, device: torch.device, mode: str = "per_solve"):
        self.device = device
        self.mode = mode
        self.enabled = mode != "global"
        # One draw from the global stream: advances it once per solve, seeds every eval.
        self.base_seed = int(torch.randint(0, 2**62, (1,)).item()) if self.enabled else 0

    @contextlib.contextmanager
    def evaluation(self, index: int):
        """Run the body with the random stream of evaluation ``index``."""
        if not self.enabled:
            yield
            return
        seed = self.base_seed + index if self.mode == "per_evaluation" else self.base_seed
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device], device_type="cuda"):
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
                yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                yield


def replaying(stats) -> contextlib.AbstractContextManager:
    """A context in which f's random ops draw what they drew in the solve ``stats`` reports,
    its one stream under rng="per_solve". Under "per_evaluation" and "global" the solve had
    no one f to replay, which is an error, not a silent fresh draw."""
    stream = None if stats is None else stats.random_stream
    if stream is None:
        raise RuntimeError("no solve to replay the random numbers of: call the DEQ layer first")
    if stream.mode != "per_solve":
        raise RuntimeError(f"the last solve ran with rng={stream.mode!r}, which gives f no one set of random numbers "
                           "to replay; solve with rng='per_solve'")
    return stream.evaluation(0)
