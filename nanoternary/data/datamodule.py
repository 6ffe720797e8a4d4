"""TokenDataModule: corpus -> cached tokenizer -> cached tokens -> step-indexed batches.

The training batch for micro-step i is a pure function of (seed, i, rank): random windows drawn by a
generator seeded with exactly those numbers. Resuming at step s therefore needs only s, and any two
runs with the same seed see the same data in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from nanoternary.data.cache import cached_tokens
from nanoternary.data.seed_tokens import SeedTokens
from nanoternary.data.sources import Document, corpus_fingerprint, split_documents, stdlib_documents
from nanoternary.data.tokenizer import TextTokenizer, load_or_train

log = logging.getLogger(__name__)
DocumentSource = Callable[[str], Iterator[Document]]
SOURCES = ("code", "synthetic_code", "files", "seed_tokens")
SOURCE_OPTIONS = {
    "files": {"paths", "include", "exclude", "max_file_bytes", "text_field"},
    "seed_tokens": {"sample_seed"},
}


def check_source_options(name: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - SOURCE_OPTIONS.get(name, set()))
    if unknown:
        allowed = sorted(SOURCE_OPTIONS.get(name, set())) or "none"
        raise ValueError(f"data.source={name!r} does not take {unknown}; its options: {allowed}")


def make_source(
    name: str, holdout_mod: int, num_samples: int = 16000, seed: int = 0, **options: Any
) -> DocumentSource:
    """The document stream of a named text corpus, by split."""
    if holdout_mod < 2:
        raise ValueError(f"data.holdout_mod must be >= 2, got {holdout_mod}")
    if name not in SOURCES:
        raise ValueError(f"unknown data.source {name!r}; expected one of {list(SOURCES)}")
    check_source_options(name, options)
    if name == "code":
        return lambda split: stdlib_documents(split, holdout_mod)
    if name == "synthetic_code":
        from nanoternary.data.synthetic import synthetic_documents

        return lambda split: split_documents(synthetic_documents(num_samples, seed), split, holdout_mod)
    if name == "files":
        from nanoternary.data.files import FilesSource

        return FilesSource(holdout_mod=holdout_mod, **options)
    raise ValueError("data.source='seed_tokens' is token ids, not documents: it has no text")


@dataclass
class PreparedCorpus:
    """Token streams of both splits; for token-id data (`seed_tokens`) there is no tokenizer and the
    splits are 2-D arrays of whole samples instead of 1-D streams."""

    tokenizer: TextTokenizer | None
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    corpus_hash: str
    cache_dir: Path
    token_vocab: int | None = None

    @property
    def tokenizer_hash(self) -> str | None:
        return self.tokenizer.fingerprint if self.tokenizer is not None else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer is not None else int(self.token_vocab or 0)

    @property
    def eot_id(self) -> int | None:
        return self.tokenizer.eot_id if self.tokenizer is not None else None

    def token_bytes(self) -> list[int] | None:
        """Bytes per token id for bits-per-byte; None for token-id data, where bpb is undefined."""
        return self.tokenizer.token_bytes().tolist() if self.tokenizer is not None else None


def rows_per_shard(batch_size: int, shards: int) -> int:
    if shards < 1 or batch_size % shards:
        raise ValueError(
            f"data.batch_size={batch_size} must be a positive multiple of data.shards_per_device={shards}"
        )
    return batch_size // shards


class IndexedBatches(IterableDataset):
    """An endless stream of batch(start), batch(start + 1), ...: resuming needs only the start index."""

    start: int

    def batch(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


class StepBatches(IndexedBatches):
    """Endless stream of (batch, seq_len + 1) windows, drawn as `shards` equal parts. Part s of item i
    depends only on (seed, i, s) and rank r draws parts r*shards ... (r+1)*shards - 1, so N ranks with
    batch B see exactly the rows of 1 rank with batch N*B and shards=N: the data do not depend on how
    a run is spread over devices."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        shards: int = 1,
    ):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )
        self.rows_per_shard = rows_per_shard(batch_size, shards)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.start, self.rank, self.shards = seed, start, rank, shards

    def batch(self, index: int) -> torch.Tensor:
        rows = []
        for shard in range(self.rank * self.shards, (self.rank + 1) * self.shards):
            rng = np.random.default_rng([self.seed, index, shard])
            offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.rows_per_shard)
            rows += [self.tokens[o : o + self.seq_len + 1] for o in offsets]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


