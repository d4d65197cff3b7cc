"""Factorised (per-phase) group-relative advantages (common/advantages/factorised.py): hand case, plain-loop
reference on ragged shuffled groups, the defining property (each phase's tokens carry that phase's own group
centring and nothing else), equality with the two-phase objective, degenerate and bad input."""

import statistics

import pytest
import torch

from common.advantages.factorised import FactorisedGRPO, factorised_advantages, span_masks
from common.batch import RolloutBatch
from common.losses.aggregate import aggregate
from common.losses.ppo_clip import clipped_surrogate


def ref_token_advantages(ids, rewards, phase_of_token, lengths, normalise=True, weights=None):
    """Plain loops: A^k_i = R^k_i − mean over the group, written on the tokens of phase k (÷ their count)."""
    B, K = len(rewards), len(rewards[0])
    T = max(lengths)
    weights = weights or [1.0] * K
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for k in range(K):
            members = [rewards[j][k] for j in range(B) if ids[j] == ids[i]]
            a = rewards[i][k] - statistics.fmean(members)
            toks = [t for t in range(lengths[i]) if phase_of_token[i][t] == k]
            for t in toks:
                out[i][t] = weights[k] * a / (len(toks) if normalise else 1)
    return out


def test_span_masks_hand_case():
    # row 0: 5 valid tokens, phase 1 starts at 3 -> phase 0 = {0,1,2}, phase 1 = {3,4}; row 1: 2 valid tokens, phase 1 at 4 -> empty
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    m = span_masks(torch.tensor([[0, 3], [0, 4]]), mask)
    assert m.shape == (2, 2, 6)
    assert m[0, 0].tolist() == [True, True, True, False, False, False]
    assert m[0, 1].tolist() == [False, False, False, True, True, False]
    assert m[1, 0].tolist() == [True, True, False, False, False, False]
    assert not m[1, 1].any()


