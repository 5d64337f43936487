"""The language-model configuration: one flat dataclass, YAML presets, ``key=value`` overrides.

Every key is a field of :class:`LMConfig`. Presets live in ``configs/<name>.yaml`` next to
this file (``tiny``, ``small``, ``wt103``); ``--config`` also takes a path to a YAML file.
Unknown keys are an error that lists the valid ones; overrides are typed by the field's
annotation, and a value that does not parse, or that is out of range, is a clear error.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("reversible", "unrolled", "explicit")
DATASETS = ("shakespeare", "files", "wikitext-2", "wikitext-103")
TOKENIZERS = ("auto", "gpt2", "bpe")
STATE_DTYPES = ("float32", "float64", "bfloat16")
AMP_MODES = ("auto", "bf16", "off")

# Keys that define the model's parameters or its data; a resumed run may not change them.
MODEL_KEYS = ("vocab_size", "seq_len", "d_model", "n_heads", "mlp_ratio", "method", "n_layers",
              "tie_embeddings")
DATA_KEYS = ("dataset", "data_files", "tokenizer", "val_fraction", "test_fraction", "split_seed")


class ConfigError(ValueError):
    """A bad configuration: unknown key, unparsable value or value out of range."""


@dataclass
class LMConfig:
    # --- model ---
    vocab_size: int = 2048          # embedding rows; >= the tokenizer's vocabulary
    seq_len: int = 128              # context length (learned position embeddings)
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0            # embedding and residual-branch dropout (replayed by the reverse pass)
    method: str = "reversible"      # reversible | unrolled (DEQ adjoints) | explicit (n_layers blocks)
    n_layers: int = 4               # explicit only: number of separately weighted blocks
    beta: float = 0.8               # DEQ relaxation in (0, 2), != 1
    max_steps: int = 4              # DEQ steps (2 evaluations of the block each)
    tol: float = 1e-3               # DEQ stop tolerance on the relative residual (0: always max_steps)
    state_dtype: str | None = None  # DEQ state dtype: float32 | float64 | bfloat16 | null (= activations')
    backend: str | None = None      # kernel backend for the state updates (null: REVDEQ_BACKEND or auto)
    tie_embeddings: bool = True     # LM head shares the token-embedding matrix
    # --- data ---
    dataset: str = "shakespeare"    # shakespeare | files | wikitext-2 | wikitext-103
    data_files: list[str] = field(default_factory=list)  # dataset=files: text files and/or folders
    data_dir: str = ""              # cache for downloads, tokenizers and tokens ("" = $REVDEQ_CACHE_DIR or ~/.cache/revdeq_kernels)
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
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    eval_interval: int = 100        # validate every this many steps (and at the end)
    eval_batches: int = 8           # batches per periodic validation (0: the whole split)
    log_interval: int = 1           # steps between JSONL / TensorBoard records
    checkpoint_interval: int = 100  # steps between checkpoints (and at the end)
    seed: int = 1337
    out_dir: str = "runs/tiny"
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    amp: str = "auto"               # auto (bf16 autocast on CUDA) | bf16 | off
    time_budget_s: float = 0.0      # stop after this much training wall-clock time (0: no limit)
    threads: int = 0                # torch.set_num_threads (0: leave torch's default)
    progress: bool = True           # tqdm progress bar (rank 0)
    tensorboard: bool = True        # write TensorBoard events to <out_dir>/tb

    def __post_init__(self):
        self.validate()

    # --- validation -------------------------------------------------------------------
    def validate(self) -> "LMConfig":
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(f"config key {key}={getattr(self, key)!r}: {what}")

        for key in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "max_steps",
                    "batch_size", "grad_accum", "eval_interval", "log_interval", "checkpoint_interval"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("max_iters", "warmup_iters", "eval_batches", "threads"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads={self.n_heads}")
        need(self.mlp_ratio > 0 and int(self.mlp_ratio * self.d_model) >= 1, "mlp_ratio", "must be > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(0.0 < self.beta < 2.0 and self.beta != 1.0, "beta", "must be in (0, 2) and != 1")
        need(self.tol >= 0.0, "tol", "must be >= 0 (0 always runs max_steps)")
        need(self.state_dtype is None or self.state_dtype in STATE_DTYPES, "state_dtype",
             f"must be one of {', '.join(STATE_DTYPES)} or null")
        need(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}")
        need(self.dataset != "files" or bool(self.data_files), "data_files",
             "dataset=files needs data_files=PATH[,PATH...] (text files or folders of them)")
        need(self.tokenizer in TOKENIZERS, "tokenizer", f"must be one of {', '.join(TOKENIZERS)}")
        for key in ("val_fraction", "test_fraction"):
            need(0.0 < getattr(self, key) < 0.5, key, "must be in (0, 0.5)")
        need(self.lr > 0 and self.min_lr >= 0 and self.min_lr <= self.lr, "min_lr", "need 0 <= min_lr <= lr, lr > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "Adam betas must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: off)")
        need(self.amp in AMP_MODES, "amp", f"must be one of {', '.join(AMP_MODES)}")
        need(self.time_budget_s >= 0, "time_budget_s", "must be >= 0 (0: no limit)")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "must be auto, cpu, cuda or cuda:N")
        return self

    # --- helpers ---------------------------------------------------------------------
    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def cache_dir(self) -> Path:
        root = self.data_dir or os.environ.get("REVDEQ_CACHE_DIR") or "~/.cache/revdeq_kernels"
        return Path(root).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "LMConfig":
        return from_dict({**self.to_dict(), **changes})


def field_types() -> dict[str, object]:
    return typing.get_type_hints(LMConfig)


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(LMConfig)]


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown config key {key!r} in {where}{hint}. Valid keys: {', '.join(valid_keys())}"
    )


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null", "~", "")


def parse_value(key: str, text: str):
    """Parse the command-line string ``text`` for ``key`` according to the field's type."""
    types = field_types()
    if key not in types:
        raise _unknown_key_error(key, "the overrides")
    kind = types[key]
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if optional else kind

    def fail(expected: str):
        return ConfigError(f"bad value for config key {key}: expected {expected}, got {text!r}")

    if optional and text.strip().lower() in _NONE:
        return None
    if typing.get_origin(base) is list:
        return [part for part in (p.strip() for p in text.split(",")) if part]
    if base is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise fail("a boolean (true/false, 1/0, yes/no, on/off)")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise fail("an integer") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise fail("a number") from None
    return text


