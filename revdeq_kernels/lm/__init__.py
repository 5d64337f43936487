"""A transformer language model whose depth is the equilibrium of one weight-tied block,
solved by the reversible DEQ of the core (``revdeq_kernels.ReversibleDEQ``).

    from revdeq_kernels.lm import load_config, train
    result = train(load_config("tiny", ["max_iters=100"]))

Command line: ``revdeq-train``, ``revdeq-eval``, ``revdeq-generate`` (see ``cli.py``).
"""

from .block import Block, KVCache
from .checkpoint import load_model
from .config import ConfigError, LMConfig, load_config, parse_overrides, preset_names, valid_keys
from .data import prepare_data
from .evaluation import evaluate
from .generation import Generation, cache_parity, generate, sample_token
from .model import TransformerLM
from .sources import DataUnavailable
from .training import TrainResult, train

__all__ = [
    "Block", "KVCache", "ConfigError", "LMConfig", "load_config", "parse_overrides", "preset_names",
    "valid_keys", "DataUnavailable", "prepare_data", "TransformerLM", "TrainResult", "train", "evaluate",
    "load_model", "Generation", "generate", "cache_parity", "sample_token",
]
