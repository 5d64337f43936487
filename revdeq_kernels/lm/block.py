"""The transformer block the language model iterates, and its key/value cache.

``Block(z, x)`` is the DEQ's ``f(z, x)`` (pre-LayerNorm, input injected into attention):

    z = z + Dropout(Attn(LN1(z + x)))          causal multi-head self-attention
    z = z + Dropout(MLP(LN2(z)))               Linear -> GELU -> Linear, hidden = mlp_ratio * d

Dropout is plain ``nn.Dropout``: the core reseeds every evaluation of f, so its reverse
pass replays each evaluation's mask exactly.

Incremental decoding: ``Block(z, x, past=(k, v))`` attends from the new positions in ``z``
to the cached keys/values of earlier positions, then to their own; ``kv_out`` collects the
keys/values the new positions expose, to be appended to the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_weights_(module: nn.Module, residual_depth: int) -> None:
    """GPT-2's initialisation, in place: N(0, 0.02) for every matrix, zero biases, and the
    residual branches' output projections scaled by 1/sqrt(2 * residual_depth), where
    residual_depth counts the block evaluations on the residual path (so the residual
    stream's variance does not grow with depth)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * residual_depth) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class KVCache:
    """Keys/values [levels, B, H, capacity, head_dim] of the positions seen so far.

    A DEQ solve evaluates the block 1 + 2 * steps times; level l holds what evaluation l
    of the earlier positions exposed (their l-th iterate), so a new position's evaluation
    l can attend to exactly what it would see in a solve of the whole sequence. An
    explicit layer has one level."""

    def __init__(self, levels: int, batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype, device):
        shape = (levels, batch, n_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def levels(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def view(self, level: int) -> tuple[Tensor, Tensor]:
        """The cached keys/values of ``level`` (the last level for any level past it)."""
        level = min(level, self.levels - 1)
        return self.k[level, :, :, :self.length], self.v[level, :, :, :self.length]

    def append(self, per_level: list[tuple[Tensor, Tensor]]) -> None:
        """Append the new positions' keys/values of each level; a solve that stopped early
        (fewer evaluations than levels) fills the remaining levels with its final state's."""
        n = per_level[0][0].shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot append {n} to {self.length}")
        for level in range(self.levels):
            k, v = per_level[min(level, len(per_level) - 1)]
            self.k[level, :, :, self.length:self.length + n] = k
            self.v[level, :, :, self.length:self.length + n] = v
        self.length += n


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor, past: tuple[Tensor, Tensor] | None = None, kv_out: list | None = None) -> Tensor:
        B, T, D = h.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        if kv_out is not None:
            kv_out.append((k, v))
        if past is None or past[0].shape[2] == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            P = past[0].shape[2]
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
            # query i (absolute position P + i) sees keys 0 .. P + i; the newest sees all
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=h.device).tril(diagonal=P)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, d_model)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(h)))


class Block(nn.Module):
    """``f(z, x)``: one pre-LN transformer block with the input injected into attention."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                kv_out: list | None = None) -> Tensor:
        z = z + self.drop(self.attn(self.ln1(z + x), past, kv_out))
        return z + self.drop(self.mlp(self.ln2(z)))


class CachedSolveBlock(nn.Module):
    """``f(z, x)`` for a DEQ solve over new positions after the cached ones.

    The core evaluates f in a documented order: z_0, then y_1, z_1, y_2, z_2, ...; call l
    is evaluation l. It attends to level l of ``cache`` (nothing when the cache is empty)
    and its own keys/values are collected in ``recorded[l]`` for the cache."""

    def __init__(self, block: Block, cache: KVCache):
        super().__init__()
        self.block, self.cache = block, cache
        self.recorded: list[tuple[Tensor, Tensor]] = []

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        past = self.cache.view(len(self.recorded)) if self.cache.length else None
        return self.block(z, x, past, self.recorded)
