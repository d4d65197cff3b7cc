"""MC-GRPO and NGRPO (common/advantages/group.py): the papers' hand values, plain-loop references on shuffled
unequal groups, defining properties (one pivot dropped per group; NGRPO <= GRPO), degenerate groups, bad input."""

import statistics

import pytest
import torch

from common.advantages.group import MCGRPO, NGRPO, grpo, mc_grpo, ngrpo
from common.batch import RolloutBatch
from common.ops import group_sum


def shuffled_groups(sizes: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(len(ids), generator=generator)]  # (B,) non-contiguous groups


def make_batch(rewards: torch.Tensor, group_ids: torch.Tensor) -> RolloutBatch:
    B = rewards.shape[0]
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=torch.zeros(B, 3, dtype=torch.long),
                        completion_mask=torch.ones(B, 3, dtype=torch.bool), group_ids=group_ids, rewards=rewards)


# ------------------------------------------------------------------------------------------ references


def ref_mc_grpo(ids: list[int], rewards: list[float], scale: str = "mad", eps: float = 1e-3):
    adv, keep, pivot_of = [], [], {}
    for i, (g, r) in enumerate(zip(ids, rewards)):  # ok: the reference is a plain loop on purpose
        members = [rj for gj, rj in zip(ids, rewards) if gj == g]
        med = statistics.median(members)  # odd group: a member
        if scale == "mad":
            denom = statistics.median([abs(x - med) for x in members]) + eps
        elif scale == "std":
            denom = (statistics.stdev(members) if len(members) > 1 else 0.0) + eps
        else:
            denom = 1.0
        adv.append((r - med) / denom)
        if r == med and g not in pivot_of:
            pivot_of[g] = i  # the first row equal to the median is the pivot
        keep.append(pivot_of.get(g) != i)
    return adv, keep


def ref_ngrpo(ids: list[int], rewards: list[float], max_reward: float = 1.0, num_virtual: int = 1, eps: float = 1e-6):
    out = []
    for g, r in zip(ids, rewards):
        values = [rj for gj, rj in zip(ids, rewards) if gj == g] + [max_reward] * num_virtual
        if len(set(values)) == 1:
            out.append(0.0)
            continue
        out.append((r - statistics.fmean(values)) / (statistics.stdev(values) + eps))
    return out


# ---------------------------------------------------------------------------------------------- MC-GRPO


def test_mc_grpo_hand_computed() -> None:
    r = torch.tensor([0.0, 1.0, 1.0, 0.3, 0.1, 0.2])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a, keep = mc_grpo(r, g)
    # group 0 = [0, 1, 1]: med = 1, |r − med| = [1, 0, 0] -> MAD = 0 -> A = [−1/1e-3, 0, 0] = [−1000, 0, 0]
    #   pivot = row 1 (first row equal to the median)
    # group 1 = [0.3, 0.1, 0.2]: med = 0.2, |r − med| = [0.1, 0.1, 0] -> MAD = 0.1 -> A = ±0.1 / 0.101 = ±0.990
    #   pivot = row 5
    torch.testing.assert_close(a, torch.tensor([-1000.0, 0.0, 0.0, 0.1 / 0.101, -0.1 / 0.101, 0.0]), rtol=0, atol=1e-4)
    assert keep.tolist() == [True, False, True, True, True, False]


def test_mc_grpo_scale_std_and_none() -> None:
    r = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    g = torch.zeros(3, dtype=torch.long)
    # med = 1 ; r − med = [−1, 2, 0] ; σ (ddof=1) of [0, 3, 1]: μ = 4/3, Σ(r−μ)² = 16/9 + 25/9 + 1/9 = 42/9 -> σ = sqrt(7/3)
    a, keep = mc_grpo(r, g, scale="std")
    sd = (7 / 3) ** 0.5
    torch.testing.assert_close(a, torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64) / (sd + 1e-3), rtol=0, atol=1e-12)
    a, _ = mc_grpo(r, g, scale="none")
    assert a.tolist() == [-1.0, 2.0, 0.0] and keep.tolist() == [True, True, False]


