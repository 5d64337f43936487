"""How far the reversible adjoint's gradient is from autograd through the same iteration.

The reversible backward rebuilds the forward's states instead of storing them; with
``reversal=float`` the rebuilt states drift on an expansive block, and so does the
gradient. This measures the drift on a trained model, in the user's own setting: one
batch, the model's own dropout masks (replayed identically in both passes), its autocast,
its ``tol`` and its states' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import LMConfig
from .model import TransformerLM, compute_loss
from .runtime import autocast_for


def _parameter_gradients(model: TransformerLM, x: Tensor, y: Tensor, cfg: LMConfig, seed: int) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same dropout masks and solver seeds in both passes
        with autocast_for(cfg, x.device):
            loss = compute_loss(model, x, y)[1]  # the objective training differentiates, penalties included
        # autograd.grad, not backward: the model's .grad (and a DDP wrapper's hooks) stay untouched
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(grads, params)])


def adjoint_gradient_error(model: TransformerLM, x: Tensor, y: Tensor, cfg: LMConfig, seed: int = 0) -> float:
    """||g_reversible - g_unrolled|| / ||g_unrolled|| over all parameters, on batch (x, y), of
    the training objective when the model is in training mode (the loss, the penalties at z*
    and ``state_loss``'s intermediate states), else of the loss.

    The unrolled pass runs the same iteration (same beta, steps, tol, state dtype) with
    autograd through every step; with ``reversal=exact`` the two forwards differ only by
    the fixed-point format's rounding (2^-frac_bits), so a float32 model agrees to ~1e-6."""
    if cfg.method != "reversible":
        raise ValueError(f"the adjoint check compares method=reversible with unrolled; this model is {cfg.method}")
    reversible_grad = _parameter_gradients(model, x, y, cfg, seed)
    with model.solver_settings(adjoint="unrolled", reversal=None, checkpoint_every=None):
        unrolled_grad = _parameter_gradients(model, x, y, cfg, seed)
    return float((reversible_grad - unrolled_grad).norm() / unrolled_grad.norm().clamp_min(1e-300))