def _coerce(key: str, value, where: str):
    """Check a value read from YAML (already typed) against the field's type."""
    kind = field_types()[key]
    args = typing.get_args(kind)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"config key {key} in {where} may not be null")
    base = next((a for a in args if a is not type(None)), kind) if args and type(None) in args else kind
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key} in {where} must be a list of strings, got {value!r}")
        return list(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} in {where} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} in {where} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"config key {key} in {where} must be a number, got {value!r}") from None
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key {key} in {where} must be a string, got {value!r}")
    return value


def from_dict(values: dict, where: str = "the config") -> LMConfig:
    known = set(valid_keys())
    for key in values:
        if key not in known:
            raise _unknown_key_error(key, where)
    return LMConfig(**{k: _coerce(k, v, where) for k, v in values.items()})


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(name_or_path: str) -> tuple[dict, str]:
    """The raw mapping of a preset name (``tiny``) or a YAML file path, and where it came from."""
    import yaml

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"no config preset {name_or_path!r}; presets: {', '.join(preset_names())}, "
                "or give a path to a .yaml file"
            )
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of config keys, got {type(data).__name__}")
    return data, str(path)


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; valid keys: {', '.join(valid_keys())}")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if key not in field_types():
        raise _unknown_key_error(key, "the overrides")
    return key, value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    out = dict(values)
    for item in overrides:
        key, text = split_override(item)
        out[key] = parse_value(key, text)
    return out


def load_config(name_or_path: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> LMConfig:
    """Preset or YAML file, then ``key=value`` overrides, validated."""
    data, where = read_yaml(name_or_path)
    for key in data:  # report unknown keys against the file they are in
        if key not in field_types():
            raise _unknown_key_error(key, where)
    return from_dict(apply_overrides(data, list(overrides)), f"{where} + overrides")
