"""DUMP curriculum (common/sampling/curriculum.py) and the data module that follows it
(text_reasoning/curriculum.py; SampleFields fills RolloutBatch.distribution): hand-computed UCB/softmax, the
ring-buffer windows against a plain deque reference, degenerate and bad input, the state round trip, and that
validation never updates the curriculum."""

import collections
import math

import lightning as L
import pytest
import torch

from common.batch import RolloutBatch
from common.methods.sample_fields import SampleFields
from common.models import TinyLlama
from common.sampling.curriculum import DUMP, curriculum_probs, ucb_scores
from text_reasoning.curriculum import CurriculumData
from text_reasoning.data import Arithmetic
from text_reasoning.module import TextReasoningModule


def batch_of(advantages, distributions, mask=None) -> RolloutBatch:
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    B = adv.shape[0]
    T = adv.shape[1] if adv.dim() == 2 else 3
    m = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=m,
                        group_ids=torch.arange(B), advantages=adv,
                        distribution=torch.as_tensor(distributions, dtype=torch.long), completions=[""] * B)


def test_two_arm_ucb_and_softmax_by_hand() -> None:
    # arm 0 saw |A| = 1.0, 0.5 (L̂ = 0.75, n = 2); arm 1 saw 0.2 (L̂ = 0.2, n = 1); N = 3, ln(N+1) = ln 4 = 1.386294
    # bonus_0 = sqrt(2 ln4 / 3) = 0.961351, bonus_1 = sqrt(2 ln4 / 2) = 1.177410
    # UCB = (1.711351, 1.377410); P_0 = 1 / (1 + exp(-(0.333941) / 0.1)) = 0.965756
    d = DUMP(num_distributions=2, window=4)
    out = d(batch_of([1.0, -0.2, -0.5], [0, 1, 0]))
    assert out.batch_size == 3  # every row kept
    torch.testing.assert_close(d.window_mean(), torch.tensor([0.75, 0.2]))
    assert d.counts.tolist() == [2, 1]
    scores = ucb_scores(d.window_mean(), d.counts, c=1.0)
    torch.testing.assert_close(scores, torch.tensor([0.75 + math.sqrt(2 * math.log(4) / 3), 0.2 + math.sqrt(math.log(4))]))
    torch.testing.assert_close(d.probs(), torch.tensor([0.965756, 0.034244]), atol=1e-6, rtol=0)


def test_empty_windows_give_uniform_probs_and_unavailable_arms_get_zero() -> None:
    d = DUMP(num_distributions=4)
    torch.testing.assert_close(d.probs(), torch.full((4,), 0.25))  # N = 0: no bonus, no mean -> uniform
    p = curriculum_probs(torch.tensor([1.0, 5.0, 2.0]), temperature=1.0, available=torch.tensor([True, False, True]))
    # softmax over (1, 2) only: (1 / (1 + e), 0, e / (1 + e))
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.e), 0.0, math.e / (1 + math.e)]))


def test_windows_match_a_plain_deque_reference_over_many_batches() -> None:
    J, W = 3, 5
    d = DUMP(num_distributions=J, window=W)
    ref = [collections.deque(maxlen=W) for _ in range(J)]
    n = [0] * J
    g = torch.Generator().manual_seed(0)
    for size in (1, 7, 12, 3, 20, 2):  # batches with more than W rows of one distribution included
        adv = torch.randn(size, generator=g)
        dist = torch.randint(0, J, (size,), generator=g)
        d(batch_of(adv.tolist(), dist.tolist()))
        for a, j in zip(adv.tolist(), dist.tolist()):
            ref[j].append(abs(a))
            n[j] += 1
        assert d.counts.tolist() == n
        expected = torch.tensor([sum(q) / len(q) if q else 0.0 for q in ref])
        torch.testing.assert_close(d.window_mean(), expected)
        for j in range(J):  # the ring holds exactly the deque's values
            assert sorted(d.windows[j, : len(ref[j])].tolist()) == pytest.approx(sorted(ref[j]))


