"""Perplexity and DEQ solver statistics over non-overlapping windows of a split."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..convergence import NOT_A_FIXED_POINT
from ..jacobian import fixed_point_gaps, iteration_rate, spectral_radius
from .batches import eval_starts, window_batch
from .config import LMConfig
from .model import TransformerLM
from .runtime import Dist, autocast_for


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, cfg: LMConfig, device: torch.device, *,
             max_windows: int = 0, batch_size: int | None = None, ddp: Dist | None = None) -> dict:
    """Mean cross-entropy (nats/token) and perplexity over all windows of ``tokens`` or
    ``max_windows`` evenly spaced ones, sharded over the ranks; for a DEQ also the mean/max
    over batches of the solver steps, of the worst relative residual and of the worst
    absolute one (the RMS of ``f(z*) - z*`` over a sequence's elements), and, for the
    reversible iteration, how many windows it left at a 2-cycle of f (its stats'
    ``at_two_cycle``). Runs under a forked RNG, so evaluating does not change the training
    run's random stream."""
    ddp = ddp or Dist()
    batch_size = batch_size or cfg.batch_size
    all_starts = eval_starts(len(tokens), cfg.seq_len, max_windows)
    starts = all_starts[ddp.rank::ddp.world]
    # sums: loss, tokens, batches, 2-cycle windows, solver steps, residual, absolute residual;
    # maxima: the last three
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    maxima = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, len(starts), batch_size):
            x, y = (t.to(device) for t in window_batch(tokens, starts[i:i + batch_size], cfg.seq_len))
            with autocast_for(cfg, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            stats = model.last_stats
            solver, cycles = [0.0, 0.0, 0.0], 0
            if stats is not None:  # the absolute residual as an RMS over a sequence's elements
                solver = [stats.steps, stats.max_residual, stats.max_abs_residual / math.sqrt(x.shape[1] * cfg.d_model)]
                cycles = int(stats.at_two_cycle.sum()) if stats.at_two_cycle is not None else 0
            sums += torch.tensor([float(loss), y.numel(), 1, cycles, *solver], dtype=torch.float64, device=device)
            maxima = torch.maximum(maxima, torch.tensor(solver, dtype=torch.float64, device=device))
    model.train(was_training)
    if ddp.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    loss_sum, n_tokens, n_batches, cycles, steps_sum, residual_sum, abs_sum = sums.tolist()
    loss = loss_sum / n_tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n_tokens), "windows": len(all_starts)}
    if model.is_deq:
        out.update(solver_steps_mean=steps_sum / n_batches, solver_steps_max=int(maxima[0]),
                   residual_mean=residual_sum / n_batches, residual_max=float(maxima[1]),
                   abs_residual_mean=abs_sum / n_batches, abs_residual_max=float(maxima[2]),
                   windows_at_two_cycle=int(cycles))
    return out


def evaluate_depths(model: TransformerLM, tokens, cfg: LMConfig, device: torch.device, depths: list[int], *,
                    max_windows: int = 0, ddp: Dist | None = None) -> list[dict]:
    """:func:`evaluate` at each number of solver steps in ``depths``, with ``tol=0`` so that
    every solve runs exactly that many steps: a DEQ's promise is that more steps at
    inference do not hurt. The model's own settings are restored afterwards."""
    rows = []
    for steps in depths:
        with model.solver_settings(max_steps=steps, tol=0.0):
            rows.append({"steps": steps, **evaluate(model, tokens, cfg, device, max_windows=max_windows, ddp=ddp)})
    return rows


def equilibrium_stability(model: TransformerLM, tokens, cfg: LMConfig, device: torch.device, windows: int,
                          *, batch_size: int | None = None) -> dict:
    """At the solution z* of each of ``windows`` evenly spaced windows (float32, no
    autocast): the spectral radius of the block's Jacobian df/dz (``rk.spectral_radius``),
    and, where the model solves with the reversible iteration, that iteration's rate
    (``rk.iteration_rate``: below 1, it converges to z* and stays there). Each as mean, max
    and the fraction of windows at 1 or above; and how many windows' z* is not a fixed point
    of f (relative residual above ``NOT_A_FIXED_POINT``), and how many of those rest at a
    2-cycle of f (``rk.fixed_point_gaps``), where neither estimate describes an
    equilibrium. Runs under a forked RNG, in eval mode."""
    if not model.is_deq:
        raise ValueError("the spectral radius is of a DEQ's block at its solution; this model is explicit")
    batch_size = batch_size or cfg.batch_size
    starts = eval_starts(len(tokens), cfg.seq_len, windows)
    reversible = model.deq.settings.solver == "reversible"
    measured = {"spectral_radius": [], **({"iteration_rate": []} if reversible else {})}
    residuals, cycle_gaps, two_cycles = [], [], []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, len(starts), batch_size):
            idx, _ = (t.to(device) for t in window_batch(tokens, starts[i:i + batch_size], cfg.seq_len))
            with torch.no_grad():
                z, x = model.solution(idx)
                z, x = z.float(), x.float()
                gaps = fixed_point_gaps(model.deq.f, z, x)
            residuals.append(gaps.residual)
            cycle_gaps.append(gaps.cycle_gap)
            two_cycles.append(gaps.at_two_cycle)
            measured["spectral_radius"].append(spectral_radius(model.deq.f, z, x))
            if reversible:
                measured["iteration_rate"].append(iteration_rate(model.deq.f, z, x, beta=model.deq.settings.beta))
    model.train(was_training)
    residual, cycle_gap = torch.cat(residuals).double(), torch.cat(cycle_gaps).double()
    unconverged = residual > NOT_A_FIXED_POINT
    two_cycle = torch.cat(two_cycles)
    result = {"spectral_radius_windows": len(starts), "not_fixed_point_windows": int(unconverged.sum()),
              "two_cycle_windows": int(two_cycle.sum()),
              "two_cycle_gap_max": float(cycle_gap[two_cycle].max()) if two_cycle.any() else None,
              "two_cycle_residuals": residual[two_cycle].tolist()}
    for name, values in measured.items():
        values = torch.cat(values).double()
        result |= {f"{name}_mean": float(values.mean()), f"{name}_max": float(values.max()),
                   f"{name}_at_least_1": float((values >= 1).double().mean())}
    return result
