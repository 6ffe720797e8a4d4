"""TokenDataModule: corpus -> cached tokenizer -> cached tokens -> step-indexed batches.

The training batch for micro-step i is a pure function of (seed, i, rank): random windows drawn by a
generator seeded with exactly those numbers. Resuming at step s therefore needs only s, and any two
runs with the same seed see the same data in the same order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from nanoternary.data.cache import cached_tokens
from nanoternary.data.sources import Document, corpus_fingerprint, split_documents, stdlib_documents
from nanoternary.data.tokenizer import TextTokenizer, load_or_train

DocumentSource = Callable[[str], Iterator[Document]]


def make_source(name: str, holdout_mod: int, num_samples: int = 16000, seed: int = 0) -> DocumentSource:
    """The document stream of a named text corpus, by split."""
    if holdout_mod < 2:
        raise ValueError(f"data.holdout_mod must be >= 2, got {holdout_mod}")
    if name == "code":
        return lambda split: stdlib_documents(split, holdout_mod)
    if name == "synthetic_code":
        from nanoternary.data.synthetic import synthetic_documents

        return lambda split: split_documents(synthetic_documents(num_samples, seed), split, holdout_mod)
    raise ValueError(f"unknown data.source {name!r}; expected one of ['code', 'synthetic_code']")


@dataclass
class PreparedCorpus:
    tokenizer: TextTokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    corpus_hash: str
    cache_dir: Path

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.fingerprint


class StepBatches(IterableDataset):
    """Endless stream of (batch, seq_len + 1) windows; item i depends only on (seed, i, rank)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, start: int = 0, rank: int = 0):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.start, self.rank = seed, start, rank

    def batch(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index, self.rank])
        offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        rows = [self.tokens[o : o + self.seq_len + 1] for o in offsets]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


class Windows(Dataset):
    """Non-overlapping (seq_len + 1)-token windows: every held-out token is predicted exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len
        if self.count == 0:
            raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> torch.Tensor:
        start = j * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str,
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        cache_dir: str,
        seed: int = 0,
        holdout_mod: int = 20,
        num_samples: int = 16000,
        val_batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"data.batch_size and data.seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.source_name = source
        self.documents = make_source(source, holdout_mod, num_samples, seed)
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed, self.holdout_mod, self.num_samples = seed, holdout_mod, num_samples
        self.val_batch_size, self.num_workers = val_batch_size, num_workers
        self.start_step = 0
        self.corpus: PreparedCorpus | None = None

    def settings_key(self) -> str:
        """Everything besides the text itself that changes the cached tokens."""
        settings = dict(source=self.source_name, holdout_mod=self.holdout_mod, vocab_size=self.vocab_size)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    def prepare(self) -> PreparedCorpus:
        """Tokenizer and token caches for both splits, built on first use; idempotent."""
        if self.corpus is not None:
            return self.corpus
        corpus_hash = corpus_fingerprint(self.documents("train"))
        val_hash = corpus_fingerprint(self.documents("val"))
        if corpus_hash == corpus_fingerprint(iter(())):
            raise ValueError(f"data source {self.source_name!r} has no training documents")
        if val_hash == corpus_fingerprint(iter(())):
            raise ValueError(f"data source {self.source_name!r} has no held-out documents (holdout_mod={self.holdout_mod})")
        key = f"{corpus_hash[:16]}-{self.settings_key()}"
        tok = load_or_train(
            self.cache_dir / "tokenizers" / f"{key}.json",
            (d.text for d in self.documents("train")),
            self.vocab_size,
        )
        token_dir = self.cache_dir / "tokens" / f"{key}-{val_hash[:8]}-{tok.fingerprint[:8]}"
        self.corpus = PreparedCorpus(
            tokenizer=tok,
            train_tokens=cached_tokens(self.documents("train"), tok, token_dir / "train.bin"),
            val_tokens=cached_tokens(self.documents("val"), tok, token_dir / "val.bin"),
            corpus_hash=corpus_hash,
            cache_dir=token_dir,
        )
        return self.corpus

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def heldout_bytes(self) -> bytes:
        """The held-out text exactly as the evaluation sees it (documents joined, no separators)."""
        return b"".join(d.text.encode("utf-8") for d in self.documents("val"))

    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        corpus = self.prepare()
        batches = StepBatches(corpus.train_tokens, self.batch_size, self.seq_len, self.seed, self.start_step, self.rank())
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        windows = Windows(self.prepare().val_tokens, self.seq_len)
        return DataLoader(windows, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers)
