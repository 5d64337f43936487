"""The language model: embeddings -> equilibrium of one weight-tied block (or an explicit
stack of blocks) -> final LayerNorm -> LM head.

``method="reversible"`` / ``"unrolled"``: ``z* = ReversibleDEQ(Block)(x)`` with the exact
reversible adjoint (memory flat in steps) or autograd through every step.
``method="explicit"``: ``z = 0; z = Block_l(z, x)`` for l = 1..n_layers, separate weights:
the same block, with the same input injection and starting state, without tying or
relaxation, for comparison.

The LM head shares its weight with the token embedding when ``tie_embeddings`` (default).
Only the public core API is used: ``rk.ReversibleDEQ`` and ``rk.solve``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revdeq_kernels as rk

from .block import Block, CachedSolveBlock, KVCache, init_weights_
from .config import LMConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def state_dtype_of(cfg: LMConfig) -> torch.dtype | None:
    return _DTYPES[cfg.state_dtype] if cfg.state_dtype else None


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        make_block = lambda: Block(cfg.d_model, cfg.n_heads, cfg.mlp_hidden, cfg.dropout)  # noqa: E731
        if self.is_deq:
            self.deq = rk.ReversibleDEQ(
                make_block(), beta=cfg.beta, max_steps=cfg.max_steps, tol=cfg.tol,
                state_dtype=state_dtype_of(cfg), backend=cfg.backend, adjoint=cfg.method,
                reversal=cfg.reversal if cfg.method == "reversible" else None,
                # a non-finite state gives a non-finite loss, which the training loop
                # turns into a clean stop on every rank (an exception on one rank would
                # leave the others waiting in an all-reduce)
                on_nonfinite="warn",
            )
        else:
            self.blocks = nn.ModuleList(make_block() for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.last_stats: rk.SolverStats | None = None
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @property
    def is_deq(self) -> bool:
        return self.cfg.method in ("reversible", "unrolled")

    def _init_weights(self) -> None:
        # Block evaluations on the residual path: 2 per DEQ step, 1 per explicit layer.
        init_weights_(self, 2 * self.cfg.max_steps if self.is_deq else self.cfg.n_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- full forward ---------------------------------------------------------------
    def embed(self, idx: Tensor, start: int = 0) -> Tensor:
        T = idx.shape[1]
        if start + T > self.cfg.seq_len:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed seq_len={self.cfg.seq_len} "
                "(the model has learned position embeddings for seq_len positions)"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

    def hidden(self, idx: Tensor) -> Tensor:
        """Final states [B, T, D] before the final LayerNorm."""
        x = self.embed(idx)
        if self.is_deq:
            z = self.deq(x).to(x.dtype)
            self.last_stats = self.deq.last_stats
            return z
        z = torch.zeros_like(x)
        for block in self.blocks:
            z = block(z, x)
        return z

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        """Logits [B, T, V]; with ``targets`` also the mean cross-entropy."""
        logits = self.head(self.ln_f(self.hidden(idx)))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    # --- incremental decoding ---------------------------------------------------------
    def new_caches(self, batch: int, dtype: torch.dtype, device) -> list[KVCache]:
        """Empty caches: one per explicit layer, or one with a level per DEQ evaluation."""
        heads, head_dim = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        levels, count = (1 + 2 * self.deq.settings.max_steps, 1) if self.is_deq else (1, len(self.blocks))
        return [KVCache(levels, batch, heads, self.cfg.seq_len, head_dim, dtype=dtype, device=device)
                for _ in range(count)]

    @torch.no_grad()
    def prefill(self, idx: Tensor) -> tuple[Tensor, list[KVCache]]:
        """Solve the prompt once; returns the last position's logits [B, V] and the caches."""
        x = self.embed(idx)
        caches = self.new_caches(idx.shape[0], x.dtype, x.device)
        return self.head(self.ln_f(self._extend(x, caches)[:, -1])), caches

    @torch.no_grad()
    def decode_step(self, token: Tensor, caches: list[KVCache]) -> Tensor:
        """Append ``token`` [B] at the next position; returns its logits [B, V].

        DEQ: solves only the new position's fixed point, on a [B, 1, D] state, each
        evaluation attending to the cached keys/values of the earlier positions' iterate
        of the same evaluation. Causal attention means those never depend on later
        tokens, so this is the computation a solve of the whole sequence does for the last
        position (the same steps: exactly, up to rounding)."""
        x = self.embed(token[:, None], start=caches[0].length)
        return self.head(self.ln_f(self._extend(x, caches)[:, -1]))

    def _extend(self, x: Tensor, caches: list[KVCache]) -> Tensor:
        """Final states of the new positions ``x`` [B, T, D] after the cached ones; their
        keys/values are appended to the caches."""
        if self.is_deq:
            f = CachedSolveBlock(self.deq.f, caches[0])
            solution = rk.solve(f, x, settings=self.deq.settings, on_nonfinite="raise")
            self.last_stats = solution.stats
            caches[0].append(f.recorded)
            return solution.z.to(x.dtype)
        z = torch.zeros_like(x)
        for block, cache in zip(self.blocks, caches):
            recorded: list = []
            z = block(z, x, cache.view(0) if cache.length else None, recorded)
            cache.append(recorded)
        return z
