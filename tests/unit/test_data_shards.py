"""Per-rank training data: ranks draw distinct rows, and N ranks with batch B draw exactly the rows of one
process with batch N*B (data.shards_per_device=N for the random windows), so the data of a run do not
depend on how it is spread over devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanoternary.data.datamodule import RowBatches, StepBatches, TokenDataModule

TOKENS = np.arange(50_000, dtype=np.uint16)


@pytest.mark.parametrize("world", [2, 3])
def test_step_batches_of_n_ranks_are_one_process_with_n_shards(world: int):
    ranks = [StepBatches(TOKENS, 4, 16, seed=3, rank=r) for r in range(world)]
    single = StepBatches(TOKENS, 4 * world, 16, seed=3, shards=world)
    for index in (0, 1, 7):
        assert torch.equal(torch.cat([r.batch(index) for r in ranks]), single.batch(index))
    firsts = [r.batch(0)[:, 0].tolist() for r in ranks]
    assert len({tuple(f) for f in firsts}) == world  # every rank its own rows


def test_shards_split_a_rank_batch_into_seeded_parts():
    # rank 1 with 2 shards draws parts 2 and 3: what ranks 2 and 3 of a 4-rank run with batch 3 draw
    two = StepBatches(TOKENS, 6, 8, seed=0, rank=1, shards=2)
    assert torch.equal(
        two.batch(5), torch.cat([StepBatches(TOKENS, 3, 8, seed=0, rank=r).batch(5) for r in (2, 3)])
    )


def test_shards_must_divide_the_batch(tmp_path):
    with pytest.raises(
        ValueError, match="data.batch_size=6 must be a positive multiple of data.shards_per_device=4"
    ):
        StepBatches(TOKENS, 6, 8, seed=0, shards=4)
    with pytest.raises(
        ValueError, match="data.batch_size=4 must be a positive multiple of data.shards_per_device=0"
    ):
        TokenDataModule("code", 4, 8, 4096, str(tmp_path), shards_per_device=0)


def test_row_batches_partition_each_epoch_between_ranks():
    rows = np.arange(24 * 9, dtype=np.uint16).reshape(24, 9)  # row i starts with 9 * i
    ranks = [RowBatches(rows, 3, 8, seed=1, rank=r, world=2) for r in range(2)]
    single = RowBatches(rows, 6, 8, seed=1)
    for index in range(6):  # 4 global batches of 6 rows = one epoch, then into the next
        assert torch.equal(torch.cat([r.batch(index) for r in ranks]), single.batch(index))
    epoch = [int(x) // 9 for index in range(4) for r in ranks for x in r.batch(index)[:, 0]]
    assert sorted(epoch) == list(range(24))  # every row exactly once per epoch, no rank repeats another's
