import numpy as np
import pytest
import torch

from nanoternary.data.datamodule import StepBatches, TokenDataModule, Windows, make_source
from nanoternary.data.sources import is_heldout, stdlib_files


def test_stdlib_split_is_by_path_hash_and_disjoint():
    files = stdlib_files()
    names = [n for n, _ in files]
    assert names == sorted(names)
    assert not any(part in ("test", "tests") for n in names for part in n.split("/"))
    source = make_source("code", holdout_mod=20)
    train = [d.name for d in source("train")]
    val = [d.name for d in source("val")]
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == names
    assert val == [n for n in names if is_heldout(n, 20)]
    assert 0.02 < len(val) / len(names) < 0.09


def test_step_batches_are_a_pure_function_of_seed_and_index():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = StepBatches(tokens, batch_size=4, seq_len=16, seed=7)
    b = StepBatches(tokens, batch_size=4, seq_len=16, seed=7, start=5)
    first_ten = [batch for _, batch in zip(range(10), a, strict=False)]
    assert torch.equal(next(iter(b)), first_ten[5])
    assert first_ten[0].shape == (4, 17) and first_ten[0].dtype == torch.int64
    # each row is a contiguous window of the stream
    assert torch.equal(first_ten[3][:, 1:] - first_ten[3][:, :-1], torch.ones(4, 16, dtype=torch.int64))
    assert not torch.equal(StepBatches(tokens, 4, 16, seed=8).batch(0), a.batch(0))
    assert not torch.equal(StepBatches(tokens, 4, 16, seed=7, rank=1).batch(0), a.batch(0))


def test_windows_cover_every_token_once():
    w = Windows(np.arange(33, dtype=np.uint16), seq_len=8)
    assert len(w) == 4
    targets = torch.cat([w[i][1:] for i in range(len(w))])
    assert targets.tolist() == list(range(1, 33))


def test_empty_or_unknown_data_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data.source 'nope'"):
        make_source("nope", 20)
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 2"):
        StepBatches(np.arange(5, dtype=np.uint16), 2, 8, seed=0)
    with pytest.raises(ValueError, match="held-out split has 3 tokens"):
        Windows(np.arange(3, dtype=np.uint16), 8)
    with pytest.raises(ValueError, match="data.holdout_mod must be >= 2"):
        TokenDataModule("code", 2, 8, 4096, str(tmp_path), holdout_mod=1)


def test_prepared_corpus_tokenizer_and_cache(code_corpus):
    dm, corpus = code_corpus
    assert corpus.tokenizer.vocab_size == 4096
    assert corpus.train_tokens.dtype == np.uint16 and len(corpus.train_tokens) > 3_000_000
    heldout = dm.heldout_bytes()
    # every held-out byte is accounted for by the token byte table (EOT separators count 0)
    assert corpus.tokenizer.token_bytes()[np.asarray(corpus.val_tokens)].sum() == len(heldout)
    assert int((np.asarray(corpus.val_tokens) == corpus.tokenizer.eot_id).sum()) == len(
        list(dm.documents("val"))
    )
    again = TokenDataModule("code", 4, 64, 4096, str(dm.cache_dir)).prepare()
    assert again.cache_dir == corpus.cache_dir and again.tokenizer_hash == corpus.tokenizer_hash
