"""Training: AdamW with linear warmup and cosine decay, gradient clipping and accumulation,
bf16 autocast on CUDA (fp16 with loss scaling where bf16 is not native), periodic
validation, atomic checkpoints with exact resume, and data parallelism over ``torchrun``
processes.

Data parallelism wraps the whole language model in DistributedDataParallel. The DEQ
evaluates its block many times per step, but the block's parameter gradients leave the
reversible solve through one autograd.Function backward (and through one accumulation per
leaf with the unrolled adjoint), so each gradient is all-reduced once per backward.
Every rank reads its own shard of the training windows; rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..provenance import header
from .adjoint_check import adjoint_gradient_error
from .batches import TrainSampler, eval_starts, num_windows, window_batch
from .checkpoint import LAST, PREVIOUS, CheckpointError, load_checkpoint, save_rotating
from .config import DATA_KEYS, MODEL_KEYS, ConfigError, LMConfig
from .data import prepare_data
from .evaluation import evaluate
from .metrics import MetricsLogger, plot_losses, truncate_jsonl
from .model import TransformerLM, compute_loss
from .runtime import Dist, amp_dtype, autocast_for, resolve_device, rng_state, set_rng_state, setup_distributed
from .sources import DataUnavailable
from .tokenizer import Tokenizer

# fp16 steps whose gradients overflow in a row before training stops: the loss scale has fallen by 2**32
MAX_OVERFLOW_SKIPS = 32


def warmup_cosine(warmup: int, total: int, floor: float):
    """Learning-rate multiplier per step: linear warmup to 1, cosine decay to ``floor``.
    A plain function, so the scheduler's checkpoint never stores it: a resumed run follows
    the schedule of its own config."""
    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return multiplier


def make_optimizer(model: TransformerLM, cfg: LMConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, LayerNorms)."""
    params = list(model.parameters())  # lists the tied embedding/head weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


@dataclass
class TrainResult:
    model: TransformerLM
    tokenizer: Tokenizer
    step: int
    stopped: str  # "done" | "time_budget" | "nonfinite"
    losses: dict[int, float] = field(default_factory=dict)  # training loss per optimizer step
    val: dict[int, dict] = field(default_factory=dict)      # validation result per step
    out_dir: Path = Path(".")
    train_seconds: float = 0.0


def train(cfg: LMConfig, resume: bool = False, log=print) -> TrainResult:
    """Train ``cfg`` (resume from ``<out_dir>/last.pt`` with ``resume``); under torchrun,
    every process calls this and they train one model together."""
    cfg.validate()
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    ddp = setup_distributed("cuda" if cuda else "cpu")
    threads = torch.get_num_threads()
    try:
        result = Trainer(cfg, ddp, log if ddp.main else (lambda *a, **k: None)).run(resume)
        if ddp.created_group:
            # Every rank reaches the teardown before any exits: on torch 2.7 (gloo) a rank still
            # tearing down after rank 0, the store's host, had exited hung in 5 of 20 runs, and in
            # none of 22 with this barrier. Not on the error path, where the other ranks may be
            # inside a collective this barrier would be matched against.
            dist.barrier()
        return result
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only
        if ddp.created_group:
            dist.destroy_process_group()


