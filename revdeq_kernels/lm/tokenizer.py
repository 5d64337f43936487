"""Tokenizers: GPT-2's (when ``transformers`` has it in the local cache) or a byte-level
BPE trained with the ``tokenizers`` library on the training split.

Both are used through one small wrapper around a ``tokenizers.Tokenizer``, which
serialises to a JSON string: it is cached next to the tokens and stored inside every
checkpoint, so evaluation and generation decode with exactly the training tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

EOT = "<|endoftext|>"
GPT2_VOCAB = 50257


class TokenizerUnavailable(RuntimeError):
    """The requested tokenizer cannot be loaded here; the message says how to get it."""


class Tokenizer:
    def __init__(self, backend, kind: str):
        self.backend = backend  # tokenizers.Tokenizer
        self.kind = kind        # "gpt2" | "bpe"
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_id = eot

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": self.backend.to_str()})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        data = json.loads(text)
        return cls(HFTokenizer.from_str(data["tokenizer"]), data["kind"])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from the local Hugging Face cache, never the network."""
    try:
        from transformers import GPT2TokenizerFast
    except ImportError as error:
        raise TokenizerUnavailable(
            f"the GPT-2 tokenizer needs `transformers` ({error}); install it with "
            "`pip install 'revdeq_kernels[hf]'` and cache the tokenizer once on a machine "
            "with network access: python -c \"import transformers; "
            "transformers.GPT2TokenizerFast.from_pretrained('gpt2')\". "
            "Or use tokenizer=bpe to train a byte-level BPE on the training split."
        ) from error
    try:
        tok = GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
    except Exception as error:  # transformers raises OSError / ValueError flavours
        raise TokenizerUnavailable(
            "the GPT-2 tokenizer is not in the local Hugging Face cache (loading offline: "
            f"{type(error).__name__}: {error}). Cache it once with network access: "
            "python -c \"import transformers; transformers.GPT2TokenizerFast.from_pretrained('gpt2')\", "
            "or use tokenizer=bpe."
        ) from error
    return Tokenizer(tok.backend_tokenizer, "gpt2")


def train_bpe(texts: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenisation, every byte in the alphabet, so any text
    round-trips exactly) with ``vocab_size`` entries including ``<|endoftext|>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOT}), got {vocab_size}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, "bpe")


def choose_kind(requested: str, vocab_size: int) -> str:
    """``auto``: GPT-2 when it is cached and fits in vocab_size, else BPE."""
    if requested != "auto":
        return requested
    if vocab_size < GPT2_VOCAB:
        return "bpe"
    try:
        gpt2_tokenizer()
    except TokenizerUnavailable:
        return "bpe"
    return "gpt2"
