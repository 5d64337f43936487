"""Anderson acceleration (type II, Walker & Ni 2011), with a window of m past states.

With X = the last k <= m states, G = g(X) their images and R = G - X their residuals,
each step solves, per sample, the regularised least-squares problem

    min_alpha || sum_i alpha_i R_i ||^2 + lam * s * ||alpha||^2   subject to  sum_i alpha_i = 1

(s = the mean of ||R_i||^2, so lam is scale-free) as the bordered linear system
[[0, 1^T], [1, R R^T + lam s I]] [nu; alpha] = [1; 0], and moves to

    z_new = b * sum_i alpha_i G_i + (1-b) * sum_i alpha_i X_i.

A sample whose system is singular or gives a non-finite alpha (lam = 0 with repeated
states, or an exactly converged sample where R = 0) takes the relaxed step
(1-b) z + b g(z) instead; the other samples still get the Anderson step. Costs one
evaluation of g per step, like the fixed-point iteration, plus O(k * size) arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..convergence import ConvergenceMonitor
from ..ops.reference import accumulation_dtype, rows
from .fixed_point import Evaluate, Visit, residual_sums


def mixing_weights(residuals: Tensor, lam: float) -> Tensor:
    """alpha [B, k] for residuals R [B, k, n]; singular samples get the last state's weight 1."""
    batch, k, _ = residuals.shape
    gram = residuals @ residuals.transpose(1, 2)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    system = gram.new_zeros(batch, k + 1, k + 1)
    system[:, 0, 1:] = 1.0
    system[:, 1:, 0] = 1.0
    system[:, 1:, 1:] = gram + (lam * scale)[:, None, None] * eye
    rhs = gram.new_zeros(batch, k + 1, 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(system.detach(), rhs)
    singular = (info != 0) | ~torch.isfinite(solution).all(dim=(1, 2))
    if system.requires_grad:
        # Solve again on the graph, with the singular samples' systems swapped for the
        # identity: their (discarded) solution must not put NaN into the backward pass.
        safe = torch.eye(k + 1, dtype=gram.dtype, device=gram.device).expand_as(system)
        solution = torch.linalg.solve(torch.where(singular[:, None, None], safe, system), rhs)
    last = torch.zeros(k, dtype=gram.dtype, device=gram.device)
    last[-1] = 1.0
    return torch.where(singular[:, None], last, solution[:, 1:, 0])


def anderson_step(states: list[Tensor], images: list[Tensor], beta: float, lam: float) -> Tensor:
    acc = accumulation_dtype(states[-1].dtype)
    X = torch.stack([rows(s).to(acc) for s in states], dim=1)
    G = torch.stack([rows(g).to(acc) for g in images], dim=1)
    alpha = mixing_weights(G - X, lam)[:, None, :]  # [B, 1, k]
    mixed = beta * (alpha @ G) + (1.0 - beta) * (alpha @ X)
    return mixed.reshape(states[-1].shape).to(states[-1].dtype)


def anderson_solve(problem, evaluate: Evaluate, start: Tensor, *, m: int, lam: float,
                   differentiable: bool = False, visit: Visit | None = None) -> Tensor:
    """Iterate from ``start`` (never mutated); returns z_steps. Same evaluation order,
    stop test and stats as ``fixed_point_solve``; the window holds m (state, image) pairs."""
    monitor = ConvergenceMonitor(problem)
    z = start
    g_z = evaluate(z, 0)
    states, images = [z], [g_z]
    steps = problem.max_steps
    for n in range(problem.max_steps):
        if n > 0 and monitor.converged(n, *residual_sums(problem, z, g_z)):
            steps = n
            break
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = anderson_step(states, images, problem.beta, lam)
        if visit is not None:
            visit(n + 1, z)
        g_z = evaluate(z, n + 1)
        states.append(z)
        images.append(g_z)
        if len(states) > m:
            del states[0], images[0]
    else:
        monitor.converged(steps, *residual_sums(problem, z, g_z))
    monitor.finish(steps)
    return z
