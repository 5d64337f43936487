"""Exactness on blocks with structure: a residual cross-attention block given its memory as a
context keyword, and a two-resolution residual conv block (GroupNorm) with a tuple state.

`python bench/structured_f.py` prints, for each block, the relative gradient error of the
reversible backward (exact and float reversal) against autograd through the unrolled
iteration in the same dtype (same weights and inputs), and the reconstruction error the
backward reports. Gradients are those of every parameter, the context's encoder included.
"""

from __future__ import annotations

import platform
import warnings

import torch
from torch import nn

import revdeq_kernels as rk


class CrossAttentionBlock(nn.Module):
    """z + self-attention + cross-attention to ``memory`` + MLP, pre-LayerNorm: expansive."""

    def __init__(self, width: int = 64, heads: int = 4):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, z, x, memory):
        h = self.ln1(z + x)
        z = z + self.self_attn(h, h, h, need_weights=False)[0]
        z = z + self.cross_attn(self.ln2(z), memory, memory, need_weights=False)[0]
        return z + self.mlp(self.ln3(z))


class TwoResolution(nn.Module):
    """MDEQ's shape: a fine and a coarse state, each residual, each mixing in the other."""

    def __init__(self, channels: int = 8):
        super().__init__()
        c = channels
        self.fine, self.coarse = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.down, self.up = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.norm_fine, self.norm_coarse = nn.GroupNorm(4, c), nn.GroupNorm(4, 2 * c)

    def forward(self, z, x):
        (z1, z2), (x1, x2) = z, x
        return (z1 + self.norm_fine(torch.relu(self.fine(z1) + self.up(z2) + x1)),
                z2 + self.norm_coarse(torch.relu(self.coarse(z2) + self.down(z1) + x2)))


def gradients(block: str, dtype: torch.dtype, **settings):
    torch.manual_seed(1)  # the same weights and inputs in every dtype: drawn in float64, then cast
    deq_settings = dict(beta=0.8, max_steps=16, tol=0, **settings)
    if block == "cross-attention":
        f, encoder = CrossAttentionBlock().double(), nn.Linear(64, 64).double()
        x, source = 0.5 * torch.randn(4, 16, 64, dtype=torch.float64), torch.randn(4, 12, 64, dtype=torch.float64)
        f, encoder, x, source = f.to(dtype), encoder.to(dtype), x.to(dtype), source.to(dtype)
        deq = rk.ReversibleDEQ(f, **deq_settings)
        loss = deq(x, memory=encoder(source)).square().mean()
        tensors = [*f.parameters(), *encoder.parameters()]
    else:
        f = TwoResolution().double().to(dtype)
        x = tuple(torch.randn(shape, dtype=torch.float64).to(dtype) for shape in ((2, 8, 16, 16), (2, 16, 8, 8)))
        deq = rk.ReversibleDEQ(f, **deq_settings)
        loss = sum(z.square().mean() for z in deq(x))
        tensors = list(f.parameters())
    grads = torch.autograd.grad(loss, tensors)
    return torch.cat([g.flatten().double() for g in grads]), deq.last_stats


def main() -> None:
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}; beta 0.8, 16 steps")
    print("| block | dtype | reversal | grad err vs unrolled (same dtype) | reconstruction error |")
    print("|---|---|---|---:|---:|")
    for block in ("cross-attention", "two-resolution"):
        for dtype in (torch.float64, torch.float32):
            truth, _ = gradients(block, dtype, adjoint="unrolled")
            for reversal in ("exact", "float"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the float reversal's drift warning: measured here
                    grads, stats = gradients(block, dtype, reversal=reversal)
                error = float((grads - truth).norm() / truth.norm())
                print(f"| {block} | {str(dtype).removeprefix('torch.')} | {reversal} | {error:.2e} | "
                      f"{stats.reconstruction_error:.3g} |")


if __name__ == "__main__":
    main()
