"""ADORA (common/advantages/adora.py): the spec's hand groups, a plain-loop reference on shuffled unequal
groups, the defining property (length-weighted advantage never decreases vs GRPO), wrapping, bad input."""

import statistics

import pytest
import torch

from common.advantages.adora import ADORA, adora_weights
from common.advantages.group import GRPO, MCGRPO, grpo, mc_grpo
from common.batch import RolloutBatch


def shuffled_groups(sizes: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(len(ids), generator=generator)]


def make_batch(rewards, group_ids, lengths, truncated=None, correct=None) -> RolloutBatch:
    B, T = rewards.shape[0], int(max(lengths)) + 1
    mask = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]  # (B, T) L_i valid tokens
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, group_ids=group_ids,
                        rewards=rewards, truncated=truncated, correct=correct)


def ref_weights(ids, correct, lengths, truncated, lam=0.1):
    out = []
    for g in ids:  # ok: plain loop reference
        rows = [i for i, gi in enumerate(ids) if gi == g]
        right = [lengths[i] for i in rows if correct[i]]
        wrong = [lengths[i] for i in rows if not correct[i] and not truncated[i]]
        longest = max(right) if right else float("-inf")
        mean_wrong = statistics.fmean(wrong) if wrong else float("-inf")
        out.append(1.0 if longest > mean_wrong else lam)
    return out


def test_spec_hand_groups() -> None:
    correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    lengths = torch.tensor([50, 80, 100, 120, 150, 100, 120, 10, 5, 999])
    truncated = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    w = adora_weights(correct, lengths, g, truncated=truncated)
    # group 0: ℓ⁺ = max(50, 80) = 80 < ℓ⁻ = mean(100, 120) = 110 -> TDS, λ = 0.1
    # group 1: ℓ⁺ = 150 > ℓ⁻ = 110 -> TAS, 1
    # group 2: ℓ⁺ = 10 > ℓ⁻ = mean(5) = 5 (the truncated 999 is ignored) -> TAS, 1 ; counting it: 502 -> λ
    torch.testing.assert_close(w, torch.tensor([0.1] * 4 + [1.0] * 6))
    assert adora_weights(correct, lengths, g)[7:].tolist() == pytest.approx([0.1] * 3)


def test_no_correct_is_tds_and_no_wrong_is_tas() -> None:
    correct = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    g = torch.tensor([0, 0, 1, 1])
    # LLM code: ℓ⁺ = −inf without a correct answer (TDS); ℓ⁻ = −inf without a counted wrong one (TAS)
    assert adora_weights(correct, torch.tensor([3, 4, 5, 6]), g, lam=0.25).tolist() == [0.25, 0.25, 1.0, 1.0]


@pytest.mark.parametrize("seed", range(4))
def test_weights_equal_plain_loop_on_shuffled_unequal_groups(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = shuffled_groups([1, 2, 3, 5, 8, 4], seed)
    correct = torch.rand(len(g), generator=gen) < 0.5
    lengths = torch.randint(1, 30, (len(g),), generator=gen)
    truncated = torch.rand(len(g), generator=gen) < 0.2
    w = adora_weights(correct, lengths, g, truncated=truncated)
    assert w.tolist() == pytest.approx(ref_weights(g.tolist(), correct.tolist(), lengths.tolist(), truncated.tolist()))


def test_length_weighted_advantage_never_decreases_vs_grpo() -> None:
    # the defining property (spec §15 (e)): Σ_i L_i A_i per group is >= under ADORA than under GRPO, since a
    # TDS group has mean L⁺ <= max L⁺ <= mean L⁻, so its Σ L A <= 0 and is shrunk by λ < 1
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 9, (2000,), generator=gen)
    g = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    r = (torch.rand(len(g), generator=gen) < 0.5).double()
    lengths = torch.randint(1, 200, (len(g),), generator=gen)
    base = grpo(r, g)
    adora = base * adora_weights(r > 0.5, lengths, g)
    diff = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, g, lengths * (adora - base))
    assert (diff >= -1e-9).all() and (diff > 0).any()


def test_class_wraps_grpo_and_keeps_mc_grpo_pivots() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    lengths = torch.tensor([3, 5, 7, 9, 5, 7])  # group 0: 3 < 6 -> λ ; group 1: 9 > 6 -> 1
    batch = make_batch(r, g, lengths)
    w = torch.tensor([0.1] * 3 + [1.0] * 3)
    torch.testing.assert_close(ADORA()(batch), grpo(r, g) * w)
    a, keep = ADORA(base=MCGRPO())(batch)
    ref_a, ref_keep = mc_grpo(r, g)
    torch.testing.assert_close(a, ref_a * w)
    assert keep.tolist() == ref_keep.tolist()
    # correct_threshold=None reads the verifier's flags instead of thresholding rewards
    flipped = make_batch(r, g, lengths, correct=torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool))
    out = ADORA(base=GRPO(), correct_threshold=None)(flipped)
    # group 0 now: ℓ⁺ = max(5, 7) = 7 > ℓ⁻ = 3 -> 1 ; group 1 unchanged -> 1
    torch.testing.assert_close(out, grpo(r, g))


def test_bad_input_raises_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="lam and tas_weight must be >= 0"):
        ADORA(lam=-0.1)
    with pytest.raises(ValueError, match="correct must be a bool"):
        adora_weights(torch.tensor([1, 0]), torch.tensor([3, 4]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="lengths"):
        adora_weights(torch.tensor([True, False]), torch.tensor([3]), torch.tensor([0, 0]))
    batch = make_batch(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="needs batch.correct"):
        ADORA(correct_threshold=None)(batch)
