"""Replayable randomness for the evaluations of f.

The reversible backward recomputes f(y_{n+1}) and f(z_n) in reverse order. If f draws
random numbers (dropout), each recomputation must see exactly the random stream its
forward evaluation saw, or the inverse reconstructs the wrong states. Saving the RNG
state before every evaluation (as torch.utils.checkpoint does) would make memory grow
with the number of steps, so instead each evaluation k runs under a generator seeded
with ``base_seed + k``, where ``base_seed`` is drawn once per forward from the global
generator (so ``torch.manual_seed`` still makes a whole run reproducible). The global
generator's state is restored after each evaluation. Only the generator of the device
the state lives on is touched.
"""

from __future__ import annotations

import contextlib

import torch


class EvaluationRNG:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        # One draw from the global stream: advances it once per solve, seeds every eval.
        self.base_seed = int(torch.randint(0, 2**62, (1,)).item()) if enabled else 0

    @contextlib.contextmanager
    def evaluation(self, index: int):
        """Run the body with the random stream of evaluation ``index``."""
        if not self.enabled:
            yield
            return
        seed = self.base_seed + index
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device], device_type="cuda"):
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
                yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                yield
