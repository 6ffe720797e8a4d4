"""pass@k against values worked out by hand from 1 - C(n-c, k) / C(n, k)."""

from __future__ import annotations

import math

import pytest

from nanoternary.evals.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)=3, C(5,2)=10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
        (200, 1, 100, 0.5),  # C(199,100)/C(200,100) = 100/200
        (200, 10, 1, 0.05),
        (4, 0, 1, 0.0),  # c = 0
        (4, 0, 4, 0.0),  # c = 0 and n = k
        (4, 4, 1, 1.0),  # c = n
        (4, 4, 4, 1.0),  # c = n = k
        (3, 1, 3, 1.0),  # n = k: any correct sample is drawn
        (3, 2, 2, 1.0),  # n - c < k: a correct one is always among the k
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_form_everywhere() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match=r"^pass@10 needs at least 10 samples per problem, got 5$"):
        pass_at_k(5, 1, 10)


def test_pass_at_k_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match=r"^need 0 <= correct <= samples, got correct=6, samples=5$"):
        pass_at_k(5, 6, 1)


def test_mean_over_problems_reports_only_the_ks_that_n_allows() -> None:
    scores = mean_pass_at_k([(10, 0), (10, 10), (10, 5)], ks=[1, 10, 100])
    assert scores == {"pass@1": pytest.approx(0.5), "pass@10": pytest.approx(2 / 3)}


def test_mean_uses_the_smallest_sample_count_to_choose_ks() -> None:
    assert list(mean_pass_at_k([(10, 1), (1, 1)], ks=[10, 1])) == ["pass@1"]


def test_mean_needs_problems() -> None:
    with pytest.raises(ValueError, match="^no problems to score$"):
        mean_pass_at_k([], ks=[1])