@pytest.mark.parametrize("scale", ["mad", "std", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_mc_grpo_equals_plain_loop_on_shuffled_odd_groups(scale: str, seed: int) -> None:
    g = shuffled_groups([1, 3, 5, 7, 3], seed)  # B = 19, interleaved, odd sizes
    generator = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 4, (len(g),), generator=generator).double() * 0.5  # ties on purpose
    if seed % 2:
        r = torch.randn(len(g), generator=generator, dtype=torch.float64)
    a, keep = mc_grpo(r, g, scale=scale)
    ref_a, ref_keep = ref_mc_grpo(g.tolist(), r.tolist(), scale)
    torch.testing.assert_close(a, torch.tensor(ref_a, dtype=torch.float64), rtol=0, atol=1e-9)
    assert keep.tolist() == ref_keep


@pytest.mark.parametrize("seed", range(4))
def test_mc_grpo_drops_exactly_one_zero_advantage_pivot_per_group(seed: int) -> None:
    sizes = [3, 5, 3, 9, 1]
    g = shuffled_groups(sizes, seed)
    r = torch.randint(0, 2, (len(g),), generator=torch.Generator().manual_seed(seed)).float()  # 0/1 rewards
    a, keep = mc_grpo(r, g)
    dropped = group_sum((~keep).long(), g, len(sizes))
    assert dropped.tolist() == [1] * len(sizes)  # one pivot per group, whatever the ties
    assert (a[~keep] == 0).all()  # the pivot is a median member: A = 0
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 123456.7])
def test_mc_grpo_all_equal_group_gives_zeros_and_drops_one(value: float) -> None:
    r = torch.full((5,), value)
    a, keep = mc_grpo(r, torch.zeros(5, dtype=torch.long))
    assert a.tolist() == [0.0] * 5 and int((~keep).sum()) == 1


