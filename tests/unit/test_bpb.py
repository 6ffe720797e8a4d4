import bz2
import gzip
import lzma
import math

import pytest
import torch

from nanoternary.evals.bpb import compression_bpb, nll_bytes_sums, score_from_sums


def test_compression_baselines_on_a_known_string():
    data = b"def f(x):\n    return x + 1\n" * 200
    result = compression_bpb(data)
    assert result["gzip"] == 8 * len(gzip.compress(data, 9, mtime=0)) / len(data)
    assert result["bzip2"] == 8 * len(bz2.compress(data, 9)) / len(data)
    assert result["xz"] == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert result["xz"] < 0.2
    with pytest.raises(ValueError, match="empty text"):
        compression_bpb(b"")


class Uniform(torch.nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, 4)


def test_bpb_arithmetic_by_hand():
    # uniform over 4 tokens: ln 4 nats per token; tokens 1,2,3 cost 1,2,3 bytes; token 0 is EOT (excluded)
    batch = torch.tensor([[1, 2, 0, 3, 3]])
    sums = nll_bytes_sums(Uniform(), batch, torch.tensor([0, 1, 2, 3]), eot_id=0)
    assert sums.tolist() == pytest.approx([3 * math.log(4), 3, 8])
    score = score_from_sums(sums)
    assert score.loss == pytest.approx(math.log(4))
    assert score.bpb == pytest.approx(3 * 2 / 8)  # 2 bits per token, 8 bytes
    with pytest.raises(ValueError, match="saw no tokens"):
        score_from_sums(torch.zeros(3))


def test_token_id_data_has_a_loss_but_no_bits_per_byte():
    # every token stands for 0 bytes (no text): the loss is defined, bits per byte is not
    batch = torch.tensor([[1, 2, 0, 3, 3]])
    score = score_from_sums(nll_bytes_sums(Uniform(), batch, torch.zeros(4, dtype=torch.long), eot_id=None))
    assert score.loss == pytest.approx(math.log(4)) and score.tokens == 4
    assert score.bpb is None and score.bytes == 0
