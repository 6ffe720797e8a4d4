"""Unbiased pass@k (Chen et al. 2021): the chance that at least one of k samples, drawn without
replacement from the n generated for a problem, is correct, given that c of the n are."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), as a product so that n = 200 neither overflows nor loses precision."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Average pass@k over problems given (samples, correct) per problem, for every k that the
    smallest sample count allows; the others are left out rather than reported as a biased number."""
    counts = list(counts)
    if not counts:
        raise ValueError("no problems to score")
    fewest = min(n for n, _ in counts)
    return {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        for k in sorted(set(ks))
        if k <= fewest
    }
