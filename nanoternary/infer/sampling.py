"""Choosing the next token (greedy, temperature, top-k, top-p; seeded per request) and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Decoding settings of one request (the OpenAI parameters of the same names).

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off; seed makes a sampled
    completion reproducible (None: a fresh random seed); generation stops at end-of-text, at the first
    stop string (which is not part of the text) or after max_tokens tokens.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of its own per request, so concurrent requests never disturb each other's draws."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere but the k highest scores (ties at the k-th score are kept)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose probabilities sum to >= p (nucleus)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token id from one row of logits (vocab,)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    scores = top_p_mask(top_k_mask(scores, params.top_k), params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop string that begins at or after `start` in `text` (None: no stop)."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string.

    A streamed completion holds this tail back: it may be the start of a stop string that the next token
    completes, and stop strings must never reach the client.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