def check_out_dir(out_dir: str) -> None:
    """out_dir is a directory or can be made one, and can be written: checked before any
    data is prepared, so that an unusable path costs nothing."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key out_dir={out_dir!r}: {path} exists and is not a directory")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"config key out_dir={out_dir!r}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key out_dir={out_dir!r}: {existing} is not writable")


def check_splits(data, cfg: LMConfig, world: int) -> None:
    """Every split holds what training needs (the training split a batch per process, the
    others one window each), all reported at once, before any step is spent."""
    window = cfg.seq_len + 1
    short = []
    train_windows = num_windows(len(data["train"]), cfg.seq_len)
    if train_windows // world < cfg.batch_size:
        short.append(f"train has {len(data['train']):,} tokens = {train_windows} windows, fewer than batch_size="
                     f"{cfg.batch_size}" + (f" per process x {world} processes" if world > 1 else ""))
    for split in ("validation", "test"):
        if num_windows(len(data[split]), cfg.seq_len) < 1:
            short.append(f"{split} has {len(data[split]):,} tokens, fewer than one window")
    if short:
        raise DataUnavailable(f"splits too short for windows of seq_len+1 = {window} tokens: {'; '.join(short)}; "
                              "use more data, larger val_fraction/test_fraction, or a smaller seq_len/batch_size")


class Trainer:
    def __init__(self, cfg: LMConfig, ddp: Dist, log):
        self.cfg, self.ddp, self.log = cfg, ddp, log
        self.device = resolve_device(cfg, ddp.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / LAST
        self.step, self.train_seconds = 0, 0.0
        # fp16's loss scaling: a step whose gradients overflow is skipped and the scale lowered
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(cfg, self.device) == torch.float16)
        self.overflow_skips = 0  # in a row: this run's float16 cannot hold its gradients past MAX_OVERFLOW_SKIPS
        self.losses: dict[int, float] = {}
        self.val: dict[int, dict] = {}
        self.logger: MetricsLogger | None = None

    # --- setup ------------------------------------------------------------------------------
    def _newest_intact_checkpoint(self) -> tuple[dict, Path, Exception | None]:
        """(checkpoint, its file, what is wrong with last.pt or None): last.pt, or prev.pt when
        last.pt is damaged or missing. Raises FileNotFoundError when neither file exists and
        CheckpointError naming both problems when neither loads."""
        previous = self.out / PREVIOUS
        if not self.ckpt_path.exists() and not previous.exists():
            raise FileNotFoundError(f"no checkpoint at {self.ckpt_path} (out_dir={self.cfg.out_dir})")
        try:
            return load_checkpoint(self.ckpt_path), self.ckpt_path, None
        except (CheckpointError, FileNotFoundError) as last_error:
            try:
                return load_checkpoint(previous), previous, last_error
            except (CheckpointError, FileNotFoundError) as previous_error:
                raise CheckpointError(f"neither checkpoint is usable: {last_error}; {previous_error}") from None

    def _load_resume_checkpoint(self) -> tuple[dict, Path]:
        """The checkpoint to resume from and its file: last.pt, or prev.pt when last.pt is damaged."""
        cfg = self.cfg
        try:
            ckpt, source, last_error = self._newest_intact_checkpoint()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--resume: {error}") from None
        except CheckpointError as error:
            raise CheckpointError(f"--resume: {error}") from None
        if last_error is not None:
            self.log(f"warning: --resume: {last_error}; resuming from the previous checkpoint {source} "
                     f"(step {ckpt['step']}) instead")
        changed = [f"{k}: {ckpt['config'][k]!r} -> {getattr(cfg, k)!r}" for k in MODEL_KEYS + DATA_KEYS
                   if ckpt["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"cannot resume {source} with a different model or data: {'; '.join(changed)}")
        if ckpt["world_size"] != self.ddp.world:
            raise ValueError(f"{source} was written by {ckpt['world_size']} process(es); resume it "
                             f"with the same number (this run has {self.ddp.world})")
        return ckpt, source

    def _setup(self, resume: bool) -> None:
        cfg, ddp = self.cfg, self.ddp
        ckpt, source = self._load_resume_checkpoint() if resume else (None, None)
        check_out_dir(cfg.out_dir)
        saved_tokenizer = Tokenizer.from_json(ckpt["tokenizer"]) if ckpt else None
        # rank 0 builds the token cache (and downloads the corpus); the others then read it
        data, error = None, None
        if ddp.main:
            try:
                data = prepare_data(cfg, saved_tokenizer, log=self.log)
            except Exception as caught:  # told to the other ranks below, then re-raised
                error = caught
        if ddp.world > 1:  # the other ranks must not wait forever for a rank 0 that failed
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and not ddp.main:
                raise DataUnavailable(f"rank 0 could not prepare the data: {message[0]}")
        if error is not None:
            raise error
        self.data = data or prepare_data(cfg, saved_tokenizer, log=self.log)
        self.tokenizer = self.data.tokenizer
        check_splits(self.data, cfg, ddp.world)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = TransformerLM(cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr / cfg.lr))
        self.sampler = TrainSampler(self.data["train"], cfg.seq_len, cfg.batch_size, cfg.seed, ddp.rank, ddp.world)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):  # written by an fp16 run; another amp resumes without it
                self.scaler.load_state_dict(ckpt["scaler"])
            self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
            self.sampler.load_state_dict(ckpt["data"][ddp.rank])
            set_rng_state(ckpt["rng"][ddp.rank], self.device)
            self.step, self.train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
            self.val = {int(k): v for k, v in ckpt["val"].items()}
            self.log(f"resumed from {source} at step {self.step}")
        else:
            torch.manual_seed(cfg.seed + ddp.rank)  # dropout and solver streams differ per rank
        self.wrapped = self.model
        if ddp.world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if ddp.main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = self.out / "metrics.jsonl"
            if ckpt is not None:
                truncate_jsonl(metrics, self.step)  # drop records written after the checkpoint
            elif metrics.exists():
                metrics.unlink()  # a fresh run starts a fresh record
            self.logger = MetricsLogger(self.out, cfg.tensorboard, purge_step=self.step + 1 if ckpt else None)
            # what produced the records that follow: their tokens/s mean nothing without the machine
            self.logger.log({"kind": "run", "step": self.step, "resumed_from": str(source) if ckpt else None,
                             "header": {**header(self.device), "processes": ddp.world}, "config": cfg.to_dict()})
            self.log(f"model: {cfg.method}, {self.model.num_parameters() / 1e6:.2f}M parameters; device "
                     f"{self.device}; {ddp.world} process(es); {self.tokens_per_step:,} tokens/step")

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.ddp.world

    # --- pieces of a step -----------------------------------------------------------------------
    def _step_depth(self):
        """The last ``tail_fraction`` of a DEQ's run, counted in steps or, under a time budget,
        in training time (whichever comes first), solves at ``tail_max_steps``. A model trained
        at one depth uses that depth's transient; ending where the solve has nearly converged
        leaves little transient to use (measured: docs/lm.md, "Why training ends deep")."""
        cfg = self.cfg
        if not (cfg.tail_fraction and self.model.is_deq):
            return contextlib.nullcontext()
        if self.step >= cfg.max_iters - cfg.tail_iters or self._budget_spent(1.0 - cfg.tail_fraction):
            return self.model.training_depth(cfg.tail_max_steps)
        return contextlib.nullcontext()

    def _forward_backward(self) -> float:
        """Loss of one optimizer step (mean over micro-batches and ranks), gradients accumulated."""
        cfg, ddp = self.cfg, self.ddp
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        with self._step_depth():  # decided once per step: under DDP it is a collective
            for micro in range(cfg.grad_accum):
                x, y = (t.to(self.device) for t in self.sampler.next_batch())
                last = micro == cfg.grad_accum - 1
                no_sync = self.wrapped.no_sync() if ddp.world > 1 and not last else contextlib.nullcontext()
                with no_sync:
                    with autocast_for(cfg, self.device):
                        loss, objective = compute_loss(self.wrapped, x, y)
                    with warnings.catch_warnings():
                        if self.scaler.is_enabled():  # its overflows are this loop's to skip, and logged as loss_scale
                            warnings.filterwarnings("ignore", "a DEQ's gradient overflowed float16", RuntimeWarning)
                        self.scaler.scale(objective / cfg.grad_accum).backward()
                loss_sum += loss.detach().double()
        if ddp.world > 1:
            dist.all_reduce(loss_sum)  # a NaN on any rank reaches every rank: all stop together
        return float(loss_sum) / (cfg.grad_accum * ddp.world)

    def _stop_nonfinite(self, what: str, value: float, remedy: str = "Lower lr, raise warmup_iters, or keep the "
                        "DEQ states in float64 (state_dtype=float64).") -> None:
        last = "none: no intact checkpoint was written yet"
        if self.ddp.main:  # the message must not fail on a damaged last.pt: name prev.pt then
            with contextlib.suppress(CheckpointError, FileNotFoundError):
                ckpt, source, _ = self._newest_intact_checkpoint()
                last = f"{source} (step {ckpt['step']})"
        self.log(f"\nnon-finite {what} ({value}) at step {self.step + 1}: training stopped before the "
                 f"optimizer step. The last good checkpoint is {last}. {remedy}")

    def validate(self) -> dict:
        cfg = self.cfg
        result = evaluate(self.model, self.data["validation"], cfg, self.device,
                          max_windows=cfg.eval_batches * cfg.batch_size, ddp=self.ddp)
        self.val[self.step] = result
        seconds = self._slowest_rank(self.train_seconds)
        if self.logger is not None:
            extra = {k: v for k, v in result.items() if k not in ("loss", "ppl")}
            self.logger.log({"kind": "val", "step": self.step, "val_loss": result["loss"],
                             "val_ppl": result["ppl"], "train_seconds": seconds, **extra})
        return result

    def check_adjoint(self) -> float:
        """The reversible gradient's relative error against unrolled, on the first validation batch."""
        cfg = self.cfg
        starts = eval_starts(len(self.data["validation"]), cfg.seq_len, cfg.batch_size)
        x, y = (t.to(self.device) for t in window_batch(self.data["validation"], starts, cfg.seq_len))
        error = adjoint_gradient_error(self.model, x, y, cfg, seed=cfg.seed + self.step)
        if self.logger is not None:
            self.logger.log({"kind": "grad_check", "step": self.step, "grad_error": error})
        return error

    def checkpoint(self) -> None:
        """Every rank's RNG state and data position, gathered to rank 0, which alone writes."""
        mine = (rng_state(self.device), self.sampler.state_dict())
        gathered = [mine]
        if self.ddp.world > 1:
            gathered = [None] * self.ddp.world
            dist.all_gather_object(gathered, mine)
        if self.ddp.main:
            save_rotating(self.out, {
                "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step, "train_seconds": self.train_seconds, "world_size": self.ddp.world,
                "rng": [g[0] for g in gathered], "data": [g[1] for g in gathered],
                "tokenizer": self.tokenizer.to_json(), "val": {str(k): v for k, v in self.val.items()},
            })

    def _slowest_rank(self, seconds: float) -> float:
        """The largest of every rank's ``seconds`` (the same figure on every rank)."""
        if self.ddp.world == 1:
            return seconds
        value = torch.tensor(seconds, dtype=torch.float64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    def _budget_spent(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the time budget is spent, decided together so that all ranks
        stop (or deepen their solves) at one step."""
        over = bool(self.cfg.time_budget_s) and self.train_seconds >= share * self.cfg.time_budget_s
        if self.cfg.time_budget_s and self.ddp.world > 1:
            flag = torch.tensor(float(over), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over = bool(flag.item())
        return over

    # --- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        self._setup(resume)
        cfg = self.cfg
        bar = None
        if self.ddp.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_iters, initial=self.step, desc=f"train {cfg.method}", dynamic_ncols=True)
        stopped = "time_budget" if self.step < cfg.max_iters and self._budget_spent() else "done"
        first_step = self.step
        self.model.train()
        try:
            while self.step < cfg.max_iters and stopped == "done":
                t0 = time.perf_counter()
                loss = self._forward_backward()
                if not math.isfinite(loss):
                    self._stop_nonfinite("loss", loss)
                    stopped = "nonfinite"
                    break
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: only measure
                self.scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
                if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                    self._stop_nonfinite("gradient norm", grad_norm)
                    stopped = "nonfinite"
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                self.scaler.step(self.optimizer)  # with fp16, skipped when the gradients overflowed
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(grad_norm):  # fp16 overflow: no step taken, the scale lowered
                    # The time counts, but the budget is checked after steps taken only, so that a run
                    # out of time still validates and checkpoints its last step. Every rank skips alike:
                    # their gradients are all-reduced.
                    self.overflow_skips += 1
                    self.train_seconds += time.perf_counter() - t0
                    if self.overflow_skips == MAX_OVERFLOW_SKIPS:
                        self._stop_nonfinite(f"gradient norm in {MAX_OVERFLOW_SKIPS} fp16 steps in a row (loss scale "
                                             f"now {self.scaler.get_scale():.3g})", grad_norm,
                                             "float16 cannot hold this model's gradients: use amp=bf16 or amp=off.")
                        stopped = "nonfinite"
                        break
                    continue
                self.overflow_skips = 0
                self.scheduler.step()
                self.step += 1
                self.losses[self.step] = loss
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self._report(bar, loss, lr, grad_norm, dt)
                if self._budget_spent():
                    stopped = "time_budget"
                at_end = self.step == cfg.max_iters or stopped == "time_budget"
                if cfg.grad_check_interval and (self.step % cfg.grad_check_interval == 0 or at_end):
                    error = self.check_adjoint()
                    self._write(f"step {self.step}: reversible gradient vs unrolled, relative error {error:.2e}", bar)
                if self.step % cfg.eval_interval == 0 or at_end:
                    result = self.validate()
                    self._write(f"step {self.step}: val loss {result['loss']:.4f}, ppl {result['ppl']:.2f}", bar)
                if self.step % cfg.checkpoint_interval == 0 or at_end:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
        if self.ddp.main and self.step == first_step:
            written = (f"{self.ckpt_path} is unchanged (step {self.step})" if self.ckpt_path.exists()
                       else "no checkpoint was written")
            why = f"step {self.step} >= max_iters={cfg.max_iters}" if stopped == "done" else "the time budget is spent"
            self.log(f"nothing was trained ({why}): {written}")
        elif self.ddp.main and stopped != "nonfinite":
            png = plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", f"{cfg.method} ({cfg.out_dir})")
            self.log(f"stopped ({stopped}) at step {self.step}; checkpoint {self.ckpt_path}; "
                     f"metrics {self.out / 'metrics.jsonl'}; plot {png}")
        return TrainResult(self.model, self.tokenizer, self.step, stopped, self.losses, self.val,
                           self.out, self.train_seconds)

    def _write(self, line: str, bar) -> None:
        if bar is not None:
            bar.write(line)
        elif self.ddp.main:
            self.log(line)

    def _report(self, bar, loss: float, lr: float, grad_norm: float, dt: float) -> None:
        stats = self.model.last_stats
        solver = {"solver_steps": stats.steps, "residual": stats.max_residual} if stats is not None else {}
        if self.model.last_penalty is not None:
            solver["penalty"] = float(self.model.last_penalty.detach())
        tokens_per_s = self.tokens_per_step / dt
        if self.logger is not None and (self.step % self.cfg.log_interval == 0 or self.step == self.cfg.max_iters):
            scaling = {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
            self.logger.log({"kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens_per_s": tokens_per_s, "step_time_s": dt, **solver, **scaling})
        if bar is not None:
            post = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if stats is not None:
                post.update(deq_steps=stats.steps, res=f"{stats.max_residual:.1e}")
            bar.set_postfix(post, refresh=False)
            bar.update(1)
