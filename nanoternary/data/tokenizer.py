"""Byte-level BPE tokenizer (HF `tokenizers`), trained once per corpus and cached as tokenizer.json.

Byte-level with the GPT-2 pre-tokenizer so that llama.cpp's `gpt2` tokenizer model can read it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


class TextTokenizer:
    """Thin wrapper that knows its end-of-text id and how many UTF-8 bytes each token stands for."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} special token")
        self.eot_id = eot
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be > 256 for a byte-level BPE, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"corrupt tokenizer file {path}: {exc}") from exc
        return cls(tok)

    def save(self, path: str | Path) -> None:
        """Atomic write: a reader never sees a half-written tokenizer.json."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel encode without character offsets (~1.5x faster than `encode_batch`, same ids)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of every token id (0 for special tokens): the denominator of bits-per-byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        for token, idx in self.tokenizer.get_vocab().items():
            if token not in specials:
                lengths[idx] = len(token)  # byte-level BPE: one visible character per byte
        return lengths


def load_or_train(path: Path, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Cached tokenizer at `path`, trained from `texts` on a miss."""
    if path.is_file():
        return TextTokenizer.from_file(path)
    tok = TextTokenizer.train(texts, vocab_size)
    tok.save(path)
    return tok
