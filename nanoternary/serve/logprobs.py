"""Log-probabilities of generated tokens, in the two shapes OpenAI's endpoints return them.

They are the model's own distribution (log-softmax of the raw logits), before temperature, top-k and
top-p reshape it for sampling. One entry per generated token, so there are exactly
`usage.completion_tokens` of them (end-of-text is not a completion token and has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.serve.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


@dataclass(frozen=True)
class TokenScore:
    """One generated token: its id, log-probability and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def score(logits: torch.Tensor, token_id: int, top: int) -> TokenScore:
    """Log-probability of `token_id` under one row of logits (vocab,), and the `top` best tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenScore(token_id, float(logp[token_id]), pairs)


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character; this maps the characters back.

    Printable Latin-1 bytes stand for themselves, the other 68 bytes take the code points from 256 up,
    in byte order: the convention every byte-level BPE (GPT-2's, and ours) follows.
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


class TokenText:
    """A token's text and exact bytes (a byte-level token may hold part of a UTF-8 character)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.table = _byte_level_table()

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.tokenizer.id_to_token(token_id) or ""
        if all(c in self.table for c in piece):
            return [self.table[c] for c in piece]
        return list(self.tokenizer.decode([token_id]).encode("utf-8"))  # a special token

    def text(self, token_id: int) -> str:
        return bytes(self.bytes(token_id)).decode("utf-8", errors="replace")


def completion_logprobs(scores: list[TokenScore], names: TokenText) -> CompletionLogprobs:
    """The /v1/completions `logprobs` object (`text_offset`: where each token starts in the text)."""
    tokens = [names.text(s.token_id) for s in scores]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[s.logprob for s in scores],
        top_logprobs=[{names.text(i): lp for i, lp in s.top} for s in scores],
        text_offset=offsets,
    )


def chat_logprobs(scores: list[TokenScore], names: TokenText) -> ChatLogprobs:
    """The /v1/chat/completions `logprobs` object."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=names.text(token_id), logprob=logprob, bytes=names.bytes(token_id))

    return ChatLogprobs(
        content=[
            TokenLogprob(
                **entry(s.token_id, s.logprob).model_dump(), top_logprobs=[entry(i, lp) for i, lp in s.top]
            )
            for s in scores
        ]
    )
