"""Training: AdamW with linear warmup and cosine decay, gradient clipping and
accumulation, bf16 autocast on CUDA, periodic validation, atomic checkpoints with exact
resume, and multi-process data parallelism (``torchrun``; gloo on CPU, nccl on GPU).

Data parallelism wraps the whole language model in DistributedDataParallel. The DEQ
evaluates its block many times per step, but the gradients of the block's parameters
leave the reversible solve through a single autograd.Function backward (and through
one accumulation per leaf with the unrolled adjoint), so each parameter's gradient is
accumulated, and all-reduced, exactly once per backward.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DATA_KEYS, MODEL_KEYS, LMConfig
from .data import TokenData, TrainSampler, eval_starts, prepare_data, window_batch
from .metrics import MetricsLogger, plot_losses, truncate_jsonl
from .model import TransformerLM
from .tokenizer import Tokenizer


class WarmupCosine:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to min_lr / lr."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...), if any."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def resolve_device(cfg: LMConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def autocast_for(cfg: LMConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(model: TransformerLM, cfg: LMConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() lists the tied embedding/head weight once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def compute_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch."""
    return model(x, y)[1]


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, cfg: LMConfig, device: torch.device, *,
             max_windows: int = 0, batch_size: int | None = None, ddp: Dist | None = None) -> dict:
    """Mean cross-entropy, perplexity and solver statistics over non-overlapping windows
    of ``tokens`` (all of them, or ``max_windows`` evenly spaced ones), sharded over ranks.
    Runs under a forked RNG so that evaluating never changes the training run's randomness."""
    ddp = ddp or Dist()
    batch_size = batch_size or cfg.batch_size
    starts = eval_starts(len(tokens), cfg.seq_len, max_windows)[ddp.rank::ddp.world]
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    steps_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = torch.zeros((), dtype=torch.float64, device=device)
    steps_max = torch.zeros((), dtype=torch.float64, device=device)
    res_max = torch.zeros((), dtype=torch.float64, device=device)
    res_sum = torch.zeros((), dtype=torch.float64, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i in range(0, len(starts), batch_size):
            x, y = window_batch(tokens, starts[i:i + batch_size], cfg.seq_len)
            x, y = x.to(device), y.to(device)
            with autocast_for(cfg, device):
                logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            n_tok += y.numel()
            n_batches += 1
            if model.last_stats is not None:
                steps_sum += model.last_stats.steps
                steps_max.clamp_(min=model.last_stats.steps)
                res_max.clamp_(min=model.last_stats.max_residual)
                res_sum += model.last_stats.max_residual
    if ddp.world > 1:
        for t in (loss_sum, n_tok, steps_sum, n_batches, res_sum):
            dist.all_reduce(t)
        for t in (steps_max, res_max):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    model.train(was_training)
    loss = float(loss_sum / n_tok)
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n_tok)}
    if model.is_deq:
        out.update(solver_steps_mean=float(steps_sum / n_batches), solver_steps_max=int(steps_max),
                   residual_mean=float(res_sum / n_batches), residual_max=float(res_max))
    return out


@dataclass
class TrainResult:
    model: TransformerLM
    tokenizer: Tokenizer
    step: int
    stopped: str  # "done" | "time_budget" | "nonfinite"
    losses: dict[int, float] = field(default_factory=dict)
    val: dict[int, dict] = field(default_factory=dict)
    out_dir: Path = Path(".")
    train_seconds: float = 0.0


