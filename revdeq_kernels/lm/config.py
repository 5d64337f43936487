"""The language-model configuration: one flat dataclass, YAML presets, ``key=value`` overrides.

Every key is a field of :class:`LMConfig`. Presets live in ``configs/<name>.yaml`` next to
this file (``tiny``, ``small``, ``wt103``); ``--config`` also takes a path to a YAML file.
An unknown key is an error that lists the valid ones; a value of the wrong type or out of
range is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..settings import DEQSettings, SettingError, SolveSettings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("reversible", "unrolled", "implicit", "phantom", "broyden", "explicit")
BLOCKS = ("residual", "postln", "normed", "anchored", "direct")
CACHE_KINDS = ("auto", "equilibrium", "per-evaluation")  # the DEQ's key/value cache in generation
DATASETS = ("shakespeare", "files", "wikitext-2", "wikitext-103")
TOKENIZERS = ("auto", "gpt2", "bpe")
STATE_DTYPES = ("float32", "float64", "bfloat16")
# Solvers that may replace the training solve at inference (null: the training solve itself);
# they find the same fixed point in fewer evaluations, and mix positions within a step.
INFERENCE_SOLVERS = ("anderson", "broyden")
AMP_MODES = ("auto", "bf16", "fp16", "off")

# What defines the model's parameters or its data: a resumed run may not change these.
MODEL_KEYS = ("vocab_size", "seq_len", "d_model", "n_heads", "mlp_ratio", "block", "method", "n_layers",
              "tie_embeddings")
# Keys added after checkpoints existed, with the value those checkpoints were trained with.
LEGACY_VALUES = {"block": "residual", "res_reg": 0.0}
# Keys that were renamed: what to write instead.
RENAMED_KEYS = {"tail_iters": "tail_fraction, a share of max_iters: tail_iters=100 with max_iters=1000 is "
                              "tail_fraction=0.1"}
DATA_KEYS = ("dataset", "data_files", "tokenizer", "val_fraction", "test_fraction", "split_seed")


def upgrade_legacy(values: dict) -> dict:
    """A checkpoint's config in today's keys: keys added since take the value it was trained
    with, and ``tail_iters`` (a step count, before it became ``tail_fraction``) is converted."""
    values = {**LEGACY_VALUES, **values}
    if "tail_iters" in values:
        steps, total = values.pop("tail_iters"), values.get("max_iters", 0)
        values["tail_fraction"] = steps / total if total else 0.0
    return values


def broyden_settings(cfg: "LMConfig") -> dict:
    """rk.DEQ's solver settings for method=broyden: Broyden forward and, for the implicit
    adjoint, backward, with 2 * max_steps steps each (the block evaluations of the
    reversible iteration at max_steps)."""
    return dict(solver="broyden", adjoint="implicit", backward_solver="broyden", beta=cfg.beta,
                max_steps=2 * cfg.max_steps, backward_max_steps=2 * cfg.max_steps, tol=cfg.tol)


# rk's rng modes that replay f's masks; "global" would leave the backward other masks.
LM_RNG_MODES = ("per_solve", "per_evaluation")
# The dropout masks of f where the penalties evaluate it at z*: new ones, or the solve's.
PENALTY_MASKS = ("fresh", "solve")


class ConfigError(ValueError):
    """A bad configuration: unknown key, value of the wrong type, or value out of range."""


@dataclass
class LMConfig:
    # --- model ---
    vocab_size: int = 2048          # embedding rows; >= the tokenizer's vocabulary
    seq_len: int = 128              # context length (learned position embeddings)
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0            # embedding and residual-branch dropout (replayed by the reverse pass)
    block: str = "normed"           # f: normed (LN(z + g), the default) | residual (z + g) | postln | anchored | direct
    method: str = "reversible"      # reversible | unrolled | implicit | phantom (DEQ adjoints) | broyden (Broyden
                                    # both ways, the classic DEQ) | explicit (n_layers blocks)
    n_layers: int = 4               # explicit only: number of separately weighted blocks
    beta: float = 0.8               # DEQ relaxation in (0, 2), != 1 (broyden: its first step's damping, in (0, 1])
    max_steps: int = 4              # DEQ steps (2 evaluations of the block each; broyden: 2 * max_steps steps)
    tol: float = 1e-3               # DEQ stop tolerance on the relative residual (0: always max_steps)
    state_dtype: str | None = None  # DEQ states: float32 | float64 | bfloat16 | null (= the activations')
    reversal: str | None = None     # how the backward rebuilds the states: exact | float | null (= exact)
    rng: str = "per_solve"          # DEQ dropout masks: per_solve (one per solve: f has a fixed point) | per_evaluation
    inference_solver: str | None = None  # DEQ eval/generation: anderson | broyden | null (= the training solve)
    jac_reg: float = 0.0            # DEQ: weight of the Jacobian penalty ||J_f||_F^2 / n at z* in the loss (0: off)
    depth_jitter: int = 0           # DEQ training: each step solves max_steps + U{0..depth_jitter} steps
    res_reg: float = 20.0           # DEQ: weight of the squared relative residual at z* in the loss (0: off)
    penalty_masks: str = "fresh"    # DEQ: the penalties' dropout masks at z*: fresh (trained better, docs/lm.md) | solve
    depth_reg: float = 0.0          # DEQ: weight of relu(CE at f(z*) - CE at z*), one more evaluation's loss rise (0: off)
    state_loss: float = 0.0         # reversible/unrolled/phantom: weight of the mean CE of z at N/4, N/2, 3N/4 (fixed-point correction; 0: off)
    tail_fraction: float = 0.0      # DEQ training: the last tail_fraction of the steps (or of time_budget_s) solve at tail_max_steps (0: off)
    tail_max_steps: int = 16        # DEQ training: the solver steps of those last steps (broyden: 2x, as max_steps)
    checkpoint_every: int = 0       # reversal=float: store the states every this many steps (0: never)
    backend: str | None = None      # kernel backend of the state updates (null: $REVDEQ_BACKEND or auto)
    tie_embeddings: bool = True     # the LM head shares the token-embedding matrix
    # --- data ---
    dataset: str = "shakespeare"    # shakespeare | files | wikitext-2 | wikitext-103
    data_files: list[str] = field(default_factory=list)  # dataset=files: text files and/or folders
    data_dir: str = ""              # downloads, tokenizers, tokens ("": $REVDEQ_CACHE_DIR or ~/.cache/revdeq_kernels)
    tokenizer: str = "auto"         # auto (GPT-2 if cached and vocab_size fits, else BPE) | gpt2 | bpe
    val_fraction: float = 0.05      # share of documents in validation (sources without fixed splits)
    test_fraction: float = 0.05
    split_seed: int = 0             # which documents go to which split
    # --- training ---
    batch_size: int = 16            # sequences per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step
    max_iters: int = 300            # optimizer steps
    lr: float = 2e-3
    min_lr: float = 2e-4            # cosine floor
    warmup_iters: int = 30
    lr_decay_iters: int = 0         # the cosine reaches min_lr at this step (0: at max_iters)
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    eval_interval: int = 100        # validate every this many steps (and at the end)
    eval_batches: int = 8           # batches per periodic validation (0: the whole split)
    log_interval: int = 1           # steps between JSONL / TensorBoard records
    checkpoint_interval: int = 100  # steps between checkpoints (and at the end)
    grad_check_interval: int = 0    # reversible: every this many steps, its gradient error vs unrolled (0: off)
    seed: int = 1337
    out_dir: str = "runs/tiny"
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    amp: str = "auto"               # auto (CUDA: bf16 autocast, fp16 + loss scaling before sm_80) | bf16 | fp16 | off
    time_budget_s: float = 0.0      # stop after this much training wall-clock time (0: no limit)
    threads: int = 0                # torch.set_num_threads (0: leave torch's default)
    progress: bool = True           # tqdm progress bar (rank 0)
    tensorboard: bool = True        # TensorBoard events in <out_dir>/tb

    def __post_init__(self):
        self.validate()

    def validate(self) -> "LMConfig":
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(f"config key {key}={getattr(self, key)!r}: {what}")

        for key in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers",
                    "batch_size", "grad_accum", "eval_interval", "log_interval", "checkpoint_interval"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_batches", "threads", "grad_check_interval"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads={self.n_heads}")
        need(int(self.mlp_ratio * self.d_model) >= 1, "mlp_ratio", "must give an MLP width >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(self.grad_check_interval == 0 or self.method == "reversible", "grad_check_interval",
             f"compares the reversible adjoint with unrolled: needs method=reversible (method is {self.method})")
        need(self.block in BLOCKS, "block", f"must be one of {', '.join(BLOCKS)}")
        # the DEQ-only training terms (an explicit model has no fixed point) are ignored by explicit
        for key in ("depth_jitter", "jac_reg", "res_reg", "depth_reg", "state_loss"):
            need(getattr(self, key) >= 0, key, "must be >= 0 (0: off)")
        need(self.state_loss == 0 or self.method in ("reversible", "unrolled", "phantom", "explicit"), "state_loss",
             f"supervises the solver's intermediate states: method=reversible or unrolled (their exact "
             f"gradients) or phantom (each state's own phantom gradient, DEQ-Flow's fixed-point correction); "
             f"the implicit adjoint holds at the equilibrium only (method is {self.method})")
        need(0.0 <= self.tail_fraction <= 1.0, "tail_fraction", "must be in [0, 1] (0: off)")
        need(self.tail_max_steps >= 1, "tail_max_steps", "must be >= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: never)")
        need(self.checkpoint_every == 0 or self.method == "reversible", "checkpoint_every",
             f"applies to method=reversible only (method is {self.method})")
        try:  # the solver's own validation, so that the config accepts exactly what the solver does
            if self.method == "broyden":
                DEQSettings(**broyden_settings(self))
            else:
                SolveSettings(beta=self.beta, max_steps=self.max_steps, tol=self.tol,
                              reversal=self.reversal if self.method == "reversible" else None,
                              checkpoint_every=self.checkpoint_every or None)
        except SettingError as error:
            need(False, error.name, error.reason)
        need(self.penalty_masks in PENALTY_MASKS, "penalty_masks", f"must be one of {', '.join(PENALTY_MASKS)}")
        need(self.penalty_masks == "fresh" or self.rng == "per_solve", "penalty_masks",
             f"'solve' replays the solve's one set of masks, and rng={self.rng} draws a new one per evaluation")
        need(self.rng in LM_RNG_MODES, "rng", f"must be one of {', '.join(LM_RNG_MODES)} (both replay the forward "
             "pass's masks in the backward)")
        need(self.reversal is None or self.method == "reversible", "reversal",
             f"'{self.reversal}' applies to method=reversible only (method is {self.method})")
        need(self.inference_solver in INFERENCE_SOLVERS + (None,), "inference_solver",
             f"must be one of {', '.join(INFERENCE_SOLVERS)} or null (the training solve)")
        need(self.inference_solver is None or self.method != "explicit", "inference_solver",
             "applies to a DEQ: method=explicit has no fixed point to solve for")
        need(self.state_dtype in STATE_DTYPES + (None,), "state_dtype",
             f"must be one of {', '.join(STATE_DTYPES)} or null")
        need(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}")
        need(self.dataset != "files" or bool(self.data_files), "data_files",
             "dataset=files needs data_files=PATH[,PATH...] (text files or folders of them)")
        need(self.tokenizer in TOKENIZERS, "tokenizer", f"must be one of {', '.join(TOKENIZERS)}")
        for key in ("val_fraction", "test_fraction"):
            need(0.0 < getattr(self, key) < 0.5, key, "must be in (0, 0.5)")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: off)")
        need(self.amp in AMP_MODES, "amp", f"must be one of {', '.join(AMP_MODES)}")
        need(self.time_budget_s >= 0, "time_budget_s", "must be >= 0 (0: no limit)")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
             "must be auto, cpu, cuda or cuda:N")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def tail_iters(self) -> int:
        """How many of the last optimizer steps solve at ``tail_max_steps``: a fraction, so that
        a shortened run (``max_iters=50``) keeps a proportionate tail."""
        return round(self.tail_fraction * self.max_iters)

    def describe_training_depth(self) -> str:
        """The solver depth training used, for plots and reports: "4 steps, the last 100 of 1000 at 16"."""
        tail = f", the last {self.tail_iters} of {self.max_iters} at {self.tail_max_steps}" if self.tail_iters else ""
        return f"{self.max_steps} steps{tail}"

    @property
    def cache_dir(self) -> Path:
        root = self.data_dir or os.environ.get("REVDEQ_CACHE_DIR") or "~/.cache/revdeq_kernels"
        return Path(root).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TYPES = typing.get_type_hints(LMConfig)


def valid_keys() -> list[str]:
    return list(_TYPES)


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _check_key(key: str, where: str) -> None:
    if key not in _TYPES:
        close = difflib.get_close_matches(key, valid_keys(), n=1)
        hint = f" (renamed: use {RENAMED_KEYS[key]})" if key in RENAMED_KEYS else \
            f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r} in {where}{hint}. Valid keys: {', '.join(valid_keys())}")


def _coerce(key: str, value, where: str):
    """``value`` as the type of field ``key``: YAML values, or strings from the command line."""
    kind = _TYPES[key]
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)  # `str | None`
    args = typing.get_args(kind) if optional else ()
    base = next(a for a in args if a is not type(None)) if optional else kind

    def fail(expected: str):
        return ConfigError(f"config key {key} in {where}: expected {expected}, got {value!r}")

    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise fail("a value, not null")
    if typing.get_origin(base) is list:
        if isinstance(value, str):  # data_files=a.txt,b.txt
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of paths")
        return list(value)
    if base is bool:
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise fail("true or false")
    if base in (int, float):
        if isinstance(value, bool):
            raise fail(f"a {base.__name__}")
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string: accept numeric strings
            number = base(value) if isinstance(value, str) else value
        except ValueError:
            raise fail("an integer" if base is int else "a number") from None
        if base is int and (not isinstance(number, int) or isinstance(number, bool)):
            raise fail("an integer")
        if base is float and not isinstance(number, (int, float)):
            raise fail("a number")
        return base(number)
    if not isinstance(value, str):
        raise fail("a string")
    return value


def config_from_dict(values: dict, where: str = "the config") -> LMConfig:
    for key in values:
        _check_key(key, where)
    return LMConfig(**{key: _coerce(key, value, where) for key, value in values.items()})


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``["lr=1e-3", "method=explicit"]`` -> ``{"lr": 0.001, "method": "explicit"}``, typed."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value. Valid keys: {', '.join(valid_keys())}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        _check_key(key, "the command-line overrides")
        out[key] = _coerce(key, text.strip(), "the command-line overrides")
    return out


def read_yaml(name_or_path: str) -> tuple[dict, str]:
    """The mapping in a preset (``tiny``) or a YAML file, and the file it came from."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        # a preset's name; a folder of that name (an out_dir called tiny) is no config
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"no config preset {name_or_path!r}; presets: {', '.join(preset_names())}, "
                              "or give a path to a .yaml file")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for key in data:
        _check_key(key, str(path))
    return data, str(path)


def load_config(name_or_path: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> LMConfig:
    """A preset or YAML file, then ``key=value`` overrides, validated."""
    data, where = read_yaml(name_or_path)
    data.update(parse_overrides(overrides))
    return config_from_dict(data, f"{where} + overrides")