def test_token_level_advantages_use_the_masked_mean_and_empty_completions_count_zero() -> None:
    d = DUMP(num_distributions=1, window=3)
    adv = [[1.0, 3.0, 100.0], [5.0, 5.0, 5.0]]
    mask = [[True, True, False], [False, False, False]]  # row 0: mean(1, 3) = 2; row 1: empty -> 0
    d(batch_of(adv, [0, 0], mask))
    torch.testing.assert_close(d.window_mean(), torch.tensor([1.0]))  # (2 + 0) / 2
    assert not torch.isnan(d.probs()).any()


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="num_distributions must be >= 1"):
        DUMP(num_distributions=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DUMP(num_distributions=2, temperature=0.0)
    d = DUMP(num_distributions=2)
    with pytest.raises(ValueError, match=r"RolloutBatch.distribution must be in \[0, 2\)"):
        d(batch_of([1.0], [5]))
    b = batch_of([1.0], [0]).replace(distribution=None)
    with pytest.raises(ValueError, match="CurriculumData"):
        d(b)
    assert DUMP.requires == ("distribution",)


def test_state_round_trips_through_state_dict() -> None:
    a = DUMP(num_distributions=3, window=4)
    a(batch_of([0.3, -2.0, 1.0, 0.1], [0, 2, 2, 1]))
    b = DUMP(num_distributions=3, window=4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.probs(), a.probs())
    assert b.counts.tolist() == [1, 1, 2]


def tiny_setup(selector):
    data = CurriculumData(tasks=[Arithmetic(digits=1), Arithmetic(digits=2)], train_size=16, val_size=4,
                          prompts_per_step=4, val_batch_size=4)
    module = TextReasoningModule(policy=TinyLlama(), selector=selector, group_size=2,
                                 methods=[SampleFields({"distribution": "distribution"})])
    module.policy.sampling.max_new_tokens = 4
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return data, module, trainer


def test_draws_follow_the_curriculum_and_are_a_pure_function_of_the_batch_number() -> None:
    data, _, _ = tiny_setup(None)
    data.setup()
    assert sorted({s["distribution"] for s in data.train_set}) == [0, 1]
    only_1 = data.draw(7, torch.tensor([0.0, 1.0]))
    assert [s["distribution"] for s in only_1] == [1, 1, 1, 1]
    assert data.draw(3, torch.tensor([0.5, 0.5])) == data.draw(3, torch.tensor([0.5, 0.5]))


def test_training_updates_the_curriculum_and_validation_does_not() -> None:
    dump = DUMP(num_distributions=2, window=8)
    data, module, trainer = tiny_setup(dump)
    trainer.fit(module, datamodule=data)
    assert int(dump.counts.sum()) == 4 * 2  # one step: 4 prompts x G = 2 rows observed
    before = {k: v.clone() for k, v in dump.state_dict().items()}
    trainer.validate(module, datamodule=data, verbose=False)
    for k, v in dump.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_curriculum_of_the_wrong_size_is_rejected() -> None:
    data, module, trainer = tiny_setup(DUMP(num_distributions=3))
    with pytest.raises(ValueError, match="num_distributions=3 but the data module has 2 task sources"):
        trainer.fit(module, datamodule=data)


def test_the_distribution_field_is_declared_and_checked_at_start_up() -> None:
    with pytest.raises(ValueError, match="DUMP requires RolloutBatch.distribution, which nothing in this run provides"):
        TextReasoningModule(policy=TinyLlama(), selector=DUMP(num_distributions=2), group_size=2)
    with pytest.raises(ValueError, match="not such fields"):
        SampleFields({"distributions": "distribution"})
    fields = SampleFields({"distribution": "distribution"})
    assert fields.provides == ("distribution",)
    rows = batch_of([1.0, 2.0], [0, 1]).replace(distribution=None, samples=[{"distribution": 1}, {"distribution": 0}])
    assert fields.after_rollout(None, rows).distribution.tolist() == [1, 0]
    with pytest.raises(ValueError, match="CurriculumData tags 'distribution'"):
        fields.after_rollout(None, rows.replace(samples=[{}, {}]))
