"""The transformer blocks the language model iterates, and its key/value cache.

Each block is a DEQ's ``f(z, x)`` (``BLOCKS``, the config key ``block``); the sublayers are
causal multi-head self-attention (Attn) and Linear -> GELU -> Linear (MLP, hidden =
mlp_ratio * d):

    residual  z + Attn(LN1(z + x)), then + MLP(LN2(.))     the original RevDEQ block: no fixed point
    normed    h = z + Attn(LN1(z) + LNx(x)); LN3(h + MLP(LN2(h)))       the default: bounded range
    postln    h = LN1(z + Attn(z + x)); LN2(h + MLP(h))                  Bai et al.'s DEQ-Transformer
    anchored  h = x + Attn(LN1(z + x)); h + MLP(LN2(h))                  stream restarts from x
    direct    h = Attn(LN1(z + x)); h + MLP(LN2(h))                      f(0, x) = one explicit layer

docs/lm.md, "Which block has an equilibrium", gives what each one measured.

Dropout is plain ``nn.Dropout``: the core seeds every evaluation of f from one seed per
solve (config ``rng``), so each solve iterates one block with one set of masks, and its
reverse pass replays them exactly.

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

    Two kinds for a DEQ. ``per-evaluation``: a solve evaluates the block 1 + 2 * steps
    times, and level l holds what evaluation l of the earlier positions exposed (their
    l-th iterate), so a new position's evaluation l attends to exactly what it would see
    in a solve of the whole sequence, converged or not. ``equilibrium``: one level, the
    keys/values of each position's final state; exact at a converged fixed point (then
    every iterate is the equilibrium) and 1 + 2 * steps times smaller. An explicit layer
    has one level."""

    def __init__(self, levels: int, batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype, device,
                 kind: str = "per-evaluation"):
        self.kind = kind
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
        """Append the new positions' keys/values of each evaluation: level l gets evaluation
        l's. The last level always gets the final evaluation's (so a one-level cache holds
        the final states', and a solve that stopped early fills its remaining levels with
        them)."""
        n = per_level[0][0].shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot append {n} to {self.length}")
        last = len(per_level) - 1
        for level in range(self.levels):
            k, v = per_level[min(level, last) if level < self.levels - 1 else last]
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
    """``f(z, x)``, ``block=residual``: one pre-LN transformer block with the input injected
    into attention, as in the original RevDEQ code. Its output is ``z + g(z, x)``, so a
    fixed point needs ``g = 0``, which training never approaches."""

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


class PostLNBlock(Block):
    """``f(z, x)``, ``block=postln``: the DEQ-Transformer form of Bai et al. (2019),
    post-LayerNorm, so every output is normalised and the map has a bounded range:

        h = LN1(z + Attn(z + x));   f = LN2(h + MLP(h))"""

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                kv_out: list | None = None) -> Tensor:
        h = self.ln1(z + self.drop(self.attn(z + x, past, kv_out)))
        return self.ln2(h + self.drop(self.mlp(h)))


class NormedBlock(Block):
    """``f(z, x)``, ``block=normed``: a residual block with a normalised output and a
    normalised injection:

        h = z + Attn(LN1(z) + LNx(x));   f = LN3(h + MLP(LN2(h)))

    The output LayerNorm bounds f's range, so the state cannot grow with the steps as the
    residual block's does; ``LNx`` keeps the input's share of attention's input at the
    state's scale (a raw embedding, ~0.03 per element, would be lost next to a unit-scale
    state after the first evaluation). At ``z = 0``, ``f`` is one explicit layer, normalised."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__(d_model, n_heads, mlp_hidden, dropout)
        self.ln_x = nn.LayerNorm(d_model)
        self.ln3 = nn.LayerNorm(d_model)

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                kv_out: list | None = None) -> Tensor:
        h = z + self.drop(self.attn(self.ln1(z) + self.ln_x(x), past, kv_out))
        return self.ln3(h + self.drop(self.mlp(self.ln2(h))))


class AnchoredBlock(Block):
    """``f(z, x)``, ``block=anchored``: the residual stream of every evaluation starts from the
    input ``x``; the state ``z`` enters only through what attention reads:

        h = x + Attn(LN1(z + x));   f = h + MLP(LN2(h))

    So ``f(0, x)`` is one explicit layer, and ``z`` reaches ``f`` through a LayerNorm and the
    attention weights only, not through an identity path: f's Jacobian in z is small at
    initialisation (contractive), not the identity plus a correction."""

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                kv_out: list | None = None) -> Tensor:
        h = x + self.drop(self.attn(self.ln1(z + x), past, kv_out))
        return h + self.drop(self.mlp(self.ln2(h)))


class DirectBlock(Block):
    """``f(z, x)``, ``block=direct``: one explicit layer's output, reading ``z + x``:

        h = Attn(LN1(z + x));   f = h + MLP(LN2(h))

    No identity path in z or x: ``f(0, x)`` is exactly ``method=explicit n_layers=1``, and
    f's Jacobian in z passes through a LayerNorm and the attention weights only."""

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                kv_out: list | None = None) -> Tensor:
        h = self.drop(self.attn(self.ln1(z + x), past, kv_out))
        return h + self.drop(self.mlp(self.ln2(h)))


BLOCKS = {"residual": Block, "postln": PostLNBlock, "normed": NormedBlock, "anchored": AnchoredBlock,
          "direct": DirectBlock}


class CachedSolveBlock(nn.Module):
    """``f(z, x)`` for a DEQ solve over new positions after the cached ones.

    The core evaluates f in a documented order: z_0, then y_1, z_1, y_2, z_2, ...; call l
    is evaluation l. It attends to level l of ``cache`` (nothing when there is none yet)
    and its own keys/values are collected in ``recorded[l]`` for the cache. ``last_input``
    is the state of the last evaluation, whose keys/values are ``recorded[-1]``."""

    def __init__(self, block: Block, cache: KVCache | None):
        super().__init__()
        self.block, self.cache = block, cache
        self.recorded: list[tuple[Tensor, Tensor]] = []
        self.last_input: Tensor | None = None

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.last_input = z
        past = self.cache.view(len(self.recorded)) if self.cache is not None and self.cache.length else None
        return self.block(z, x, past, self.recorded)
