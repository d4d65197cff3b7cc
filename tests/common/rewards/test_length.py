"""Length rewards (common/rewards/length.py): DAPO's overlong penalty on the spec's table, units, bad input."""

import pytest
import torch

from common.rewards.length import LengthReward, OverlongPenalty, overlong_penalty


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (16, 0.0),  # |y| <= L_max − L_cache = 16 -> 0
        (17, -0.25),  # (16 − 17) / 4
        (18, -0.5),  # (16 − 18) / 4
        (20, -1.0),  # (16 − 20) / 4 = −1 at L_max
        (21, -1.0),  # beyond L_max: −1
        (500, -1.0),
    ],
)
def test_overlong_penalty_spec_table(length: int, expected: float) -> None:
    out = overlong_penalty(torch.tensor([length]), max_len=20, cache_len=4)
    assert out.tolist() == [expected]


def test_overlong_penalty_factor_scales_and_reward_class_counts_chars_or_words() -> None:
    assert overlong_penalty(torch.tensor([18, 30]), 20, 4, factor=0.5).tolist() == [-0.25, -0.5]
    texts = ["x" * 16, "x" * 18, "x" * 21, " ".join(["w"] * 18)]  # the last: 35 chars, 18 words
    assert OverlongPenalty(20, 4)(texts, [{}] * 4).tolist() == [0.0, -0.5, -1.0, -1.0]
    assert OverlongPenalty(20, 4, unit="words")(texts, [{}] * 4).tolist() == [0.0, 0.0, 0.0, -0.5]
    assert OverlongPenalty(20, 4).name == "overlong"


def test_overlong_penalty_bad_input_raises_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="cache_len must be in"):
        OverlongPenalty(max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="cache_len must be in"):
        overlong_penalty(torch.tensor([1]), max_len=4, cache_len=5)
    with pytest.raises(ValueError, match="factor must be >= 0"):
        OverlongPenalty(20, 4, factor=-1.0)
    with pytest.raises(ValueError, match="unit must be 'chars' or 'words'"):
        OverlongPenalty(20, 4, unit="tokens")


def test_length_reward_is_zero_at_target() -> None:
    assert LengthReward(target=4)(["abcd", "ab", "abcdef"], [{}] * 3).tolist() == [0.0, -0.5, -0.5]
