"""Held-out loss and bits per byte, and the compressors' bits per byte on the same text.

bpb = total next-token NLL (nats) / (ln 2 x UTF-8 bytes of the predicted tokens): it does not depend
on the tokenizer, so it is comparable across vocabularies and with gzip/bzip2/xz. Token-id data (no
text: every token is 0 bytes) has a loss but no bpb, which is then None.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class HeldoutScore:
    loss: float  # mean nats per predicted (non end-of-text) token
    bpb: float | None  # None when the tokens stand for no bytes (token-id data)
    tokens: int
    bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def nll_bytes_sums(
    model: torch.nn.Module, batch: torch.Tensor, token_bytes: torch.Tensor, eot_id: int | None
) -> torch.Tensor:
    """[sum NLL, predicted-token count, byte count] of a (batch, seq + 1) block; end-of-text targets excluded."""
    inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
    logits = model(inputs).float().flatten(0, 1)
    nll = F.cross_entropy(logits, targets, reduction="none")
    keep = targets != (eot_id if eot_id is not None else -1)
    return torch.stack(
        [nll[keep].sum().double(), keep.sum().double(), token_bytes[targets[keep]].sum().double()]
    )


def score_from_sums(sums: torch.Tensor) -> HeldoutScore:
    nll_sum, count, nbytes = (float(v) for v in sums)
    if count == 0:
        raise ValueError("held-out evaluation saw no tokens")
    bpb = nll_sum / (math.log(2) * nbytes) if nbytes else None
    return HeldoutScore(loss=nll_sum / count, bpb=bpb, tokens=int(count), bytes=int(nbytes))


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], token_bytes: torch.Tensor, eot_id: int | None
) -> HeldoutScore:
    """Score a model over every batch of held-out windows."""
    sums = torch.zeros(3, dtype=torch.float64)
    device = token_bytes.device
    for batch in batches:
        sums += nll_bytes_sums(model, batch.to(device), token_bytes, eot_id).cpu()
    return score_from_sums(sums)


def compression_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bzip2 -9 and xz -9e on `data` (compressed as one stream each)."""
    if not data:
        raise ValueError("cannot compute compression baselines of empty text")
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bzip2": len(bz2.compress(data, compresslevel=9)),
        "xz": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8.0 * size / len(data) for name, size in sizes.items()}
