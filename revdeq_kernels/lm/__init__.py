"""A transformer language model whose depth is the equilibrium of one weight-tied block,
solved by the reversible DEQ of the core (``revdeq_kernels.ReversibleDEQ``).

    from revdeq_kernels.lm import load_config, train
    result = train(load_config("tiny", ["max_iters=100"]))

Command line: ``revdeq-train``, ``revdeq-eval``, ``revdeq-generate`` (see ``cli.py``).
"""

from .block import Block, KVCache  # noqa: F401  (importable, not advertised in __all__)
from .checkpoint import load_model
from .config import ConfigError, LMConfig, load_config, parse_overrides, preset_names, valid_keys  # noqa: F401
from .data import prepare_data
from .evaluation import evaluate
from .generation import Generation, cache_parity, generate, prefix_distributions, sample_token  # noqa: F401
from .model import TransformerLM
from .sources import DataUnavailable
from .training import TrainResult, train

# What users call; the rest (KVCache, parse_overrides, sample_token, ...) stays importable.
__all__ = [
    "LMConfig", "ConfigError", "load_config", "TransformerLM", "Block", "train", "TrainResult",
    "evaluate", "generate", "Generation", "load_model", "prepare_data", "DataUnavailable",
]
