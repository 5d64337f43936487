"""A transformer language model whose depth is the equilibrium of one weight-tied block,
solved by the reversible DEQ of the core (``revdeq_kernels.ReversibleDEQ``).

    from revdeq_kernels.lm import load_config
    from revdeq_kernels.lm.train import train
    result = train(load_config("tiny", ["max_iters=100"]))

Command line: ``revdeq-train``, ``revdeq-eval``, ``revdeq-generate`` (see ``cli.py``).
"""

from .block import Block, KVCache
from .config import ConfigError, LMConfig, load_config, preset_names, valid_keys
from .generate import Generation, generate, sample_token
from .model import TransformerLM, build_model

__all__ = [
    "Block", "KVCache", "ConfigError", "LMConfig", "load_config", "preset_names", "valid_keys",
    "Generation", "generate", "sample_token", "TransformerLM", "build_model",
]

