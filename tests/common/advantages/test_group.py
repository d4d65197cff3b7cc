"""Group-relative advantages (common/advantages/group.py): hand cases, plain-loop references, defining
properties (zero sum within a group, shift invariance, all-equal -> 0) and the YAML-facing classes."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.advantages.group import GRPO, RLOO, DrGRPO, ReinforcePP, dr_grpo, grpo, reinforce_pp, rloo
from common.batch import RolloutBatch
from common.ops import group_sum

EPS = 1e-6  # the estimators' default eps

# ---------------------------------------------------------------------------------------------- helpers


def by_group(ids: list[int], rewards: list[float]) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for g, r in zip(ids, rewards):  # ok: the reference is a plain loop on purpose
        groups.setdefault(g, []).append(r)
    return groups


def all_equal(xs: list[float]) -> bool:
    return len(set(xs)) == 1  # a group of one is all-equal too


def ref_grpo(ids: list[int], rewards: list[float], scale: str = "group") -> list[float]:
    groups = by_group(ids, rewards)
    batch_sd = statistics.stdev(rewards) if len(rewards) > 1 else None
    out = []
    for g, r in zip(ids, rewards):
        members = groups[g]
        if all_equal(members):
            out.append(0.0)
            continue
        centred = r - statistics.fmean(members)
        if scale == "group":
            centred /= statistics.stdev(members) + EPS
        elif scale == "batch":
            centred /= batch_sd + EPS
        out.append(centred)
    return out


def ref_rloo(ids: list[int], rewards: list[float]) -> list[float]:
    groups = by_group(ids, rewards)
    out = []
    for i, (g, r) in enumerate(zip(ids, rewards)):
        others = [rj for j, (gj, rj) in enumerate(zip(ids, rewards)) if gj == g and j != i]  # leave i out
        out.append(r - statistics.fmean(others) if others else 0.0)
    return out


def ref_reinforce_pp(ids: list[int], rewards: list[float]) -> list[float]:
    groups = by_group(ids, rewards)
    centred = [0.0 if all_equal(groups[g]) else r - statistics.fmean(groups[g]) for g, r in zip(ids, rewards)]
    if len(centred) < 2 or all_equal(centred):
        return [0.0] * len(centred)
    mean, sd = statistics.fmean(centred), statistics.stdev(centred)
    return [(c - mean) / (sd + EPS) for c in centred]


REFERENCES = {
    "grpo": (lambda r, g: grpo(r, g), lambda ids, rs: ref_grpo(ids, rs, "group")),
    "grpo_batch": (lambda r, g: grpo(r, g, scale="batch"), lambda ids, rs: ref_grpo(ids, rs, "batch")),
    "dr_grpo": (lambda r, g: dr_grpo(r, g), lambda ids, rs: ref_grpo(ids, rs, "none")),
    "rloo": (lambda r, g: rloo(r, g), ref_rloo),
    "reinforce_pp": (lambda r, g: reinforce_pp(r, g), ref_reinforce_pp),
}
ZERO_SUM = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}  # estimators whose group sum is 0 by definition


@st.composite
def grouped_rewards(draw, max_b: int = 20):
    """Interleaved unequal groups; rewards on a 0.1 grid so that groups are either exactly equal or clearly
    spread (σ >= 0.05), and so that equal 0.1-multiples exercise the float-rounding trap."""
    b = draw(st.integers(1, max_b))
    k = draw(st.integers(1, b))
    ids = draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b))
    rewards = [0.1 * i for i in draw(st.lists(st.integers(-10, 10), min_size=b, max_size=b))]
    return ids, rewards


def shuffled_groups(sizes: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(len(ids), generator=generator)]  # (B,) non-contiguous groups


def make_batch(rewards: torch.Tensor, group_ids: torch.Tensor) -> RolloutBatch:
    B = rewards.shape[0]
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        completion_ids=torch.zeros(B, 3, dtype=torch.long),
        completion_mask=torch.ones(B, 3, dtype=torch.bool),
        group_ids=group_ids,
        rewards=rewards,
    )


# ------------------------------------------------------------------------------------------ hand cases


def test_grpo_hand_computed() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    g = torch.zeros(4, dtype=torch.long)
    # μ = 0.25 ; σ (ddof=1) = sqrt((0.75² + 3·0.25²) / 3) = sqrt(0.75 / 3) = 0.5
    # A = [0.75, -0.25, -0.25, -0.25] / (0.5 + 1e-6) ≈ [1.5, -0.5, -0.5, -0.5] (eps moves them by 3e-6)
    torch.testing.assert_close(grpo(r, g), torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=0, atol=1e-5)


def test_grpo_hand_computed_two_interleaved_groups() -> None:
    r = torch.tensor([1.0, 2.0, 0.0, 4.0])
    g = torch.tensor([0, 1, 0, 1])
    # group 0 = [1, 0]: μ = 0.5, σ = sqrt(0.5) -> ±0.5/0.7071 = ±0.7071
    # group 1 = [2, 4]: μ = 3,   σ = sqrt(2)   -> ±1/1.4142  = ±0.7071
    a = 0.5**0.5
    torch.testing.assert_close(grpo(r, g), torch.tensor([a, -a, -a, a]), rtol=0, atol=1e-5)
    # Dr.GRPO: just r − μ_g
    torch.testing.assert_close(dr_grpo(r, g), torch.tensor([0.5, -1.0, -0.5, 1.0]), rtol=0, atol=0)


def test_grpo_scale_batch_hand_computed() -> None:
    r = torch.tensor([1.0, 2.0, 0.0, 4.0])
    g = torch.tensor([0, 1, 0, 1])
    # r − μ_g = [0.5, -1, -0.5, 1] ; batch σ (ddof=1) of [1, 2, 0, 4]: μ = 1.75,
    # Σ(r−μ)² = 0.5625 + 0.0625 + 3.0625 + 5.0625 = 8.75 -> σ = sqrt(8.75/3) = 1.7078
    sd = (8.75 / 3) ** 0.5
    expected = torch.tensor([0.5, -1.0, -0.5, 1.0]) / (sd + EPS)
    torch.testing.assert_close(grpo(r, g, scale="batch"), expected, rtol=0, atol=1e-6)


def test_grpo_scale_none_equals_dr_grpo() -> None:
    g = shuffled_groups([3, 1, 5, 2], seed=0)
    r = torch.randn(len(g), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grpo(r, g, scale="none"), dr_grpo(r, g), rtol=0, atol=0)


def test_rloo_hand_computed() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    g = torch.zeros(4, dtype=torch.long)
    # A_0 = 1 − (0+0+0)/3 = 1 ; A_j = 0 − (1+0+0)/3 = −1/3
    torch.testing.assert_close(rloo(r, g), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_rloo_equals_scaled_group_centring(seed: int) -> None:
    sizes = [2, 3, 5, 4]
    g = shuffled_groups(sizes, seed)
    r = torch.randn(len(g), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    n = torch.tensor(sizes, dtype=torch.float64)[g]  # (B,) size of each row's group
    mean = group_sum(r, g, 4)[g] / n
    torch.testing.assert_close(rloo(r, g), n / (n - 1) * (r - mean), rtol=0, atol=1e-12)  # n/(n−1)·(r − μ)


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_pp_whitens_group_centred_rewards(seed: int) -> None:
    g = shuffled_groups([4, 2, 6, 3], seed)
    r = torch.randn(len(g), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mean = group_sum(r, g, 4)[g] / torch.bincount(g)[g]
    centred = r - mean  # A' = r − μ_g
    expected = (centred - centred.mean()) / (centred.std() + EPS)  # batch whitening, ddof=1
    torch.testing.assert_close(reinforce_pp(r, g), expected, rtol=0, atol=1e-12)


# -------------------------------------------------------------------- degenerate groups: exactly zero


@pytest.mark.parametrize("estimator", [grpo, dr_grpo, rloo, reinforce_pp], ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", [1.0, 0.0, 0.1, 0.7, 123456.7])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_all_equal_group_gives_exactly_zero(estimator, value: float, n: int) -> None:
    # 0.1 and 123456.7 are float-rounding traps: in float32 the group mean of n equal copies is not the value
    r = torch.full((n,), value)
    g = torch.zeros(n, dtype=torch.long)
    out = estimator(r, g)
    assert out.tolist() == [0.0] * n


@pytest.mark.parametrize("estimator", [grpo, dr_grpo, rloo, reinforce_pp], ids=lambda f: f.__name__)
def test_group_of_one_gives_zero(estimator) -> None:
    r = torch.tensor([0.3, 5.0, 1.0, 0.0])
    g = torch.tensor([0, 1, 1, 2])  # groups 0 and 2 are singletons
    out = estimator(r, g)
    assert out[0].item() == 0.0 and out[3].item() == 0.0
    assert torch.isfinite(out).all()


def test_equal_groups_inside_a_mixed_batch_are_zero() -> None:
    r = torch.tensor([0.1, 1.0, 0.1, 0.0, 0.1])
    g = torch.tensor([0, 1, 0, 1, 0])  # group 0 all 0.1, group 1 = [1, 0]
    for estimator in (grpo, dr_grpo, rloo):
        out = estimator(r, g)
        assert out[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0], estimator.__name__
        assert out[1].item() > 0 > out[3].item()


# ------------------------------------------------------------------------------------ loop references


@pytest.mark.parametrize("name", list(REFERENCES))
@settings(max_examples=50, deadline=None)
@given(case=grouped_rewards())
def test_estimator_equals_plain_loop(name: str, case) -> None:
    ids, rewards = case
    fn, ref = REFERENCES[name]
    got = fn(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids))
    torch.testing.assert_close(got, torch.tensor(ref(ids, rewards), dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("seed", range(3))
def test_estimator_equals_plain_loop_on_shuffled_unequal_groups_float32(name: str, seed: int) -> None:
    g = shuffled_groups([1, 2, 3, 5, 8], seed)  # B = 19, interleaved
    r = torch.randn(len(g), generator=torch.Generator().manual_seed(10 + seed))
    fn, ref = REFERENCES[name]
    expected = torch.tensor(ref(g.tolist(), r.double().tolist()), dtype=torch.float32)
    torch.testing.assert_close(fn(r, g), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- defining properties


@pytest.mark.parametrize("name", list(ZERO_SUM))
@settings(max_examples=50, deadline=None)
@given(case=grouped_rewards())
def test_advantages_sum_to_zero_within_each_group(name: str, case) -> None:
    ids, rewards = case
    g = torch.tensor(ids)
    a = ZERO_SUM[name](torch.tensor(rewards, dtype=torch.float64), g)
    sums = group_sum(a, g)  # (B,) slots
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(ZERO_SUM))
@pytest.mark.parametrize("seed", range(3))
def test_adding_a_constant_to_a_group_leaves_its_advantages_unchanged(name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    g = shuffled_groups([3, 4, 2, 6], seed)
    r = torch.randn(len(g), dtype=torch.float64, generator=generator)
    shift = torch.tensor([5.0, -3.0, 0.5, 100.0], dtype=torch.float64)[g]  # a different constant per group
    fn = ZERO_SUM[name]
    torch.testing.assert_close(fn(r + shift, g), fn(r, g), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("estimator", [grpo, dr_grpo, rloo, reinforce_pp], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_raise_naming_rewards(estimator, bad: float) -> None:
    r = torch.tensor([1.0, bad, 0.0])
    with pytest.raises(ValueError, match=r"rewards must be finite.*rows \[1\]"):
        estimator(r, torch.tensor([0, 0, 1]))


def test_integer_or_2d_rewards_raise_naming_rewards() -> None:
    with pytest.raises(ValueError, match="rewards must be a floating tensor"):
        grpo(torch.tensor([1, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="rewards must be a 1-D tensor"):
        rloo(torch.zeros(2, 1), torch.tensor([0, 0]))


def test_bad_group_ids_raise_naming_group_ids() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        grpo(torch.zeros(3), torch.tensor([0, 1]))  # length mismatch
    with pytest.raises(ValueError, match="group_ids"):
        rloo(torch.zeros(3), torch.tensor([0, 3, 1]), num_groups=2)  # out of range


def test_grpo_unknown_scale_raises_listing_choices() -> None:
    with pytest.raises(ValueError, match=r"scale must be 'group', 'batch' or 'none', got 'bad'"):
        grpo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), scale="bad")
    with pytest.raises(ValueError, match=r"scale must be 'group', 'batch' or 'none', got 'bad'"):
        GRPO(scale="bad")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        GRPO(eps=-1.0)


# -------------------------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    "estimator, fn",
    [
        (GRPO(), lambda r, g: grpo(r, g)),
        (GRPO(scale="batch", eps=1e-3), lambda r, g: grpo(r, g, scale="batch", eps=1e-3)),
        (DrGRPO(), dr_grpo),
        (RLOO(), rloo),
        (ReinforcePP(eps=1e-4), lambda r, g: reinforce_pp(r, g, torch.full_like(g, 3), eps=1e-4)),  # 3 tokens a row
    ],
    ids=["GRPO", "GRPO_batch", "DrGRPO", "RLOO", "ReinforcePP"],
)
def test_class_on_rollout_batch_equals_function(estimator, fn) -> None:
    g = shuffled_groups([3, 1, 4, 2], seed=7)
    r = torch.randn(len(g), generator=torch.Generator().manual_seed(7))
    out = estimator(make_batch(r, g))
    assert out.shape == (len(g),)
    torch.testing.assert_close(out, fn(r, g), rtol=0, atol=0)


def test_dr_grpo_class_is_grpo_with_scale_none() -> None:
    assert DrGRPO().scale == "none"
