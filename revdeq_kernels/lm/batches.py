"""Batches of (input, next-token target) windows from a flat token array.

A window is ``seq_len + 1`` consecutive tokens starting at a multiple of ``seq_len``.
Training draws windows in a shuffled order, each rank its own shard; evaluation reads
non-overlapping windows in order.
"""

from __future__ import annotations

import numpy as np
import torch


def num_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def window_batch(tokens: np.ndarray, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both [len(starts), seq_len] int64."""
    rows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainSampler:
    """Random windows, epoch by epoch, each rank its own shard.

    Epoch e shuffles all windows with ``seed + e`` (the same order on every rank); rank r
    takes every world-th window of that order, and batches are consecutive runs of its
    share (a trailing partial batch is dropped). Its position (epoch, cursor) is saved in
    checkpoints so that a resumed run reads exactly the batches it would have read."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.n_windows = num_windows(len(tokens), seq_len)
        self.per_rank = self.n_windows // world
        if self.per_rank < batch_size:
            raise ValueError(
                f"the training split has {len(tokens):,} tokens = {self.n_windows} windows of "
                f"{seq_len}+1 tokens ({self.per_rank} per process with {world} processes), fewer than "
                f"batch_size={batch_size}: use more data or a smaller batch_size / seq_len")
        self.epoch, self.cursor = 0, 0
        self._shard_of_epoch: tuple[int, torch.Tensor] | None = None

    def shard(self) -> torch.Tensor:
        """This rank's window indices for the current epoch."""
        if self._shard_of_epoch is None or self._shard_of_epoch[0] != self.epoch:
            order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self._shard_of_epoch = (self.epoch, order[self.rank::self.world][: self.per_rank])
        return self._shard_of_epoch[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
        windows = self.shard()[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return window_batch(self.tokens, (int(i) * self.seq_len for i in windows), self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_windows"], state["world"]) != (self.n_windows, self.world):
            raise ValueError(f"the checkpoint's data position is for {state['n_windows']} windows over "
                             f"{state['world']} processes; this run has {self.n_windows} over {self.world}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_starts(n_tokens: int, seq_len: int, max_windows: int = 0) -> list[int]:
    """Offsets of the non-overlapping evaluation windows: all of them, or ``max_windows``
    evenly spaced ones (the same every time)."""
    n = num_windows(n_tokens, seq_len)
    if n == 0:
        raise ValueError(f"an evaluation split of {n_tokens} tokens holds no window of {seq_len}+1 tokens")
    if not max_windows or max_windows >= n:
        return [i * seq_len for i in range(n)]
    return [i * seq_len for i in sorted(set(np.linspace(0, n - 1, max_windows).round().astype(int).tolist()))]
