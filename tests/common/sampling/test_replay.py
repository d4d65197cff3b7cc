"""R³ cross-context replay (common/sampling/replay.py): Eq. 3 by hand, uniform groups get past opposite-outcome
responses of the same prompt (and only then have non-zero advantages), per-prompt and total caps, bad input, and
the buffer's checkpoint round trip with weights_only loading."""

import io
import math

import pytest
import torch

from common.batch import RolloutBatch
from common.sampling.replay import CrossContextReplay, r3_advantage


def batch_of(prompts, correct, tag=0, width=3) -> RolloutBatch:
    c = torch.as_tensor(correct, dtype=torch.bool)
    B = len(prompts)
    order = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # group ids by first appearance
    gids = torch.tensor([order[p] for p in prompts])
    ids = (torch.arange(B) + 100 * tag)[:, None].repeat(1, width)
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=ids, completion_mask=torch.ones(B, width, dtype=torch.bool), group_ids=gids,
                        rewards=c.float(), correct=c, advantages=torch.zeros(B),
                        samples=[{"prompt": p} for p in prompts], completions=[f"c{tag}-{i}" for i in range(B)])


def test_eq3_by_hand() -> None:
    # group (1, 0, 0, 0): mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5; alpha 2, lambda 0.5 -> denominator 1.5
    # A = (0.75, -0.25, -0.25, -0.25) / 1.5 = (0.5, -1/6, -1/6, -1/6); an all-equal group -> exact 0
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    torch.testing.assert_close(r3_advantage(r, g, alpha=2.0, lam=0.5), torch.tensor([0.5, -1 / 6, -1 / 6, -1 / 6, 0.0, 0.0]))


def test_uniform_groups_get_opposite_outcomes_of_the_same_prompt() -> None:
    ccr = CrossContextReplay(k=1, lam=1e-6)
    first = ccr(batch_of(["a", "a", "b", "b"], [1, 0, 0, 1], tag=0))  # nothing buffered yet: no replay
    assert first.batch_size == 4 and ccr.last_replayed == 0 and len(ccr) == 4
    out = ccr(batch_of(["a", "a", "b", "b"], [0, 0, 1, 1], tag=1))  # a all wrong, b all right
    assert ccr.last_replayed == 2
    assert out.completions[4:] == ["c0-0", "c0-2"]  # a correct answer of a, a wrong one of b
    assert out.correct[4:].tolist() == [True, False]
    assert out.group_ids.tolist() == [0, 0, 1, 1, 0, 1]  # replayed rows join their prompt's group
    # group a = (0, 0, 1): mean 1/3, std sqrt(1/3) -> A = (-1/3, -1/3, 2/3) / 0.57735 = (-0.57735, -0.57735, 1.1547)
    s = 1 / math.sqrt(3)
    torch.testing.assert_close(out.advantages[[0, 1, 4]], torch.tensor([-s, -s, 2 * s]), atol=1e-5, rtol=0)
    assert bool((out.advantages != 0).all())


def test_no_history_of_the_other_outcome_leaves_the_group_alone() -> None:
    ccr = CrossContextReplay(k=2)
    ccr(batch_of(["a", "a"], [0, 0], tag=0))
    out = ccr(batch_of(["a", "a"], [0, 0], tag=1))
    assert out.batch_size == 2 and out.advantages.tolist() == [0.0, 0.0]


def test_per_prompt_and_total_caps_keep_the_newest() -> None:
    ccr = CrossContextReplay(per_prompt=2, capacity=3)
    ccr(batch_of(["a", "a", "a"], [1, 0, 1], tag=0))
    assert ccr.rows.completions == ["c0-1", "c0-2"]
    ccr(batch_of(["b", "b"], [1, 0], tag=1))
    assert ccr.keys == ["a", "b", "b"] and ccr.rows.completions == ["c0-2", "c1-0", "c1-1"]


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        CrossContextReplay(k=0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        CrossContextReplay(lam=0.0)
    with pytest.raises(ValueError, match="needs rollouts.correct"):
        CrossContextReplay()(batch_of(["a"], [1]).replace(correct=None))
    b = batch_of(["a"], [1])
    b.samples[0].pop("prompt")
    with pytest.raises(ValueError, match=r"samples\[i\]\['prompt'\]"):
        CrossContextReplay()(b)


def test_buffer_survives_a_checkpoint_round_trip_with_weights_only() -> None:
    a = CrossContextReplay(k=1)
    a(batch_of(["a", "a", "b"], [1, 0, 0], tag=0))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = CrossContextReplay(k=1)
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert b.keys == a.keys and b.rows.completions == a.rows.completions
    nxt = batch_of(["a", "a"], [0, 0], tag=1)
    torch.testing.assert_close(b(nxt).advantages, a(nxt).advantages)