def test_mc_grpo_sign_is_sign_of_reward_minus_median() -> None:
    # the defining property: the baseline is the median, so with G + 1 = 3 exactly one kept rollout is above
    # and one below the median whenever the three rewards differ
    r = torch.tensor([5.0, -3.0, 0.5, 10.0, 11.0, 12.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a, keep = mc_grpo(r, g)
    assert torch.sign(a[keep]).tolist() == [1.0, -1.0, -1.0, 1.0]


def test_mc_grpo_even_group_size_raises_naming_the_size() -> None:
    with pytest.raises(ValueError, match=r"odd group size.*\[2, 4\]"):
        mc_grpo(torch.zeros(9), shuffled_groups([3, 2, 4], seed=0))
    with pytest.raises(ValueError, match="scale must be 'mad', 'std' or 'none'"):
        mc_grpo(torch.zeros(3), torch.zeros(3, dtype=torch.long), scale="mean")
    with pytest.raises(ValueError, match="eps must be > 0"):
        MCGRPO(eps=0.0)
    with pytest.raises(ValueError, match="rewards must be finite"):
        mc_grpo(torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3, dtype=torch.long))


def test_mcgrpo_class_returns_advantages_and_keep() -> None:
    g = shuffled_groups([3, 3, 5], seed=3)
    r = torch.randn(len(g), generator=torch.Generator().manual_seed(3))
    a, keep = MCGRPO(scale="std", eps=1e-2)(make_batch(r, g))
    ref_a, ref_keep = mc_grpo(r, g, scale="std", eps=1e-2)
    torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
    assert keep.dtype == torch.bool and keep.tolist() == ref_keep.tolist()


# ------------------------------------------------------------------------------------------------ NGRPO


def test_ngrpo_papers_case_study_g8_one_correct() -> None:
    r = torch.tensor([1.0] + [0.0] * 7)
    g = torch.zeros(8, dtype=torch.long)
    # R' = {1, 0 x 7} ∪ {1}: μ' = 2/9 ; Σ(r − μ')² = 2·(7/9)² + 7·(2/9)² = 126/81 ; σ' = sqrt(126/81 / 8) = 0.44096
    # A(correct) = (7/9)/0.44096 = +1.7638 ; A(wrong) = −(2/9)/0.44096 = −0.5040   (paper: 2.47 -> 1.76, −0.35 -> −0.50)
    torch.testing.assert_close(ngrpo(r, g), torch.tensor([1.7638] + [-0.5040] * 7), rtol=0, atol=1e-4)
    # GRPO on the same group: μ = 1/8, σ = sqrt(7/64·8/7)= 0.35355 -> +2.4749, −0.3536
    torch.testing.assert_close(grpo(r, g), torch.tensor([2.4749] + [-0.3536] * 7), rtol=0, atol=1e-4)


def test_ngrpo_all_wrong_is_minus_one_over_sqrt_g_plus_one_and_all_correct_is_zero() -> None:
    g = torch.zeros(8, dtype=torch.long)
    # all wrong: R' = {0 x 8, 1}: μ' = 1/9, σ' = sqrt((8/81 + 64/81)/8) = 1/3 -> A = −(1/9)/(1/3) = −1/3
    torch.testing.assert_close(ngrpo(torch.zeros(8), g), torch.full((8,), -1 / 3), rtol=0, atol=1e-5)
    assert ngrpo(torch.ones(8), g).tolist() == [0.0] * 8  # all correct: every value equals r_max
    assert ngrpo(torch.full((3,), 0.7), torch.zeros(3, dtype=torch.long), max_reward=0.7).tolist() == [0.0] * 3


@pytest.mark.parametrize("num_virtual", [0, 1, 3])
@pytest.mark.parametrize("seed", range(3))
def test_ngrpo_equals_plain_loop_on_shuffled_unequal_groups(num_virtual: int, seed: int) -> None:
    g = shuffled_groups([1, 2, 3, 5, 8], seed)  # B = 19, interleaved
    r = torch.rand(len(g), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1  # <= 1
    r[g == 2] = 1.0  # one all-correct group
    expected = ref_ngrpo(g.tolist(), r.tolist(), num_virtual=num_virtual)
    torch.testing.assert_close(ngrpo(r, g, num_virtual=num_virtual), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_ngrpo_with_no_virtual_sample_is_grpo() -> None:
    g = shuffled_groups([3, 1, 5, 2], seed=0)
    r = torch.rand(len(g), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ngrpo(r, g, num_virtual=0), grpo(r, g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("G", range(2, 17))
def test_ngrpo_is_at_most_grpo_for_every_binary_group(G: int) -> None:
    # the defining property (binary rewards, exhaustive over the number of correct answers k): the virtual
    # correct sample raises the baseline, so every advantage is <= GRPO's (more negative for wrong answers)
    for k in range(G + 1):
        r = torch.tensor([1.0] * k + [0.0] * (G - k), dtype=torch.float64)
        g = torch.zeros(G, dtype=torch.long)
        assert (ngrpo(r, g) <= grpo(r, g) + 1e-12).all(), (G, k)
        if k == 0:
            assert (ngrpo(r, g) < 0).all()  # all wrong: GRPO 0, NGRPO negative


def test_ngrpo_bad_input_raises_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"max_reward=1.0 must be >= every reward.*1.5"):
        ngrpo(torch.tensor([0.0, 1.5]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="num_virtual must be an integer >= 0"):
        ngrpo(torch.zeros(2), torch.tensor([0, 0]), num_virtual=-1)
    with pytest.raises(ValueError, match="num_virtual"):
        NGRPO(num_virtual=-1)
    with pytest.raises(ValueError, match="group_ids"):
        ngrpo(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rewards must be finite"):
        ngrpo(torch.tensor([float("inf"), 0.0]), torch.tensor([0, 0]))


def test_ngrpo_class_equals_function() -> None:
    g = shuffled_groups([3, 4, 2], seed=5)
    r = torch.randint(0, 2, (len(g),), generator=torch.Generator().manual_seed(5)).float() * 2
    out = NGRPO(max_reward=2.0, num_virtual=2, eps=1e-4)(make_batch(r, g))
    torch.testing.assert_close(out, ngrpo(r, g, max_reward=2.0, num_virtual=2, eps=1e-4), rtol=0, atol=0)