def test_hand_computed_two_phase_example():
    # one group of 2 rows, 4 tokens each; gen phase = tokens 0-1, rank phase = tokens 2-3
    # R_gen = (1, 0) -> A_gen = (+0.5, -0.5);  R_rank = (0.2, 0.6) -> A_rank = (-0.2, +0.2)
    # normalised: each phase has 2 tokens -> token advantages halved
    rewards = torch.tensor([[1.0, 0.2], [0.0, 0.6]])
    masks = span_masks(torch.tensor([[0, 2], [0, 2]]), torch.ones(2, 4, dtype=torch.bool))
    adv = factorised_advantages(rewards, masks, torch.tensor([0, 0]))
    expected = torch.tensor([[0.25, 0.25, -0.1, -0.1], [-0.25, -0.25, 0.1, 0.1]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    raw = factorised_advantages(rewards, masks, torch.tensor([0, 0]), phase_normalise=False, weights=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.5, -0.4, -0.4], [-0.5, -0.5, 0.4, 0.4]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalise", [True, False])
def test_matches_plain_loop_on_ragged_shuffled_groups(normalise):
    g = torch.Generator().manual_seed(3)
    ids = [2, 0, 1, 0, 2, 2, 1, 0, 3]  # unequal, non-contiguous groups, one group of one (id 3)
    B, K, T = len(ids), 3, 7
    rewards = torch.rand(B, K, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    cuts = torch.sort(torch.randint(0, T + 1, (B, K - 1), generator=g), dim=1).values
    starts = torch.cat([torch.zeros(B, 1, dtype=torch.long), cuts], 1)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    phase_of_token = [[sum(t >= s for s in starts[i, 1:].tolist()) for t in range(T)] for i in range(B)]
    w = [1.0, 0.5, 2.0]
    adv = factorised_advantages(rewards, span_masks(starts, mask), torch.tensor(ids), weights=torch.tensor(w),
                                phase_normalise=normalise)
    ref = ref_token_advantages(ids, rewards.tolist(), phase_of_token, lengths, normalise, w)
    torch.testing.assert_close(adv, torch.tensor([r + [0.0] * (T - len(r)) for r in ref]), rtol=0, atol=1e-6)


def test_defining_property_each_phase_sees_only_its_own_reward():
    # Changing the ranking reward must not move any slate-token advantage, and vice versa.
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, 2, generator=g)
    ids = torch.arange(2).repeat_interleave(4)
    masks = span_masks(torch.tensor([[0, 3]] * 8), torch.ones(8, 6, dtype=torch.bool))
    base = factorised_advantages(rewards, masks, ids)
    bumped = rewards.clone()
    bumped[:, 1] = torch.rand(8, generator=g)
    moved = factorised_advantages(bumped, masks, ids)
    torch.testing.assert_close(moved[:, :3], base[:, :3], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 3:], base[:, 3:])


def test_equals_the_two_phase_objective_with_seq_mean_token_sum():
    # L = -(1/B) Σ_i [ 1/|m^gen_i| Σ_t m^gen min(ρA^gen, clip ρ A^gen) + λ/|m^rank_i| Σ_t m^rank min(ρA^rank, clip ρ A^rank) ]
    g = torch.Generator().manual_seed(1)
    B, T, lam = 6, 9, 0.7
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    rewards = torch.rand(B, 2, generator=g)
    lengths = torch.tensor([9, 7, 5, 8, 9, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    starts = torch.stack([torch.zeros(B, dtype=torch.long), torch.tensor([4, 3, 2, 5, 4, 3])], 1)
    logp, old = torch.randn(B, T, generator=g) * 0.3, torch.randn(B, T, generator=g) * 0.3
    adv = factorised_advantages(rewards, span_masks(starts, mask), ids, weights=torch.tensor([1.0, lam]))
    pg, _, _ = clipped_surrogate(logp, old, adv, mask)
    ours = aggregate(pg, mask, "seq_mean_token_sum")
    total = 0.0
    for i in range(B):  # plain reference
        for k, w in ((0, 1.0), (1, lam)):
            a = float(rewards[i, k] - rewards[ids == ids[i], k].mean())
            toks = [t for t in range(int(lengths[i])) if (t >= int(starts[i, 1])) == bool(k)]
            s = 0.0
            for t in toks:
                rho = float(torch.exp(logp[i, t] - old[i, t]))
                s += min(rho * a, min(max(rho, 0.8), 1.2) * a)
            total += w * s / len(toks)
    torch.testing.assert_close(ours, torch.tensor(-total / B), rtol=1e-5, atol=1e-6)


def test_equal_rewards_and_empty_completions_give_zeros_not_nan():
    rewards = torch.tensor([[0.3, 1.0], [0.3, 1.0], [0.3, 1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)  # row 1 is an empty completion
    masks = span_masks(torch.tensor([[0, 1], [0, 0], [0, 3]]), mask)  # row 2 has an empty rank phase
    adv = factorised_advantages(rewards, masks, torch.tensor([0, 0, 0]))
    assert torch.equal(adv, torch.zeros(3, 3))
    adv = factorised_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), masks, torch.tensor([0, 0, 0]), scale="group")
    assert torch.isfinite(adv).all() and torch.equal(adv[1], torch.zeros(3))


def test_bad_input_names_the_argument():
    masks = torch.ones(2, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="rewards must be \\(B, K\\)"):
        factorised_advantages(torch.ones(2), masks, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="phase_masks must be a bool tensor"):
        factorised_advantages(torch.ones(2, 2), masks.float(), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="weights must be \\(K,\\)"):
        factorised_advantages(torch.ones(2, 2), masks, torch.tensor([0, 0]), weights=torch.ones(3))
    with pytest.raises(ValueError, match="group_ids"):
        factorised_advantages(torch.ones(2, 2), masks, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="finite"):
        factorised_advantages(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), masks, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        span_masks(torch.tensor([[0, 3], [2, 1]]), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        FactorisedGRPO(scale="batch")


def _batch(rewards, starts, T=5):
    B = rewards.shape[0]
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=torch.ones(B, T, dtype=torch.bool),
        group_ids=torch.zeros(B, dtype=torch.long), reward_components=rewards, rewards=rewards.sum(1),
        phase_starts=torch.tensor(starts))


def test_estimator_reads_the_batch_and_swapped_arm_exchanges_phases():
    # R_gen = (1, 0) -> A_gen = ±0.5 over 2 tokens; R_rank = (0, 1) -> A_rank = ∓0.5 over 3 tokens
    batch = _batch(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [[0, 2], [0, 2]])
    adv = FactorisedGRPO()(batch)
    torch.testing.assert_close(adv[0], torch.tensor([0.25, 0.25, -1 / 6, -1 / 6, -1 / 6]))
    swapped = FactorisedGRPO(swap_phases=True)(batch)  # slate tokens get the ranking advantage
    torch.testing.assert_close(swapped[0], torch.tensor([-0.25, -0.25, 1 / 6, 1 / 6, 1 / 6]))
    with pytest.raises(ValueError, match="phase_starts"):
        FactorisedGRPO()(batch.replace(phase_starts=None))
