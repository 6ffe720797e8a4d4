import math

import pytest

from nanoternary.lit.callbacks.wsd import WSDSchedule, wsd_multiplier


def mult(step, shape="linear"):
    return wsd_multiplier(
        step, total_steps=1000, warmup_steps=100, decay_fraction=0.2, final_mult=0.1, shape=shape
    )


def test_warmup_starts_above_zero_and_ends_at_one():
    assert mult(1) == pytest.approx(0.01)
    assert mult(50) == pytest.approx(0.5)
    assert mult(100) == 1.0


def test_stable_until_decay_start_then_decays_to_floor():
    assert mult(101) == 1.0 and mult(800) == 1.0
    assert mult(900) == pytest.approx(0.1 + 0.9 * 0.5)
    assert mult(900, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert mult(900, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    for shape in ("linear", "cosine", "1-sqrt"):
        assert mult(1000, shape) == pytest.approx(0.1)


def test_clamped_after_the_end_never_oscillates():
    values = [mult(s, "cosine") for s in range(1000, 3001)]
    assert values == [pytest.approx(0.1)] * len(values)


def test_monotone_decay():
    values = [mult(s, "1-sqrt") for s in range(800, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"decay_fraction": 1.5}, r"decay_fraction must be in \[0, 1\]"),
        ({"final_mult": 2.0}, r"final_mult must be in \[0, 1\]"),
        ({"shape": "exp"}, "shape must be one of"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WSDSchedule(**kwargs)
