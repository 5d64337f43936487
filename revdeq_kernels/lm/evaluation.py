"""Perplexity and DEQ solver statistics over non-overlapping windows of a split."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batches import eval_starts, window_batch
from .config import LMConfig
from .model import TransformerLM
from .runtime import Dist, autocast_for


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, cfg: LMConfig, device: torch.device, *,
             max_windows: int = 0, batch_size: int | None = None, ddp: Dist | None = None) -> dict:
    """Mean cross-entropy (nats/token) and perplexity over all windows of ``tokens`` or
    ``max_windows`` evenly spaced ones, sharded over the ranks; for a DEQ also the mean/max
    solver steps and residual per batch. Runs under a forked RNG, so evaluating does not
    change the training run's random stream."""
    ddp = ddp or Dist()
    batch_size = batch_size or cfg.batch_size
    starts = eval_starts(len(tokens), cfg.seq_len, max_windows)[ddp.rank::ddp.world]
    # sums: loss, tokens, batches, solver steps, residual; maxima: solver steps, residual
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    maxima = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, len(starts), batch_size):
            x, y = (t.to(device) for t in window_batch(tokens, starts[i:i + batch_size], cfg.seq_len))
            with autocast_for(cfg, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            stats = model.last_stats
            steps, residual = (stats.steps, stats.max_residual) if stats is not None else (0, 0.0)
            sums += torch.tensor([float(loss), y.numel(), 1, steps, residual], dtype=torch.float64, device=device)
            maxima = torch.maximum(maxima, torch.tensor([steps, residual], dtype=torch.float64, device=device))
    model.train(was_training)
    if ddp.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    loss_sum, n_tokens, n_batches, steps_sum, residual_sum = sums.tolist()
    loss = loss_sum / n_tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n_tokens)}
    if model.is_deq:
        out.update(solver_steps_mean=steps_sum / n_batches, solver_steps_max=int(maxima[0]),
                   residual_mean=residual_sum / n_batches, residual_max=float(maxima[1]))
    return out
