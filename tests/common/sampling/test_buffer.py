"""Selective sample buffer (common/sampling/buffer.py, Skywork R1V2 SSB): only rows with A != 0 are cached, the
batch is topped up to min_nonzero informative rows, draws are proportional to abs(A), FIFO capacity and max age,
bad input, and the buffer (tensors and plain data) survives a checkpoint round trip with weights_only loading."""

import io

import pytest
import torch

from common.batch import RolloutBatch
from common.sampling.buffer import SelectiveSampleBuffer


def batch_of(advantages, tag=0, width=3) -> RolloutBatch:
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    B = adv.shape[0]
    ids = (torch.arange(B) + 100 * tag)[:, None].repeat(1, width)  # row identity in the token ids
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=ids, completion_mask=torch.ones(B, width, dtype=torch.bool),
                        group_ids=torch.arange(B) // 2, rewards=adv.clone(), advantages=adv,
                        samples=[{"prompt": f"p{tag}-{i}", "meta": [True, 3]} for i in range(B)],
                        completions=[f"c{tag}-{i}" for i in range(B)])


def test_only_nonzero_rows_are_cached_and_the_batch_is_topped_up() -> None:
    ssb = SelectiveSampleBuffer(min_nonzero=3)
    out = ssb(batch_of([0.0, 1.5, -0.5, 0.0], tag=0))  # 2 informative rows, buffer empty: nothing to add
    assert out.batch_size == 4 and len(ssb) == 2
    assert ssb.rows.completions == ["c0-1", "c0-2"]
    torch.manual_seed(0)
    out = ssb(batch_of([0.0, 0.0, 0.0, 0.0], tag=1))  # 0 informative: need 3, buffer has 2 -> both replayed
    assert out.batch_size == 6 and ssb.last_replayed == 2
    assert sorted(out.completions[4:]) == ["c0-1", "c0-2"]
    assert sorted(out.advantages[4:].tolist()) == [-0.5, 1.5]  # stored advantages kept
    assert len(ssb) == 0  # replayed rows leave the buffer; this step's zero rows never enter
    assert out.group_ids.unique().numel() == 2 + 2  # two original groups + one group per replayed row


def test_a_full_batch_needs_no_replay() -> None:
    ssb = SelectiveSampleBuffer(min_nonzero=2)
    ssb(batch_of([1.0, -1.0]))
    out = ssb(batch_of([2.0, 0.0, -2.0], tag=1))
    assert out.batch_size == 3 and ssb.last_replayed == 0 and len(ssb) == 4


def test_draws_are_proportional_to_abs_advantage() -> None:
    # one draw per trial from rows with abs(A) = 1, 2, 3, 4 -> expected shares 0.1, 0.2, 0.3, 0.4
    torch.manual_seed(0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        ssb = SelectiveSampleBuffer(min_nonzero=1)
        ssb.store(batch_of([1.0, -2.0, 3.0, -4.0]))
        counts[ssb.replay(1).completion_ids[0, 0]] += 1
    expected = n * torch.tensor([0.1, 0.2, 0.3, 0.4])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001 (seed 0 gives 11.37)


def test_without_consume_replayed_rows_stay_until_they_expire() -> None:
    ssb = SelectiveSampleBuffer(min_nonzero=2, max_age=2, consume=False)
    ssb(batch_of([1.0, 0.0], tag=0))  # step 1: stores c0-0
    assert ssb(batch_of([0.0], tag=1)).completions[-1] == "c0-0" and len(ssb) == 1  # step 2: replayed, kept
    assert ssb(batch_of([0.0], tag=2)).completions[-1] == "c0-0"  # step 3: age 2, replayed again
    assert ssb(batch_of([0.0], tag=3)).batch_size == 1 and len(ssb) == 0  # step 4: age 3 > max_age: expired


def test_capacity_drops_the_oldest_and_max_age_expires_rows() -> None:
    ssb = SelectiveSampleBuffer(min_nonzero=1, capacity=3)
    ssb(batch_of([1.0, 2.0], tag=0))
    ssb(batch_of([3.0, 4.0], tag=1))
    assert ssb.rows.completions == ["c0-1", "c1-0", "c1-1"]
    old = SelectiveSampleBuffer(min_nonzero=5, max_age=2)
    old(batch_of([1.0], tag=0))  # stored at step 1
    old(batch_of([1.0], tag=1))  # step 2: row 0 is 1 step old -> may be replayed (need 4)
    assert old.last_replayed == 1 and len(old) == 1
    old(batch_of([0.0], tag=2))  # step 3: c1-0 (stored at 2) still usable
    assert old.last_replayed == 1
    old(batch_of([1.0], tag=3))  # step 4: stores c3-0
    old(batch_of([0.0], tag=4))
    old(batch_of([0.0], tag=5))
    old(batch_of([0.0], tag=6))  # step 7: c3-0 (stored at 4) is 3 steps old > max_age -> gone before the draw
    assert len(old) == 0


def test_token_level_advantages_and_empty_completions() -> None:
    ssb = SelectiveSampleBuffer(min_nonzero=1)
    b = batch_of([0.0, 0.0]).replace(advantages=torch.tensor([[0.0, 2.0, 0.0], [5.0, 5.0, 5.0]]),
                                     completion_mask=torch.tensor([[True, True, False], [False, False, False]]))
    ssb(b)  # row 0: mean abs over its mask = 1 -> cached; row 1: empty completion -> 0 -> not cached
    assert ssb.rows.completions == ["c0-0"]


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="min_nonzero must be >= 1"):
        SelectiveSampleBuffer(min_nonzero=0)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        SelectiveSampleBuffer(min_nonzero=1, capacity=0)
    with pytest.raises(ValueError, match="needs rollouts.advantages"):
        SelectiveSampleBuffer(min_nonzero=1)(batch_of([1.0]).replace(advantages=None))


def test_buffer_survives_a_checkpoint_round_trip_with_weights_only() -> None:
    a = SelectiveSampleBuffer(min_nonzero=1, capacity=8)
    a(batch_of([1.0, -2.0, 0.0], tag=0))
    a(batch_of([0.5, 0.0], tag=1, width=5))  # wider completions: the buffer pads
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = SelectiveSampleBuffer(min_nonzero=1, capacity=8)
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert int(b.step) == 2 and b.stored_at.tolist() == [1, 1, 2]
    assert b.rows.completion_ids.shape == (3, 5)
    assert b.rows.completions == a.rows.completions and b.rows.samples == a.rows.samples
    for name in ("completion_ids", "completion_mask", "advantages", "rewards", "group_ids"):
        assert torch.equal(getattr(b.rows, name), getattr(a.rows, name)), name
    torch.manual_seed(1)
    ra = a(batch_of([0.0], tag=2))
    torch.manual_seed(1)
    rb = b(batch_of([0.0], tag=2))
    assert ra.completions == rb.completions
    empty = SelectiveSampleBuffer(min_nonzero=1)
    empty.load_state_dict(SelectiveSampleBuffer(min_nonzero=1).state_dict())
    assert len(empty) == 0
