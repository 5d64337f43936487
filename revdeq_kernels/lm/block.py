"""The transformer block the language model iterates, with a key/value cache path.

``Block(z, x)`` is the DEQ's ``f(z, x)`` (pre-LayerNorm, input injection into attention):

    z = z + Dropout(Attn(LN1(z + x)))          causal multi-head self-attention
    z = z + Dropout(MLP(LN2(z)))               Linear -> GELU -> Linear, hidden = mlp_ratio * d

Dropout is plain ``nn.Dropout``: the core reseeds every evaluation of f, so its reverse
pass replays each evaluation's mask exactly.

For incremental decoding, ``Block(z, x, past=cache)`` attends from the new positions in
``z`` to the cached keys/values of earlier positions followed by their own; ``kv(z, x)``
gives the keys/values a state contributes, to be appended to the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Preallocated keys/values [B, H, capacity, head_dim] of the positions seen so far."""

    def __init__(self, batch: int, n_heads: int, capacity: int, head_dim: int, *, dtype, device):
        shape = (batch, n_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot append {n} to {self.length}")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n

    def view(self) -> tuple[Tensor, Tensor]:
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, t: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, hd]
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(self, h: Tensor, past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, D = h.shape
        q, k, v = self.project(h)
        if past is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past_k, past_v = past
            P = past_k.shape[2]
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
            if T == 1:  # the newest position sees everything
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # query i (absolute position P + i) sees keys 0 .. P + i
                mask = torch.ones(T, P + T, dtype=torch.bool, device=h.device).tril(diagonal=P)
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

    def forward(self, z: Tensor, x: Tensor, past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        z = z + self.drop(self.attn(self.ln1(z + x), past))
        return z + self.drop(self.mlp(self.ln2(z)))

    def kv(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values [B, H, T, hd] that the states ``z`` (with input ``x``) expose
        to later positions: exactly those ``forward(z, x)`` attends with."""
        _, k, v = self.attn.project(self.ln1(z + x))
        return k, v


class CachedBlock(nn.Module):
    """``f(z, x)`` for the new positions only, attending to a fixed cache of earlier ones."""

    def __init__(self, block: Block, cache: KVCache):
        super().__init__()
        self.block = block
        self.cache = cache

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.block(z, x, self.cache.view())