def _check_resume_config(cfg: LMConfig, saved: dict) -> None:
    changed = [f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in MODEL_KEYS + DATA_KEYS
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ValueError("cannot resume with a different model or data: " + "; ".join(changed))


def train(cfg: LMConfig, resume: bool = False, log=print) -> TrainResult:
    cfg.validate()
    device_kind = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    ddp = setup_distributed(device_kind)
    try:
        return _train(cfg, resume, ddp, log if ddp.main else (lambda *a, **k: None))
    finally:
        if ddp.created_group:
            dist.destroy_process_group()


def _train(cfg: LMConfig, resume: bool, ddp: Dist, log) -> TrainResult:
    device = resolve_device(cfg, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt_path = out / "last.pt"

    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (out_dir={cfg.out_dir})")
        ckpt = load_checkpoint(ckpt_path)
        _check_resume_config(cfg, ckpt["config"])
    saved_tok = Tokenizer.from_json(ckpt["tokenizer"]) if ckpt else None

    # Rank 0 builds the token cache; the others wait, then read it.
    data: TokenData | None = prepare_data(cfg, saved_tok, log=log) if ddp.main else None
    ddp.barrier()
    if not ddp.main:
        data = prepare_data(cfg, saved_tok, log=log)
    tokenizer = data.tokenizer
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens > vocab_size={cfg.vocab_size}")

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = TransformerLM(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.warmup_iters, cfg.max_iters, cfg.min_lr / cfg.lr))
    sampler = TrainSampler(data["train"], cfg.seq_len, cfg.batch_size, cfg.seed, ddp.rank, ddp.world)
    step = 0
    val_history: dict[int, dict] = {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["data"][ddp.rank])
        _set_rng_state(ckpt["rng"][ddp.rank], device)
        step = int(ckpt["step"])
        val_history = {int(k): v for k, v in ckpt.get("val", {}).items()}
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout and solver streams differ per rank

    wrapped = model
    if ddp.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = None
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            truncate_jsonl(out / "metrics.jsonl", step)
        elif (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh record
        logger = MetricsLogger(out, cfg.tensorboard, purge_step=step + 1 if ckpt is not None else None)
        n_params = model.num_parameters()
        log(f"model: {cfg.method}, {n_params / 1e6:.2f}M parameters; device {device}; "
            f"{ddp.world} process(es); tokens/step {cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world:,}")

    def checkpoint():
        # every rank's RNG and data position, gathered to rank 0, which alone writes
        mine = (_rng_state(device), sampler.state_dict())
        gathered = [None] * ddp.world
        if ddp.world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if ddp.main:
            save_checkpoint(ckpt_path, {
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "world_size": ddp.world,
                "rng": [g[0] for g in gathered], "data": [g[1] for g in gathered],
                "tokenizer": tokenizer.to_json(), "val": {str(k): v for k, v in val_history.items()},
            })

    def validate():
        result = evaluate(model, data["validation"], cfg, device,
                          max_windows=cfg.eval_batches * cfg.batch_size, ddp=ddp)
        val_history[step] = result
        if logger is not None:
            logger.log({"kind": "val", "step": step, "val_loss": result["loss"], "val_ppl": result["ppl"],
                        **{k: v for k, v in result.items() if k not in ("loss", "ppl")}})
        return result

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `lm` extra; run without a bar
        tqdm = None
    bar = None
    if ddp.main and cfg.progress and tqdm is not None:
        bar = tqdm(total=cfg.max_iters, initial=step, desc=f"train {cfg.method}", dynamic_ncols=True)

    losses: dict[int, float] = {}
    stopped = "done"
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ddp.world
    train_seconds = 0.0
    model.train()
    try:
        while step < cfg.max_iters:
            if cfg.time_budget_s and train_seconds >= cfg.time_budget_s:
                stopped = "time_budget"  # (the step that crossed it validated and checkpointed)
                break
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(cfg.grad_accum):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last = micro == cfg.grad_accum - 1
                sync = wrapped.no_sync() if (ddp.world > 1 and not last) else contextlib.nullcontext()
                with sync:
                    with autocast_for(cfg, device):
                        loss = compute_loss(wrapped, x, y)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().double()
            if ddp.world > 1:
                dist.all_reduce(loss_sum)  # NaN on any rank reaches every rank: all stop together
            loss_value = float(loss_sum) / (cfg.grad_accum * ddp.world)
            if not math.isfinite(loss_value):
                stopped = "nonfinite"
                log(f"\nnon-finite loss ({loss_value}) at step {step + 1}: stopping before the optimizer "
                    f"step. The last good checkpoint is {ckpt_path if ckpt_path.exists() else '(none yet)'}"
                    + (f" (step {load_checkpoint(ckpt_path)['step']})" if ddp.main and ckpt_path.exists() else ""))
                break
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            if not math.isfinite(grad_norm):
                stopped = "nonfinite"
                log(f"\nnon-finite gradient norm ({grad_norm}) at step {step + 1}: stopping before the "
                    f"optimizer step; the last good checkpoint is {ckpt_path}")
                break
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses[step] = loss_value
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_seconds += dt
            stats = model.last_stats
            record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
            if stats is not None:
                record.update(solver_steps=stats.steps, residual=stats.max_residual)
            if logger is not None and (step % cfg.log_interval == 0 or step == cfg.max_iters):
                logger.log(record)
            if bar is not None:
                post = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
                if stats is not None:
                    post.update(deq_steps=stats.steps, res=f"{stats.max_residual:.1e}")
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            over_budget = bool(cfg.time_budget_s) and train_seconds >= cfg.time_budget_s
            if cfg.time_budget_s and ddp.world > 1:  # every rank stops at the same step
                flag = torch.tensor(float(over_budget), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over_budget = bool(flag.item())
                train_seconds = max(train_seconds, cfg.time_budget_s) if over_budget else train_seconds
            at_end = step == cfg.max_iters or over_budget
            if step % cfg.eval_interval == 0 or at_end:
                result = validate()
                if bar is not None:
                    bar.write(f"step {step}: val loss {result['loss']:.4f}, ppl {result['ppl']:.2f}")
            if step % cfg.checkpoint_interval == 0 or at_end:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    if ddp.main and stopped != "nonfinite":
        png = plot_losses(out / "metrics.jsonl", out / "loss.png", f"{cfg.method} ({cfg.out_dir})")
        log(f"stopped ({stopped}) at step {step}; checkpoint {ckpt_path}; metrics {out / 'metrics.jsonl'}; plot {png}")
    return TrainResult(model, tokenizer, step, stopped, losses, val_history, out, train_seconds)
