import itertools
import math

import pytest
import torch

from common.metrics import MajorityAtK, PassAtK, majority_vote, pass_at_k


def test_pass_at_k_hand_computed() -> None:
    correct = torch.tensor(
        [
            [True, True, False, False],  # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
            [False, False, False, False],  # c=0: 0
            [True, False, False, False],  # c=1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
            [True, True, True, False],  # n-c=1 < k: 1
        ]
    )
    expected = torch.tensor([5 / 6, 0.0, 1 / 2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(pass_at_k(correct, 2), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pass_at_k(correct, 1), correct.double().mean(1), rtol=0, atol=1e-12)  # pass@1 = c/n


@pytest.mark.parametrize("seed", range(5))
def test_pass_at_k_equals_average_over_all_k_subsets(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=generator))
    correct = torch.rand(6, n, generator=generator) < torch.rand(6, 1, generator=generator)  # (P, n)
    for k in range(1, n + 1):
        brute = [
            sum(any(row[i] for i in subset) for subset in itertools.combinations(range(n), k)) / math.comb(n, k)
            for row in correct.tolist()
        ]  # fraction of the k-subsets of a prompt's samples that contain a correct one
        torch.testing.assert_close(pass_at_k(correct, k), torch.tensor(brute, dtype=torch.float64), rtol=0, atol=1e-12)


def test_pass_at_k_metric_accumulates_over_updates() -> None:
    metric = PassAtK(k=2)
    metric.update(torch.tensor([[True, True, False, False]]))  # 5/6 (above)
    metric.update(torch.tensor([[False, False], [True, False]]))  # n=2, k=2: 0 and 1
    torch.testing.assert_close(metric.compute(), torch.tensor((5 / 6 + 0 + 1) / 3, dtype=torch.float64))


def test_pass_at_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="k=3, n=2"):
        PassAtK(k=3).update(torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        PassAtK(k=1).update(torch.ones(4, 2))
    with pytest.raises(ValueError, match="k must be"):
        PassAtK(k=0)


def test_majority_vote() -> None:
    assert majority_vote(["3", "4", "4", "3", None]) == "3"  # tie 2-2: "3" appeared first
    assert majority_vote([None, None, "5"]) == "5"  # None never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_at_k() -> None:
    metric = MajorityAtK(k=3)
    answers = [
        ["7", "8", "7", "8", "8"],  # first 3: 7,8,7 -> "7" (the last two 8s are ignored): correct
        ["1", "2", "3"],  # three-way tie -> "1": wrong (target "2")
        [None, None, "9"],  # -> "9": correct
        [None, None, None],  # no answer: wrong
    ]
    metric.update(answers, ["7", "2", "9", "0"])
    assert metric.compute().item() == pytest.approx(2 / 4)
    metric.update([["5", "5", "6"]], ["5"])  # correct: 3 of 5
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_majority_at_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"answers\[1\] has 2 answers, maj@3 needs >= 3"):
        MajorityAtK(k=3).update([["1", "1", "1"], ["1", "1"]], ["1", "1"])
    with pytest.raises(ValueError, match="same length"):
        MajorityAtK(k=1).update([["1"]], ["1", "2"])