class Windows(Dataset):
    """Non-overlapping (seq_len + 1)-token windows: every held-out token is predicted exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len
        if self.count == 0:
            raise ValueError(
                f"held-out split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> torch.Tensor:
        start = j * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class RowBatches(IndexedBatches):
    """Endless batches of whole samples (rows): every epoch visits each row once in a fresh order,
    like the original's shuffled loader; item i still depends only on (seed, i, rank). The order is
    shared and micro-batch i of rank r is slice i * world + r of it: ranks never draw the same row, and
    N ranks with batch B see exactly the rows of 1 rank with batch N*B."""

    def __init__(
        self,
        rows: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        if rows.ndim != 2 or len(rows) == 0 or rows.shape[1] < seq_len + 1:
            raise ValueError(
                f"training rows of shape {rows.shape} cannot hold seq_len + 1 = {seq_len + 1} tokens"
            )
        self.rows, self.batch_size, self.seq_len = rows, batch_size, seq_len
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.rows))
        return self._orders[epoch]

    def batch(self, index: int) -> torch.Tensor:
        first = (index * self.world + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        picks = [self.order(p // len(self.rows))[p % len(self.rows)] for p in positions]
        return torch.from_numpy(self.rows[picks, : self.seq_len + 1].astype(np.int64))


class Rows(Dataset):
    """Held-out whole samples, one window each (the first seq_len + 1 tokens of every row)."""

    def __init__(self, rows: np.ndarray, seq_len: int):
        if rows.ndim != 2 or len(rows) == 0 or rows.shape[1] < seq_len + 1:
            raise ValueError(
                f"held-out rows of shape {rows.shape} cannot hold seq_len + 1 = {seq_len + 1} tokens"
            )
        self.rows, self.seq_len = rows, seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> torch.Tensor:
        return torch.from_numpy(self.rows[j, : self.seq_len + 1].astype(np.int64))


class TokenDataModule(L.LightningDataModule):
    """Extra keyword arguments are options of the named source (e.g. `paths` for `files`)."""

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
        tokenizer_path: str | None = None,
        shards_per_device: int = 1,
        **source_options: Any,
    ) -> None:
        super().__init__()
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"data.batch_size and data.seq_len must be >= 1, got {batch_size} and {seq_len}")
        rows_per_shard(batch_size, shards_per_device)
        self.shards_per_device = shards_per_device
        self.source_name = source
        self.token_rows: SeedTokens | None = None
        self.documents: DocumentSource | None = None
        if source == "seed_tokens":
            check_source_options(source, source_options)
            if holdout_mod < 2:
                raise ValueError(f"data.holdout_mod must be >= 2, got {holdout_mod}")
            if tokenizer_path:
                raise ValueError(
                    "data.tokenizer_path does not apply to data.source='seed_tokens': it is token ids"
                )
            self.token_rows = SeedTokens(num_samples, seq_len + 1, vocab_size, holdout_mod, **source_options)
        else:
            self.documents = make_source(source, holdout_mod, num_samples, seed, **source_options)
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed, self.holdout_mod, self.num_samples = seed, holdout_mod, num_samples
        self.tokenizer_path = Path(tokenizer_path).expanduser() if tokenizer_path else None
        self.val_batch_size, self.num_workers = val_batch_size, num_workers
        self.start_step = 0
        self.corpus: PreparedCorpus | None = None
        self._split_hashes: dict[str, str] = {}

    @property
    def has_text(self) -> bool:
        """False for token-id data: no tokenizer, no bytes, so no bits per byte and no compressors."""
        return self.documents is not None

    def settings_key(self) -> str:
        """Everything besides the text itself that changes the cached tokens."""
        settings = dict(source=self.source_name, holdout_mod=self.holdout_mod, vocab_size=self.vocab_size)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    def text_documents(self, split: str) -> Iterator[Document]:
        if self.documents is None:
            raise ValueError(f"data.source={self.source_name!r} is token-id data: it has no text documents")
        return self.documents(split)

    def split_hash(self, split: str) -> str:
        """sha256 of one split's documents (names and texts), computed once; an empty split is an error."""
        if split not in self._split_hashes:
            digest = corpus_fingerprint(self.text_documents(split))
            if digest == corpus_fingerprint(iter(())):
                what = "held-out" if split == "val" else "training"
                raise ValueError(
                    f"data source {self.source_name!r} has no {what} documents (holdout_mod={self.holdout_mod})"
                )
            self._split_hashes[split] = digest
        return self._split_hashes[split]

    def tokenizer_file(self) -> Path:
        """data.tokenizer_path (a tokenizer.json or a folder holding one) if set, else where the tokenizer
        trained on the training split is cached, under the split's hash and the settings."""
        if self.tokenizer_path is not None:
            path = self.tokenizer_path
            return path / "tokenizer.json" if path.is_dir() else path
        return self.cache_dir / "tokenizers" / f"{self.split_hash('train')[:16]}-{self.settings_key()}.json"

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer at tokenizer_file(), trained on the training split first if it is not there."""
        if self.tokenizer_path is not None:
            return TextTokenizer.from_file(self.tokenizer_file())
        texts = (d.text for d in self.text_documents("train"))
        return load_or_train(self.tokenizer_file(), texts, self.vocab_size)

    def split_tokens(self, split: str, tokenizer: TextTokenizer) -> np.ndarray:
        """One split's token stream (memmap), cached under its documents' hash, the settings and the tokenizer."""
        name = f"{split}-{self.split_hash(split)[:16]}-{self.settings_key()}-{tokenizer.fingerprint[:12]}.bin"
        return cached_tokens(self.text_documents(split), tokenizer, self.cache_dir / "tokens" / name)

    def prepare(self) -> PreparedCorpus:
        """Tokenizer and token caches for both splits, built on first use; idempotent."""
        if self.corpus is not None:
            return self.corpus
        if self.token_rows is not None:
            train, val = self.token_rows.rows("train"), self.token_rows.rows("val")
            if len(train) == 0 or len(val) == 0:
                raise ValueError(
                    f"data.source='seed_tokens' has an empty split (holdout_mod={self.holdout_mod})"
                )
            self.corpus = PreparedCorpus(
                tokenizer=None,
                train_tokens=train,
                val_tokens=val,
                corpus_hash=hashlib.sha256(train.tobytes()).hexdigest(),
                cache_dir=self.cache_dir,
                token_vocab=self.vocab_size,
            )
            return self.corpus
        tok = self.tokenizer()
        self.corpus = PreparedCorpus(
            tokenizer=tok,
            train_tokens=self.split_tokens("train", tok),
            val_tokens=self.split_tokens("val", tok),
            corpus_hash=self.split_hash("train"),
            cache_dir=self.cache_dir / "tokens",
        )
        return self.corpus

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def heldout_bytes(self) -> bytes:
        """The held-out text exactly as the evaluation sees it (documents joined, no separators)."""
        return b"".join(d.text.encode("utf-8") for d in self.text_documents("val"))

    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def state_dict(self) -> dict[str, Any]:
        """The data position for resume. Batch i is a pure function of (seed, i, rank), so the number of
        micro-batches consumed is all the state there is; the settings are kept to flag a changed order."""
        consumed = (
            self.trainer.fit_loop.epoch_loop.batch_progress.total.ready if self.trainer else self.start_step
        )
        return {
            "micro_step": int(consumed),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "source": self.source_name,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        now = {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "source": self.source_name,
        }
        for key, value in now.items():
            if key in state_dict and state_dict[key] != value:
                log.warning(
                    "resuming with data.%s=%r where the checkpoint had %r: the batches differ from the "
                    "original run's",
                    key,
                    value,
                    state_dict[key],
                )
        self.start_step = int(state_dict["micro_step"])

    def train_dataloader(self) -> DataLoader:
        train = self.prepare().train_tokens
        if train.ndim == 2:
            batches = RowBatches(
                train,
                self.batch_size,
                self.seq_len,
                self.seed,
                self.start_step,
                self.rank(),
                world=self.world_size(),
            )
        else:
            batches = StepBatches(
                train,
                self.batch_size,
                self.seq_len,
                self.seed,
                self.start_step,
                self.rank(),
                shards=self.shards_per_device,
            )
        return DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory()
        )

    def pin_memory(self) -> bool:
        """Page-locked training batches when the trainer runs on CUDA: Lightning copies batches to the device
        with non_blocking=True, which is only asynchronous from pinned memory."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def heldout_windows(self) -> Dataset:
        val = self.prepare().val_tokens
        return Rows(val, self.seq_len) if val.ndim == 2 else Windows(val, self.seq_len)

    def heldout_dataloader(self) -> DataLoader:
        """Every held-out window, for a full evaluation in one process (the final export)."""
        return DataLoader(
            self.heldout_windows(),
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the held-out windows, in a fixed shuffled order: with limit_val_batches=k
        (training's quick validations) the k * val_batch_size * world_size windows scored are a sample of
        the whole split, not its first files, so the in-training val/bpb estimates the final full pass.
        Ranks take every world_size-th window of that order, so they score disjoint windows."""
        windows, rank, world = self.heldout_windows(), self.rank(), self.world_size()
        if len(windows) < world:
            raise ValueError(f"the held-out split has {len(windows)} windows, fewer than the {world} ranks")
        order = np.random.default_rng(0).permutation(len(windows))
        shard = Subset(windows, order[rank::world].tolist())
        return DataLoader(shard, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers)
