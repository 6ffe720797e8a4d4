import math

import pytest
import torch

from nanoternary.infer.sampling import (
    SamplingParams,
    find_stop,
    make_generator,
    partial_stop_len,
    sample,
    top_k_mask,
    top_p_mask,
)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(1)) == 1
    assert sample(logits, SamplingParams(temperature=0.0)) == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = make_generator(seed)
        return [sample(logits, params, g) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_keeps_exactly_the_k_best():
    scores = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    masked = top_k_mask(scores, 2)
    assert torch.isinf(masked).tolist() == [True, False, True, False, True]
    assert masked[1] == 5.0 and masked[3] == 4.0
    assert torch.equal(top_k_mask(scores, 0), scores)  # 0 = off
    g = make_generator(0)
    picks = {sample(scores, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert picks == {1, 3}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    scores = probs.log()
    # 0.5 < 0.6: the second token is needed; 0.5 + 0.2 = 0.7 >= 0.6: the rest is dropped
    assert (~torch.isinf(top_p_mask(scores, 0.6))).tolist() == [True, True, False, False, False]
    assert (~torch.isinf(top_p_mask(scores, 0.5))).tolist() == [True, False, False, False, False]
    assert (~torch.isinf(top_p_mask(scores, 0.86))).tolist() == [True, True, True, True, False]
    # the order of the input does not matter
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert (~torch.isinf(top_p_mask(scores[perm], 0.6))).tolist() == [False, True, False, True, False]
    g = make_generator(0)
    picks = {sample(scores, SamplingParams(temperature=1.0, top_p=0.6), g) for _ in range(300)}
    assert picks == {0, 1}


def test_temperature_flattens_the_distribution():
    scores = torch.tensor([2.0, 0.0])
    g = make_generator(3)
    cold = sum(sample(scores, SamplingParams(temperature=0.25), g) for _ in range(400)) / 400
    hot = sum(sample(scores, SamplingParams(temperature=4.0), g) for _ in range(400)) / 400
    assert cold < 0.01  # p(1) = 1/(1+e^8)
    assert abs(hot - 1 / (1 + math.exp(0.5))) < 0.08


def test_find_stop_returns_the_earliest_match():
    assert find_stop("abc\ndef x", ["x", "\ndef"]) == 3
    assert find_stop("abc", ["zz"]) is None
    assert find_stop("a-b-c", ["-"], start=2) == 3
    assert find_stop("anything", []) is None


def test_partial_stop_len_holds_back_possible_stop_prefixes():
    assert partial_stop_len("hello\nde", ["\ndef"]) == 3
    assert partial_stop_len("hello\n", ["\ndef", "\n\n"]) == 1
    assert partial_stop_len("hello", ["\ndef"]) == 0
    assert partial_stop_len("ab", ["abc", "bcd"]) == 2
    assert partial_stop_len("x", []) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="\n").stop == ["\n"]
