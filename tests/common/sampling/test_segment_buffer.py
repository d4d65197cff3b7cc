"""SPO-tree's edge replay buffer (common/sampling/segment_buffer.py): per-question draw limit, expiry after
max_age steps, the rank helper against a plain loop, the buffer's rows through a state_dict round trip, bad input,
and a SIGKILL-and-resume run of the SPO-tree recipe with edges waiting in the buffer."""

import pytest
import torch

from common.batch import RolloutBatch
from common.sampling.segment_buffer import SegmentEdgeBuffer, rank_within

from resume import TINY, assert_sigkill_resume_exact, cli


def edges(questions: list[str], first_id: int = 0, width: int = 3) -> RolloutBatch:
    B = len(questions)
    ids = torch.arange(first_id, first_id + B)[:, None].repeat(1, width)  # row id in every token: traceable
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=ids, completion_mask=torch.ones(B, width, dtype=torch.bool),
                        group_ids=torch.arange(B) // 2, rewards=torch.ones(B), advantages=torch.ones(B, width),
                        samples=[{"prompt": q} for q in questions], completions=[str(i) for i in range(B)])


def row_ids(batch: RolloutBatch) -> list[int]:
    return sorted(batch.completion_ids[:, 0].tolist())


def test_rank_within_equals_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 4, (30,), generator=g).float()  # ties on purpose
    group = torch.randint(0, 5, (30,), generator=g)
    expected = [sum(1 for j in range(30) if group[j] == group[i] and (keys[j], j) < (keys[i], i)) for i in range(30)]
    assert rank_within(keys, group).tolist() == expected


def test_draw_limit_per_question_then_expiry() -> None:
    buf = SegmentEdgeBuffer(max_age=2, per_question=2)
    out = buf.finalize(buf(edges(["a"] * 5 + ["b"])))  # step 0: 2 of a's 5, b's 1; 3 of a wait
    assert sorted(s["prompt"] for s in out.samples) == ["a", "a", "b"] and len(buf) == 3
    waiting = row_ids(buf.edges)
    out = buf.finalize(buf(edges(["b"], first_id=10)))  # step 1: 2 more of a (age 1), the new b
    assert len(out.samples) == 3 and 10 in row_ids(out) and len(buf) == 1
    assert set(row_ids(out)) - {10} <= set(waiting)
    out = buf.finalize(buf(edges([], first_id=20)))  # step 2: the last a is 2 steps old -> expired, not used
    assert out.batch_size == 0 and len(buf) == 0


def test_buffer_rows_survive_a_state_dict_round_trip() -> None:
    buf = SegmentEdgeBuffer(max_age=8, per_question=1, seed=3)
    buf.finalize(buf(edges(["a"] * 4 + ["b"] * 3, width=3)))  # 7 in, one a and one b used: 5 wait
    buf.finalize(buf(edges(["a"] * 2, first_id=10, width=5)))  # wider rows (the buffer pads); 7, 2 used: 5 wait
    fresh = SegmentEdgeBuffer(max_age=8, per_question=1, seed=3)
    fresh.load_state_dict(buf.state_dict())
    assert int(fresh.step) == 2 and len(fresh) == len(buf) == 5
    for name in ("completion_ids", "completion_mask", "advantages", "group_ids"):
        assert torch.equal(getattr(fresh.edges, name), getattr(buf.edges, name)), name
    assert fresh.edges.samples == buf.edges.samples and torch.equal(fresh.stamps, buf.stamps)
    nxt = edges(["b"], first_id=30)
    assert row_ids(fresh(nxt)) == row_ids(buf(nxt))  # the same draw after the round trip


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="per_question must be a positive integer"):
        SegmentEdgeBuffer(per_question=0)
    with pytest.raises(ValueError, match="needs rows with advantages"):
        SegmentEdgeBuffer()(edges(["a"]).replace(advantages=None))


def test_spo_tree_recipe_resumes_exactly_after_sigkill(tmp_path) -> None:
    run = cli("configs/text_reasoning/spo_tree.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.methods", '[{"class_path": "common.methods.segment_po.SegmentTree", '
              '"init_args": {"branching": [2, 3], "segment_tokens": 3}}]',
              "--model.init_args.selector.init_args.per_question", "2", "--model.init_args.rewards",
              '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 4}}]')
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6)
    state = ckpt["state_dict"]["selector._extra_state"]
    assert int(ckpt["state_dict"]["selector.step"]) == 6 and state["stamps"].numel() > 0  # edges wait in the buffer
