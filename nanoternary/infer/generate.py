"""Greedy text completion straight from a TernaryLM: the end-of-training sample and a reference path."""

from __future__ import annotations

import torch

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.model.transformer import TernaryLM


@torch.no_grad()
def greedy_complete(model: TernaryLM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Argmax decoding, recomputing the (short) context each step; stops at end-of-text."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt encodes to no tokens")
    device = next(model.parameters()).device
    window = model.cfg.context_length
    out: list[int] = []
    for _ in range(max_new_tokens):
        ctx = torch.tensor([(ids + out)[-window:]], device=device)
        nxt = int(model(ctx)[0, -1].argmax())
        if nxt == tokenizer.eot_id:
            break
        out.append(nxt)
    return tokenizer.decode(out)
