"""RolloutBatch: declared fields, row operations, cat's padding by field kind, start-up requirement checks."""

from __future__ import annotations

import pytest
import torch

from common.batch import FIELDS, RolloutBatch, check_requirements


def batch(B=4, P=3, T=5, K=5, seed=0, **fields) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    return RolloutBatch(
        prompt_ids=torch.randint(1, 9, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        completion_ids=torch.randint(1, 9, (B, T), generator=g), completion_mask=torch.ones(B, T, dtype=torch.bool),
        group_ids=torch.arange(B) // 2, rewards=torch.rand(B, generator=g),
        reward_components=torch.rand(B, K, generator=g), samples=[{"i": i} for i in range(B)],
        completions=[str(i) for i in range(B)], **fields)


def test_cat_pads_by_field_kind_not_by_width():
    """A (B, K) field whose width happens to equal T is not padded as if it were token-aligned (the old heuristic);
    prompt-aligned fields are left-padded, time-aligned ones right-padded."""
    a = batch(T=5, K=5, seed=0, values=torch.ones(4, 5), phase_starts=torch.zeros(4, 2, dtype=torch.long))
    b = batch(T=3, K=5, P=4, seed=1, values=torch.ones(4, 3), phase_starts=torch.ones(4, 2, dtype=torch.long))
    c = RolloutBatch.cat([a, b])
    assert c.completion_ids.shape == (8, 5) and c.values.shape == (8, 5) and c.reward_components.shape == (8, 5)
    assert c.prompt_ids.shape == (8, 4)
    assert c.prompt_mask[:4, 0].eq(False).all() and c.prompt_mask[4:].all()  # left padding of the narrower prompts
    assert torch.equal(c.prompt_ids[:4, 1:], a.prompt_ids)
    assert c.completion_mask[4:, 3:].eq(False).all() and torch.equal(c.completion_ids[4:, :3], b.completion_ids)
    assert torch.equal(c.values[4:, 3:], torch.zeros(4, 2))
    assert c.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # later groups are offset, never merged
    assert c.samples == a.samples + b.samples


def test_cat_pads_actions_with_trailing_dims_along_time():
    a = RolloutBatch(completion_ids=torch.ones(2, 3, 4), completion_mask=torch.ones(2, 3, dtype=torch.bool),
                     group_ids=torch.zeros(2, dtype=torch.long), inputs={"context": torch.ones(2, 4)})
    b = RolloutBatch(completion_ids=torch.ones(1, 5, 4), completion_mask=torch.ones(1, 5, dtype=torch.bool),
                     group_ids=torch.zeros(1, dtype=torch.long), inputs={"context": torch.zeros(1, 4)})
    c = RolloutBatch.cat([a, b])
    assert c.completion_ids.shape == (3, 5, 4) and c.completion_ids[:2, 3:].eq(0).all()
    assert c.inputs["context"].shape == (3, 4) and c.group_ids.tolist() == [0, 0, 1]


def test_select_split_and_state_round_trip_keep_every_field():
    b = batch(hint_len=torch.tensor([0, 1, 2, 3]), inputs={"x": torch.arange(4.0)[:, None]})
    s = b.select(torch.tensor([3, 1]))
    assert s.hint_len.tolist() == [3, 1] and s.inputs["x"].flatten().tolist() == [3.0, 1.0]
    assert s.samples == [{"i": 3}, {"i": 1}] and s.completions == ["3", "1"]
    assert [m.batch_size for m in b.split(3)] == [3, 1]
    back = RolloutBatch.from_state(b.state_dict())
    assert torch.equal(back.hint_len, b.hint_len) and torch.equal(back.inputs["x"], b.inputs["x"])


@pytest.mark.parametrize("change, message", [
    (dict(completion_mask=torch.ones(4, 4, dtype=torch.bool)), "completion_mask"),
    (dict(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids"),
    (dict(hint_len=torch.zeros(3, dtype=torch.long)), "hint_len"),
    (dict(inputs={"pixels": torch.zeros(2, 3)}), "inputs"),
    (dict(prompt_ids=None), "prompt_ids and prompt_mask"),
    (dict(samples=[{}]), "samples"),
])
def test_bad_shapes_raise_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        batch().replace(**change)


def test_cat_of_a_field_set_in_some_batches_only_raises():
    with pytest.raises(ValueError, match="hint_len is set in some batches"):
        RolloutBatch.cat([batch(hint_len=torch.zeros(4, dtype=torch.long)), batch()])


def test_agentic_layout_fields_exist_and_env_tokens_leave_the_loss_mask():
    env = torch.zeros(4, 5, dtype=torch.bool)
    env[:, 2] = True  # a tool's output token
    b = batch(episode_ids=torch.arange(4), turn_ids=torch.zeros(4, dtype=torch.long),
              token_turn=torch.zeros(4, 5, dtype=torch.long), env_mask=env)
    assert b.loss_mask[:, 2].eq(False).all() and b.loss_mask.sum() == 16
    assert {"episode_ids", "turn_ids", "token_turn", "env_mask", "inputs", "seeds"} <= FIELDS


def test_check_requirements_names_the_part_and_the_field():
    class Needs:
        requires = ("hint_len", "rewards")

    check_requirements([Needs()], provided=["hint_len"])  # rewards are always there
    with pytest.raises(ValueError, match=r"Needs requires RolloutBatch.hint_len"):
        check_requirements([Needs()], provided=[])
