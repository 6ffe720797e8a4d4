"""The `seed_tokens` data source: the original system's "synthetic code", which was token ids, not text.

REFERENCE.md section 1: sample i of `num_samples` holds `sample_len` ids (seq_len + 1) and follows
the i % 3 rule: a repeated id `i % (V - 1) + 1`, a run `(i % V + j) % V`, or uniform random ids from
one generator seeded once and drawn in sample order. The original drew from Rust's `StdRng` (ChaCha);
numpy's PCG64 cannot reproduce that stream, so the random third differs id by id while having the
same distribution. Everything else is exact. Only the random third carries information a model cannot
learn, so the loss floor is about share_random x ln(V) = ln(4096) / 3 ~ 2.77 nats.

There is no text here: no tokenizer, no bytes, so bits per byte is undefined; only the loss is.
"""

from __future__ import annotations

import math

import numpy as np

from nanoternary.data.cache import token_dtype
from nanoternary.data.sources import is_heldout, wants_heldout

ORIGINAL_NUM_SAMPLES = 16_000
ORIGINAL_SAMPLE_SEED = 42


def seed_samples(
    num_samples: int, sample_len: int, vocab_size: int, seed: int = ORIGINAL_SAMPLE_SEED
) -> np.ndarray:
    """All samples as one (num_samples, sample_len) array, generated in order like the original."""
    if num_samples < 1 or sample_len < 2:
        raise ValueError(
            f"seed_tokens needs num_samples >= 1 and sample_len >= 2, got {num_samples}, {sample_len}"
        )
    if vocab_size < 2:
        raise ValueError(f"seed_tokens needs vocab_size >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    out = np.empty((num_samples, sample_len), dtype=token_dtype(vocab_size))
    offsets = np.arange(sample_len)
    for i in range(num_samples):
        kind = i % 3
        if kind == 0:
            out[i] = i % (vocab_size - 1) + 1
        elif kind == 1:
            out[i] = (i % vocab_size + offsets) % vocab_size
        else:
            out[i] = rng.integers(0, vocab_size, size=sample_len)
    return out


def sample_name(index: int) -> str:
    """The name a sample is split by (like a file's relative path in the text sources)."""
    return f"seed_tokens/{index:06d}"


def loss_floor(num_samples: int, vocab_size: int) -> float:
    """Mean next-token loss of a model that knows the rule: ln(V) on random samples, 0 elsewhere.

    The first prediction of each sample (which kind is it?) adds < 0.01 nats at 256 tokens per sample.
    """
    random_share = sum(1 for i in range(num_samples) if i % 3 == 2) / num_samples
    return random_share * math.log(vocab_size)


class SeedTokens:
    """Rows of one split: sample i is held out iff its name hashes to 0 mod `holdout_mod`."""

    def __init__(
        self,
        num_samples: int,
        sample_len: int,
        vocab_size: int,
        holdout_mod: int,
        sample_seed: int = ORIGINAL_SAMPLE_SEED,
    ) -> None:
        self.num_samples, self.sample_len, self.vocab_size = num_samples, sample_len, vocab_size
        self.holdout_mod, self.sample_seed = holdout_mod, sample_seed

    def settings(self) -> dict[str, int]:
        return dict(
            num_samples=self.num_samples,
            sample_len=self.sample_len,
            vocab_size=self.vocab_size,
            holdout_mod=self.holdout_mod,
            sample_seed=self.sample_seed,
        )

    def rows(self, split: str) -> np.ndarray:
        want_val = wants_heldout(split)
        samples = seed_samples(self.num_samples, self.sample_len, self.vocab_size, self.sample_seed)
        keep = [
            i for i in range(self.num_samples) if is_heldout(sample_name(i), self.holdout_mod) == want_val
        ]
        return samples[keep]
