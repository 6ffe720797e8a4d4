"""data=seed_tokens: the original run's token-id samples, their split and whole-sample batches."""

import math

import numpy as np
import pytest
import torch

from nanoternary.data.datamodule import RowBatches, Rows, TokenDataModule
from nanoternary.data.seed_tokens import SeedTokens, loss_floor, sample_name, seed_samples
from nanoternary.data.sources import is_heldout


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return seed_samples(16_000, 257, 4096)


def test_the_original_shape_and_the_i_mod_3_rule(samples):
    assert samples.shape == (16_000, 257) and samples.dtype == np.uint16
    i = np.arange(16_000)
    j = np.arange(257)
    repeated, runs, random = samples[i % 3 == 0], samples[i % 3 == 1], samples[i % 3 == 2]
    assert np.array_equal(repeated, np.repeat((i[i % 3 == 0] % 4095 + 1)[:, None], 257, axis=1))
    assert np.array_equal(runs, (i[i % 3 == 1, None] % 4096 + j) % 4096)
    assert samples[0].tolist() == [1] * 257
    assert samples[12_285].tolist() == [1] * 257  # 12285 % 4095 == 0: the repeated id never is 0
    assert samples[4093, :5].tolist() == [4093, 4094, 4095, 0, 1]  # runs wrap around the vocabulary
    # the random third: uniform over all 4096 ids, no row constant
    assert random.shape == (5333, 257)
    counts = np.bincount(random.ravel(), minlength=4096)
    assert counts.min() > 200 and counts.max() < 475  # expected 334.6 per id
    assert (random.min(axis=1) < random.max(axis=1)).all()


def test_seeded_and_reproducible(samples):
    assert np.array_equal(seed_samples(300, 257, 4096), samples[:300])  # sample i never depends on the count
    other = seed_samples(300, 257, 4096, seed=7)
    assert np.array_equal(other[0::3], samples[:300:3]) and np.array_equal(other[1::3], samples[1:300:3])
    assert not np.array_equal(other[2::3], samples[2:300:3])
    with pytest.raises(ValueError, match="num_samples >= 1 and sample_len >= 2"):
        seed_samples(0, 257, 4096)


def test_loss_floor_is_a_third_of_ln_vocab():
    assert loss_floor(16_000, 4096) == pytest.approx(5333 / 16_000 * math.log(4096))
    assert loss_floor(16_000, 4096) == pytest.approx(2.7724, abs=1e-4)


def test_split_by_sample_name_is_disjoint_and_complete(samples):
    source = SeedTokens(16_000, 257, 4096, holdout_mod=20)
    val_ids = [i for i in range(16_000) if is_heldout(sample_name(i), 20)]
    train, val = source.rows("train"), source.rows("val")
    assert len(train) + len(val) == 16_000
    assert np.array_equal(val, samples[val_ids])
    assert 700 < len(val) < 900
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        source.rows("test")


def test_row_batches_visit_every_sample_once_per_epoch():
    rows = seed_samples(40, 9, 4096)
    stream = RowBatches(rows, batch_size=8, seq_len=8, seed=3)
    epoch = torch.cat([stream.batch(i) for i in range(5)])
    assert epoch.shape == (40, 9) and epoch.dtype == torch.int64
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows.astype(np.int64).tolist()))
    assert not torch.equal(epoch, torch.from_numpy(rows.astype(np.int64)))  # shuffled
    assert torch.equal(RowBatches(rows, 8, 8, seed=3, start=4).__iter__().__next__(), stream.batch(4))
    next_epoch = torch.cat([stream.batch(i) for i in range(5, 10)])
    assert not torch.equal(next_epoch, epoch)  # a new order each epoch
    with pytest.raises(ValueError, match="cannot hold seq_len \\+ 1 = 10 tokens"):
        RowBatches(rows, 8, 9, seed=0)


def test_seed_tokens_datamodule(tmp_path):
    dm = TokenDataModule("seed_tokens", batch_size=8, seq_len=256, vocab_size=4096, cache_dir=str(tmp_path))
    corpus = dm.prepare()
    assert not dm.has_text and corpus.tokenizer is None
    assert corpus.vocab_size == 4096 and corpus.eot_id is None and corpus.token_bytes() is None
    assert corpus.train_tokens.shape[1] == 257 and len(corpus.train_tokens) + len(corpus.val_tokens) == 16_000
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 257) and batch.dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val.shape == (16, 257)
    assert isinstance(dm.heldout_windows(), Rows)
    with pytest.raises(ValueError, match="token-id data: it has no text documents"):
        dm.heldout_bytes()
    with pytest.raises(ValueError, match="data.tokenizer_path does not apply"):
        TokenDataModule("seed_tokens", 8, 256, 4096, str(tmp_path), tokenizer_path="tok.json")
    with pytest.raises(ValueError, match=r"does not take \['paths'\]; its options: \['sample_seed'\]"):
        TokenDataModule("seed_tokens", 8, 256, 4096, str(tmp_path), paths=["x"])


def test_a_limited_validation_pass_samples_the_whole_held_out_split(tmp_path):
    """Quick validations (limit_val_batches) score the first batches: those must be spread over the split."""
    dm = TokenDataModule("seed_tokens", batch_size=8, seq_len=256, vocab_size=4096, cache_dir=str(tmp_path))
    dm.prepare()
    windows, loader = dm.heldout_windows(), dm.val_dataloader()
    seen = loader.dataset.indices  # the order the loader reads the windows in
    assert sorted(seen) == list(range(len(windows)))  # every held-out window once
    assert torch.equal(next(iter(loader)), torch.stack([windows[j] for j in seen[: dm.val_batch_size]]))
    first = seen[: dm.val_batch_size]
    assert min(first) < len(windows) // 4 and max(first) >= 3 * len(windows) // 4
