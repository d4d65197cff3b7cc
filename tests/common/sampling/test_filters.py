"""Selectors of common/sampling/filters.py: DAPO's dynamic sampling (criterion, refill, truncation to whole
groups, the all-uninformative step), truncation masking, NGRPO's all-correct filter, Chain; and dynamic
sampling end to end through the real module on a tiny model."""

import pytest
import torch

from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.sampling.filters import Chain, DropAllCorrect, DropTruncated, DynamicSampling, mixed_groups


def make_batch(group_ids, rewards, correct=None, truncated=None) -> RolloutBatch:
    g = torch.as_tensor(group_ids)
    r = torch.as_tensor(rewards, dtype=torch.float32)
    B = len(g)
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=torch.arange(B)[:, None].repeat(1, 3), completion_mask=torch.ones(B, 3, dtype=torch.bool),
                        group_ids=g, rewards=r, advantages=grpo(r, g),
                        correct=None if correct is None else torch.as_tensor(correct, dtype=torch.bool),
                        truncated=None if truncated is None else torch.as_tensor(truncated, dtype=torch.bool))


def rows(batch: RolloutBatch) -> list[int]:
    return batch.completion_ids[:, 0].tolist()  # original row numbers


def test_mixed_groups_by_accuracy_and_by_reward_spread() -> None:
    g = torch.tensor([0, 1, 2, 0, 1, 2])
    correct = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    # group 0 = [1, 0] mixed ; group 1 = [1, 1] all right ; group 2 = [0, 0] all wrong
    assert mixed_groups(g, correct).tolist() == [True, False, False, True, False, False]
    r = torch.tensor([0.5, 0.5, 0.1, 0.5, 0.5, 0.2])  # group 2 spread by 0.1 -> kept by reward
    assert mixed_groups(g, None, r).tolist() == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="correct .* or rewards"):
        mixed_groups(g)


def test_dynamic_sampling_keeps_only_informative_groups_with_nonzero_advantages() -> None:
    # DAPO check (2): after filtering every kept group has σ > 0, so zero_adv_frac == 0 for 0/1 rewards
    gen = torch.Generator().manual_seed(0)
    g = torch.arange(40).repeat_interleave(4)[torch.randperm(160, generator=gen)]
    correct = torch.rand(160, generator=gen) < 0.3
    kept = DynamicSampling()(make_batch(g, correct.float(), correct))
    assert kept.batch_size > 0 and (kept.advantages != 0).all()
    assert sorted(set(kept.group_ids.tolist())) == list(range(int(kept.num_groups)))  # renumbered 0..k−1


def test_dynamic_sampling_refills_then_truncates_to_whole_groups() -> None:
    ds = DynamicSampling(max_groups=3)
    round1 = make_batch([0, 0, 1, 1, 2, 2], [1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 0, 1])  # groups 0, 2 mixed
    kept = ds(round1)
    assert rows(kept) == [0, 1, 4, 5] and ds.wants_more(kept)
    round2 = make_batch([0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0, 1])  # all three mixed
    kept = RolloutBatch.cat([kept, ds(round2)])  # as the module does: 5 groups
    assert not ds.wants_more(kept)
    final = ds.finalize(kept)
    # first three groups in order of arrival: round 1's two, then round 2's group 0 (rows 0, 1)
    assert rows(final) == [0, 1, 4, 5, 0, 1] and final.group_ids.tolist() == [0, 0, 1, 1, 2, 2]


def test_dynamic_sampling_with_nothing_informative() -> None:
    batch = make_batch([0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1])
    zero = DynamicSampling(max_groups=2, when_empty="zero_update")
    kept = zero(batch)
    assert kept.batch_size == 0 and zero.wants_more(kept)
    out = zero.finalize(kept)  # "zero_update": the last round with A = 0, so the step still counts
    assert out.batch_size == 4 and out.advantages.tolist() == [0.0] * 4
    skip = DynamicSampling(max_groups=2)  # default "skip": no rows; the module takes an empty optimiser step
    assert skip.finalize(skip(batch)).batch_size == 0
    with pytest.raises(ValueError, match="max_groups"):
        DynamicSampling(max_groups=0)
    with pytest.raises(ValueError, match="when_empty"):
        DynamicSampling(when_empty="raise")


def test_drop_truncated_drops_rows_not_groups() -> None:
    out = DropTruncated()(make_batch([0, 0, 1, 1], [1, 0, 1, 0], truncated=[0, 1, 0, 0]))
    assert rows(out) == [0, 2, 3]
    with pytest.raises(ValueError, match="truncated"):
        DropTruncated()(make_batch([0, 0], [1, 0]))


def test_drop_all_correct_keeps_all_wrong_groups() -> None:
    batch = make_batch([0, 1, 2, 0, 1, 2], [1, 1, 0, 1, 0, 0], correct=[1, 1, 0, 1, 0, 0])
    # group 0 all right (dropped) ; group 1 mixed ; group 2 all wrong (kept: NGRPO learns from it)
    assert rows(DropAllCorrect()(batch)) == [1, 2, 4, 5]
    assert rows(DropAllCorrect(max_reward=1.0)(batch.replace(correct=None))) == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="batch.correct"):
        DropAllCorrect()(batch.replace(correct=None))


def test_chain_applies_in_order_and_delegates_refill() -> None:
    chain = Chain([DropTruncated(), DynamicSampling(max_groups=5)])
    batch = make_batch([0, 0, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0], truncated=[0, 0, 0, 1])
    kept = chain(batch)  # the truncated row goes first, which leaves group 1 all right -> dropped
    assert rows(kept) == [0, 1] and chain.wants_more(kept)
    with pytest.raises(ValueError, match="selectors"):
        Chain([])


def test_dynamic_sampling_end_to_end_through_the_module() -> None:
    """Real tiny model and generation: a reward with spread ("7"s) -> the step trains only on mixed groups,
    at most max_groups of them, after up to max_generation_rounds samplings."""
    import lightning as L

    from common.models import TinyLlama
    from common.rewards.base import RewardFunction
    from common.rollout.base import Sampling
    from helpers import DIGITS, digit_data
    from text_reasoning.module import TextReasoningModule

    class HasSeven(RewardFunction):
        name = "has7"

        def __call__(self, completions, samples):
            return torch.tensor([float("7" in c) for c in completions])

    seen = []

    class Spy(DynamicSampling):
        def finalize(self, kept):
            out = super().finalize(kept)
            seen.append(out)
            return out

    module = TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                                 rewards=[HasSeven()], verifier=HasSeven(), sampling=Sampling(max_new_tokens=4),
                                 group_size=4, selector=Spy(max_groups=2), max_generation_rounds=3, log_samples_every=0)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=digit_data(16, 4))  # refill rounds draw the stream's next prompts
    assert len(seen) == 2
    for out in seen:
        assert 0 < int(out.num_groups) <= 2
        acc = torch.zeros(int(out.num_groups)).index_add_(0, out.group_ids, out.correct.float()) / 4
        assert ((acc > 0) & (acc < 1)).all()
