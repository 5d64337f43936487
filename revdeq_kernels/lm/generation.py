"""Sampling, with incremental decoding through a key/value cache.

Full recomputation re-solves the whole context for every new token. The cached path
solves the prompt once, keeps the earlier positions' keys/values, and for each new token
solves only that position's fixed point: a [B, 1, D] DEQ whose block attends to the cache
(``TransformerLM.decode_step``). Causal attention makes an earlier position's states
independent of later tokens, so the cache stays valid.

Which keys/values (``cache=``): ``per-evaluation`` keeps every evaluation's, so the cached
solve is the full solve's computation for the new position, up to rounding, converged or
not; ``equilibrium`` keeps only the final states', one level, exact to the solver's
``tol`` at a converged fixed point; ``auto`` (default) takes the equilibrium cache when the
prompt's solve met ``tol`` (always, for method=broyden, whose steps couple the positions).
:func:`cache_parity` measures the gap to full recomputation.
For the explicit model the cache is exact.

Contexts longer than ``seq_len``: full recomputation slides the window one token at a
time; the cached path, when its cache is full, re-solves the last ``seq_len // 2`` tokens
and continues from there (so past ``seq_len`` tokens the two paths differ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import TransformerLM


def sample_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k, then
    nucleus (top-p) filtering of the temperature-scaled distribution, then a draw."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got temperature={temperature}, "
                         f"top_p={top_p}, top_k={top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    ids: Tensor                  # [B, prompt + new]
    new_tokens: int
    seconds: float
    cached: bool
    cache_kind: str = "none"     # equilibrium | per-evaluation | explicit | none (full recomputation)
    solver_steps: list[int] = field(default_factory=list)  # per solve (DEQ)
    iteration_fallbacks: int = 0  # inference_solver solves that missed tol, redone by the iteration

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens * self.ids.shape[0] / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def generate(model: TransformerLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
             cache: str = "auto") -> Generation:
    """Append ``max_new_tokens`` sampled tokens to ``prompt`` [B, T >= 1]. The same seed
    gives the same tokens; without one, the draw comes from torch's global generator.
    ``cache``: which cache the DEQ keeps (see the module's docstring)."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    generator = torch.Generator(device=prompt.device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    seq_len, ids, steps, kind = model.cfg.seq_len, prompt, [], "none"
    fallbacks_before = model.iteration_fallbacks

    def record_steps():
        if model.last_stats is not None:
            steps.append(model.last_stats.steps)

    t0 = time.perf_counter()
    if use_cache and max_new_tokens > 0:
        logits, caches = model.prefill(ids[:, -seq_len:], cache)
        kind = caches[0].kind
        record_steps()
        for i in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, top_p, generator)
            ids = torch.cat([ids, token[:, None]], dim=1)
            if i == max_new_tokens - 1:
                break
            if caches[0].length == seq_len:  # window full: re-solve the last half, continue
                logits, caches = model.prefill(ids[:, -(seq_len // 2):], kind if kind != "explicit" else "auto")
            else:
                logits = model.decode_step(token, caches)
            record_steps()
    else:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -seq_len:])[:, -1]
            record_steps()
            ids = torch.cat([ids, sample_token(logits, temperature, top_k, top_p, generator)[:, None]], dim=1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    return Generation(ids, max_new_tokens, time.perf_counter() - t0, use_cache, kind, steps,
                      model.iteration_fallbacks - fallbacks_before)


@torch.no_grad()
def prefix_distributions(model: TransformerLM, ids: Tensor, prompt_len: int,
                         cache: str = "auto") -> list[tuple[Tensor, Tensor]]:
    """For each prefix of ``ids`` [B, T <= seq_len] from ``prompt_len`` tokens on, the
    next-token distributions (float64) of the cached path (prefill, then one decode step per
    token of ``ids``) and of a full solve of the prefix."""
    if not 1 <= prompt_len <= ids.shape[1] <= model.cfg.seq_len:
        raise ValueError(f"need 1 <= prompt_len={prompt_len} <= length={ids.shape[1]} <= seq_len={model.cfg.seq_len}")
    model.eval()
    logits, caches = model.prefill(ids[:, :prompt_len], cache)
    pairs = []
    for t in range(prompt_len, ids.shape[1] + 1):
        # in float64: float32 would hide a float64 model's gaps below ~1e-9 (its rounding of p)
        pairs.append((logits.double().softmax(-1), model(ids[:, :t])[:, -1].double().softmax(-1)))
        if t < ids.shape[1]:
            logits = model.decode_step(ids[:, t], caches)
    return pairs


def cache_parity(model: TransformerLM, ids: Tensor, prompt_len: int, cache: str = "auto") -> float:
    """Max |p_cached - p_full| over the next-token distributions after each prefix of
    ``ids`` from ``prompt_len`` tokens on (``prefix_distributions``)."""
    return max(float((cached - full).abs().max()) for cached, full in prefix_distributions(model, ids, prompt_len, cache))
