"""The language model: embeddings -> equilibrium of one weight-tied block (or an explicit
stack of blocks) -> final LayerNorm -> LM head.

``method="reversible"`` / ``"unrolled"`` / ``"implicit"`` / ``"phantom"``: ``z* = DEQ(f)(x)``,
solved by the reversible iteration, with the exact reversible adjoint (memory flat in
steps), autograd through every step, or the classic implicit and phantom gradients.
``method="broyden"``: the classic DEQ-Transformer recipe of locuslab/deq, Broyden's method
forward and for the implicit adjoint's solve, 2 * max_steps steps each (the same block
evaluations as the reversible iteration at max_steps).
``inference_solver="anderson"`` / ``"broyden"``: evaluation and generation solve for the
same fixed point with that solver instead of the training one, at the same block
evaluations (``2 * max_steps`` steps); training is unchanged.
``method="explicit"``: ``z = 0; z = Block_l(z, x)`` for l = 1..n_layers, separate weights:
the same block, with the same input injection and starting state, without tying or
relaxation, for comparison.

The LM head shares its weight with the token embedding when ``tie_embeddings`` (default).
Only the public core API is used: ``rk.DEQ`` and ``rk.solve``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revdeq_kernels as rk

from .block import BLOCKS, CachedSolveBlock, KVCache, init_weights_
from .config import CACHE_KINDS, LMConfig, broyden_settings
from .penalties import depth_penalty, jacobian_penalty, residual_penalty

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def supervised_steps(steps: int) -> tuple[int, ...]:
    """``state_loss``'s states: N/4, N/2 and 3N/4 (rounded down, distinct, at least 1, below N),
    then N itself, the solution."""
    return tuple(sorted({max(1, steps * q // 4) for q in (1, 2, 3)} - {steps})) + (steps,)


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
        make_block = lambda: BLOCKS[cfg.block](cfg.d_model, cfg.n_heads, cfg.mlp_hidden, cfg.dropout)  # noqa: E731
        if self.is_deq:
            self.deq = self._make_deq(make_block())
        else:
            self.blocks = nn.ModuleList(make_block() for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.last_stats: rk.SolverStats | None = None
        self.iteration_fallbacks = 0  # inference_solver solves that missed tol and were redone by the iteration
        self._inference: tuple | None = None  # (DEQ settings, the inference_settings() made from them)
        self.last_penalty: Tensor | None = None  # jac_reg, res_reg, depth_reg: the last training forward's penalty
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _make_deq(self, block: nn.Module) -> rk.DEQ:
        cfg = self.cfg
        # a non-finite state gives a non-finite loss, which the training loop turns into a
        # clean stop on every rank (an exception on one rank would leave the others waiting
        # in an all-reduce)
        common = dict(state_dtype=state_dtype_of(cfg), backend=cfg.backend, on_nonfinite="warn", rng=cfg.rng)
        if cfg.method == "broyden":
            return rk.DEQ(block, **broyden_settings(cfg), **common)
        # One solver for the other DEQ methods: the reversible iteration, so that they differ
        # in their gradient only.
        return rk.DEQ(block, solver="reversible", adjoint=cfg.method, beta=cfg.beta, max_steps=cfg.max_steps,
                      tol=cfg.tol, reversal=cfg.reversal if cfg.method == "reversible" else None,
                      checkpoint_every=cfg.checkpoint_every or None, **common)

    @property
    def is_deq(self) -> bool:
        return self.cfg.method != "explicit"

    @property
    def accelerated_solver(self) -> str | None:
        """The solver of evaluation and generation when it is not the reversible iteration:
        ``inference_solver``, else ``broyden`` for method=broyden, else None."""
        return self.cfg.inference_solver or ("broyden" if self.cfg.method == "broyden" else None)

    def inference_settings(self) -> rk.SolveSettings:
        """The forward iteration of ``self.deq`` as ``rk.solve`` settings (for the cached
        solves of generation, which need no gradient: implicit and phantom map to unrolled)."""
        settings = self.deq.settings
        if self._inference is None or self._inference[0] is not settings:
            forward = settings if settings.adjoint in ("reversible", "unrolled") else \
                dataclasses.replace(settings, adjoint="unrolled")
            self._inference = (settings, forward.reversible_solve())
        return self._inference[1]

    def _init_weights(self) -> None:
        # Block evaluations on the residual path: 2 per DEQ step, 1 per explicit layer.
        init_weights_(self, 2 * self.cfg.max_steps if self.is_deq else self.cfg.n_layers)

    @contextlib.contextmanager
    def solver_settings(self, **changes):
        """Within the block, the DEQ solves with ``changes`` to its settings (validated), e.g.
        ``max_steps=16, tol=0``; its own settings come back afterwards, whatever happens."""
        settings = self.deq.settings
        self.deq.settings = dataclasses.replace(settings, **changes)
        try:
            yield
        finally:
            self.deq.settings = settings

    def training_depth(self, max_steps: int):
        """Within the block, the DEQ solves at ``max_steps`` in the config's unit (broyden:
        2 * max_steps Broyden steps) instead of the configured depth."""
        return self.solver_settings(max_steps=2 * max_steps if self.cfg.method == "broyden" else max_steps)

    def _train_solve(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The training forward's solve: z and, with ``state_loss``, the states at N/4, N/2 and
        3N/4 that the objective also reads out. With ``depth_jitter`` it solves max_steps + k
        steps, k drawn uniformly from 0..depth_jitter (torch's RNG, so a resumed run draws the
        same k): a model trained at one depth can exploit that depth's transient, one trained
        over a range must be good wherever the solve stops."""
        extra = int(torch.randint(0, self.cfg.depth_jitter + 1, ())) if self.cfg.depth_jitter else 0
        steps = self.deq.settings.max_steps + extra
        with self.solver_settings(max_steps=steps) if extra else contextlib.nullcontext():
            if self.cfg.state_loss == 0:
                return self.deq(x), []
            *intermediate, z = self.deq(x, states_at=supervised_steps(steps))
            return z, intermediate

    def equilibrium_penalty(self, z: Tensor, x: Tensor, targets: Tensor, loss: Tensor,
                            intermediate: list[Tensor] = ()) -> Tensor | None:
        """``jac_reg * jacobian_penalty + res_reg * residual_penalty + depth_reg * depth_penalty
        + state_loss * (mean cross-entropy of the ``intermediate`` states)`` at the solution z
        (``loss``: the cross-entropy at z against ``targets``), or None when every weight is 0:
        the terms the training objective adds to the loss. The residual and depth terms share
        one evaluation of f. Under dropout that evaluation draws new masks
        (``penalty_masks=fresh``: the terms then also penalise f's sensitivity to its masks,
        which trained better, docs/lm.md) or the solve's (``solve``: the residual the solve
        reached)."""
        cfg, f = self.cfg, self.deq.f
        replay = cfg.penalty_masks == "solve"  # given the layer, jacobian_penalty replays too
        terms = []
        if cfg.state_loss > 0 and intermediate:
            state_losses = [self.cross_entropy(self.readout(state.to(x.dtype)), targets) for state in intermediate]
            terms.append(cfg.state_loss * sum(state_losses) / len(state_losses))
        if cfg.jac_reg > 0:
            terms.append(cfg.jac_reg * jacobian_penalty(self.deq if replay else f, z, x))
        if cfg.res_reg > 0 or cfg.depth_reg > 0:
            with self.deq.replaying_rng() if replay else contextlib.nullcontext():
                fz = f(z.to(x.dtype), x)
            if cfg.res_reg > 0:
                terms.append(cfg.res_reg * residual_penalty(z, fz))
            if cfg.depth_reg > 0:
                terms.append(cfg.depth_reg * depth_penalty(loss, self.cross_entropy(self.readout(fz), targets)))
        return sum(terms) if terms else None

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

    def solution(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(final states [B, T, D] before the final LayerNorm, the embeddings x they were
        solved from)."""
        z, x, _ = self._solution_and_states(idx)
        return z, x

    def _solution_and_states(self, idx: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``solution``, and the intermediate states a training forward supervises (state_loss)."""
        x = self.embed(idx)
        intermediate = []
        if self.is_deq:
            if self.training:
                z, intermediate = self._train_solve(x)
                self.last_stats = self.deq.last_stats
            elif self.cfg.inference_solver:
                z = self._solve_accelerated(self.deq.f, x)
            else:
                z = self.deq(x)
                self.last_stats = self.deq.last_stats
            return z.to(x.dtype), x, intermediate
        z = torch.zeros_like(x)
        for block in self.blocks:
            z = block(z, x)
        return z, x, intermediate

    def readout(self, z: Tensor) -> Tensor:
        """Logits [B, T, V] of final states z."""
        return self.head(self.ln_f(z))

    @staticmethod
    def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        """Logits [B, T, V]; with ``targets`` also the mean cross-entropy. A DEQ's training
        forward with targets leaves the penalties of its objective in ``last_penalty``."""
        z, x, intermediate = self._solution_and_states(idx)
        logits = self.readout(z)
        self.last_penalty = None
        if targets is None:
            return logits
        loss = self.cross_entropy(logits, targets)
        if self.is_deq and self.training and torch.is_grad_enabled():
            self.last_penalty = self.equilibrium_penalty(z, x, targets, loss, intermediate)
        return logits, loss

    # --- incremental decoding ---------------------------------------------------------
    def new_caches(self, batch: int, dtype: torch.dtype, device, kind: str = "per-evaluation") -> list[KVCache]:
        """Empty caches: one per explicit layer, or one for the DEQ of ``kind``
        (``per-evaluation``: a level per block evaluation; ``equilibrium``: one level)."""
        heads, head_dim = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        if not self.is_deq:
            return [KVCache(1, batch, heads, self.cfg.seq_len, head_dim, dtype=dtype, device=device, kind="explicit")
                    for _ in self.blocks]
        if kind not in CACHE_KINDS[1:]:
            raise ValueError(f"cache kind {kind!r}: must be one of {', '.join(CACHE_KINDS[1:])}")
        solver = self.accelerated_solver
        if kind == "per-evaluation" and solver:
            which = "method=broyden" if self.cfg.method == "broyden" and not self.cfg.inference_solver else \
                f"inference_solver={solver}"
            raise ValueError(f"cache kind 'per-evaluation' does not apply to {which}: each {solver} step mixes "
                             "all positions of a sequence (its update is fitted to the whole state), so a new "
                             "position's iterates are not the full solve's; use the equilibrium cache")
        levels = 1 if kind == "equilibrium" else 1 + 2 * self.deq.settings.max_steps
        return [KVCache(levels, batch, heads, self.cfg.seq_len, head_dim, dtype=dtype, device=device, kind=kind)]

    def converged(self) -> bool:
        """Whether the last DEQ solve met its tolerance on every sequence (``tol`` bounds a
        sequence's relative residual, not each position's)."""
        tol = self.deq.settings.tol
        return tol > 0 and self.last_stats is not None and self.last_stats.max_residual <= tol

    @torch.no_grad()
    def prefill(self, idx: Tensor, cache: str = "auto") -> tuple[Tensor, list[KVCache]]:
        """Solve the prompt once; returns the last position's logits [B, V] and the caches.

        ``cache`` (DEQ): ``auto`` keeps the equilibrium cache when the prompt's solve met
        ``tol`` (the iterates are then the equilibrium, to ``tol``) and the per-evaluation
        cache otherwise; ``equilibrium`` or ``per-evaluation`` force one. ``caches[0].kind``
        says which. method=broyden and ``inference_solver`` keep the equilibrium cache: their
        steps couple the positions, so there is no per-position iterate to cache."""
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache={cache!r}: must be one of {', '.join(CACHE_KINDS)}")
        x = self.embed(idx)
        if not self.is_deq:
            caches = self.new_caches(idx.shape[0], x.dtype, x.device)
            return self.readout(self._extend(x, caches)[:, -1]), caches
        f = CachedSolveBlock(self.deq.f, None)
        z = self._solve(f, x)
        if cache == "auto":
            cache = "equilibrium" if self.converged() or self.accelerated_solver else "per-evaluation"
        caches = self.new_caches(idx.shape[0], x.dtype, x.device, cache)
        caches[0].append(f.recorded)
        return self.readout(z[:, -1]), caches

    @torch.no_grad()
    def decode_step(self, token: Tensor, caches: list[KVCache]) -> Tensor:
        """Append ``token`` [B] at the next position; returns its logits [B, V].

        DEQ: solves only the new position's fixed point, on a [B, 1, D] state. With the
        per-evaluation cache each evaluation attends to the earlier positions' iterate of
        the same evaluation; causal attention means those never depend on later tokens, so
        this is the computation a solve of the whole sequence does for the last position
        (exactly, up to rounding). With the equilibrium cache every evaluation attends to
        the earlier positions' final states: the same fixed point, to the solver's ``tol``."""
        x = self.embed(token[:, None], start=caches[0].length)
        return self.readout(self._extend(x, caches)[:, -1])

    def _solve(self, f: CachedSolveBlock, x: Tensor) -> Tensor:
        if self.accelerated_solver:
            z = self._solve_accelerated(f, x)
            # The equilibrium cache keeps the keys/values of the returned state. Anderson
            # returns the state it evaluated last; Broyden keeps its previous state where it
            # rejected the last step, and only then is the returned state evaluated again.
            if not torch.equal(f.last_input, z):
                f.recorded.clear()
                f(z, x)
            return z
        solution = rk.solve(f, x, settings=self.inference_settings(), on_nonfinite="raise")
        self.last_stats = solution.stats
        return solution.z.to(x.dtype)

    def _solve_accelerated(self, f: nn.Module, x: Tensor) -> Tensor:
        """The forward solve of evaluation and generation with :attr:`accelerated_solver`,
        under the DEQ's current settings (with solver_settings' changes)."""
        solver, settings = self.accelerated_solver, self.deq.settings
        if self.cfg.method == "broyden":
            deq = rk.DEQ(f, **broyden_settings(self.cfg))
            deq.settings = dataclasses.replace(settings, solver=solver, on_nonfinite="raise")
            if solver != "broyden":  # Broyden's first-step damping is no Anderson mixing
                deq.settings = dataclasses.replace(deq.settings, beta=1.0)
        else:
            # 2 * max_steps steps: the block evaluations of the reversible iteration at max_steps;
            # the solver's own default mixing (beta is the training iteration's coupling)
            deq = rk.DEQ(f, solver=solver, adjoint="implicit", max_steps=2 * settings.max_steps, tol=settings.tol,
                         state_dtype=settings.state_dtype, backend=settings.backend, on_nonfinite="raise")
        z = deq(x).to(x.dtype)
        self.last_stats = deq.last_stats
        if self.cfg.inference_solver and self.cfg.method != "broyden" and settings.tol > 0 and not self.converged():
            # Anderson can stall where the iteration converges (measured: one position of
            # the main job's model, 128 steps at residual 0.02, its cached state 1.08 off the
            # equilibrium): the iteration solves it again, so the output and the cache hold
            # the fixed point to tol. A Broyden-trained model has no iteration of its own.
            self.iteration_fallbacks += 1
            if isinstance(f, CachedSolveBlock):
                f.recorded.clear()
            solution = rk.solve(f, x, settings=self.inference_settings(), on_nonfinite="raise")
            self.last_stats = solution.stats
            z = solution.z.to(x.dtype)
        return z

    def _extend(self, x: Tensor, caches: list[KVCache]) -> Tensor:
        """Final states of the new positions ``x`` [B, T, D] after the cached ones; their
        keys/values are appended to the caches."""
        if self.is_deq:
            f = CachedSolveBlock(self.deq.f, caches[0])
            z = self._solve(f, x)
            caches[0].append(f.recorded)
            return z
        z = torch.zeros_like(x)
        for block, cache in zip(self.blocks, caches):
            recorded: list = []
            z = block(z, x, cache.view(0) if cache.length else None, recorded)
            cache.append(recorded)
        return z


def compute_loss(model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(mean next-token cross-entropy, the objective to differentiate) of one micro-batch:
    a DEQ's objective adds the terms of the same forward (``res_reg``, ``jac_reg``, ``depth_reg``,
    ``state_loss``)."""
    loss = model(x, y)[1]
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return loss, loss if core.last_penalty is None else loss + core.last_penalty
