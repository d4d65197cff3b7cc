"""ARPO (common/methods/arpo.py): success replay into all-fail groups, against a plain-loop reference of the
injection rule; per-task FIFO; episodes of different lengths with environment tokens; groups of one; the buffer's
round trip through a weights_only state-dict save/load (a resumed run injects what the straight run injects)."""

from __future__ import annotations

import statistics

import pytest
import torch

from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.methods.arpo import ARPO
from common.replay.success_buffer import SuccessBuffer


def episodes(tasks, rewards, lengths, seed=0):
    """Layout-B rows: row i acts on tasks[i] (group = task order of first appearance), reward rewards[i], with
    lengths[i] completion tokens of which every third is an environment token."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(tasks), max(lengths)
    order = list(dict.fromkeys(tasks))
    comp = torch.randint(5, 50, (B, T), generator=g)
    cmask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    env = cmask & (torch.arange(T)[None, :] % 3 == 2)
    turn = torch.where(cmask & ~env, torch.arange(T)[None, :] // 3, torch.full((B, T), -1))
    prompt = torch.tensor([[order.index(t) + 1] * 2 for t in tasks])
    return RolloutBatch(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt, dtype=torch.bool),
                        completion_ids=comp.masked_fill(~cmask, 0), completion_mask=cmask,
                        group_ids=torch.tensor([order.index(t) for t in tasks]), rewards=torch.tensor(rewards),
                        correct=torch.tensor(rewards) > 0.5, token_turn=turn, env_mask=env,
                        episode_ids=torch.arange(B), samples=[{"prompt": t} for t in tasks],
                        completions=[f"{t}-{i}" for i, t in enumerate(tasks)])


def reference_injections(tasks, rewards, stored, std_max=0.05, mean_max=0.2):
    """Plain loop: the first row of each group (same task, in order) whose rewards have stdev < std_max and mean <
    mean_max, when the task has a stored success."""
    out = []
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        r = [rewards[i] for i in rows]
        std = statistics.stdev(r) if len(r) > 1 else 0.0
        if std < std_max and statistics.mean(r) < mean_max and stored.get(task):
            out.append(rows[0])
    return out


def test_injection_follows_the_rule_and_keeps_positions_and_masks():
    arpo = ARPO()
    first = episodes(["a", "a", "a", "b", "b", "c"], [0.0, 1.0, 0.0, 0.0, 0.0, 1.0], [6, 9, 5, 7, 4, 3])
    out = arpo.after_score(None, first)
    # nothing stored yet: no injection; the successes of a and c are stored
    assert torch.equal(out.completion_ids, first.completion_ids) and arpo.buffer.keys == ["a", "c"]
    tasks = ["a", "a", "b", "b", "b", "c", "d", "d"]  # c: a group of one; d: never succeeded
    rewards = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    second = episodes(tasks, rewards, [4, 4, 5, 5, 5, 2, 3, 3], seed=1)
    out = arpo.after_score(None, second)
    want = reference_injections(tasks, rewards, {"a": 1, "c": 1})
    assert want == [0, 5]
    stored = {"a": 1, "c": 5}  # the rows of `first` that were stored
    T = out.completion_ids.shape[1]
    assert T == 9  # widened to the stored row of a (9 tokens)
    for i in range(len(tasks)):
        if i in want:
            src = stored[tasks[i]]
            L = int(first.completion_mask[src].sum())
            assert torch.equal(out.completion_ids[i, :L], first.completion_ids[src, :L])
            assert torch.equal(out.env_mask[i, :L], first.env_mask[src, :L]) and not out.completion_mask[i, L:].any()
            assert float(out.rewards[i]) == 1.0 and out.completions[i] == first.completions[src]
        else:
            L = int(second.completion_mask[i].sum())
            assert torch.equal(out.completion_ids[i, :L], second.completion_ids[i, :L]) and out.completions[i] == second.completions[i]
    assert torch.equal(out.group_ids, second.group_ids)
    assert not (out.loss_mask & out.env_mask).any()  # environment tokens of replayed rows stay out of the loss
    # the all-fail group of a now has a positive example: non-zero, finite GRPO advantages; b's success was stored
    adv = grpo(out.rewards, out.group_ids)
    assert bool(torch.isfinite(adv).all()) and float(adv[0]) > 0 > float(adv[1]) and float(adv[6]) == 0.0
    assert arpo.buffer.count("b") == 1 and arpo.last["arpo/replayed"] == 2.0


@pytest.mark.parametrize("rewards,injected", [([0.15, 0.15], True), ([0.0, 0.3], False), ([0.3, 0.3], False),
                                              ([0.0, 0.06], True), ([0.0, 0.08], False)])
def test_thresholds_match_the_reference(rewards, injected):
    arpo = ARPO()
    arpo.after_score(None, episodes(["t"], [1.0], [4]))
    out = arpo.after_score(None, episodes(["t", "t"], rewards, [3, 3], seed=2))
    assert (reference_injections(["t", "t"], rewards, {"t": 1}) == [0]) == injected
    assert (float(out.rewards[0]) == 1.0) == injected


def test_correct_signal_and_fifo_per_task():
    buf = SuccessBuffer(per_task=2, capacity=3)
    for i in range(3):
        buf.add(episodes(["x"], [float(i)], [3], seed=i), ["x"])
    assert buf.keys == ["x", "x"] and buf.rows.rewards.tolist() == [1.0, 2.0]  # the oldest went first
    buf.add(episodes(["y", "z"], [5.0, 6.0], [2, 2]), ["y", "z"])
    assert buf.keys == ["x", "y", "z"]  # capacity 3 overall
    arpo = ARPO(signal="correct")
    assert arpo.requires == ("correct",)
    with pytest.raises(ValueError, match="'task'"):
        ARPO(key="task").after_score(None, episodes(["a"], [0.0], [2]))
    with pytest.raises(ValueError, match="signal"):
        ARPO(signal="eval")
    with pytest.raises(ValueError, match="whole episodes"):
        ARPO().after_score(None, episodes(["a", "a"], [0.0, 0.0], [2, 2]).replace(episode_ids=torch.zeros(2, dtype=torch.long)))


def test_buffer_round_trips_through_a_weights_only_checkpoint(tmp_path):
    arpo = ARPO(seed=3)
    arpo.after_score(None, episodes(["a", "a", "b", "b"], [1.0, 1.0, 1.0, 0.0], [5, 7, 6, 2]))
    arpo.after_score(None, episodes(["a", "a"], [1.0, 0.0], [4, 8], seed=5))
    torch.save(arpo.state_dict(), tmp_path / "m.pt")
    resumed = ARPO(seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert resumed.buffer.keys == arpo.buffer.keys and int(resumed.steps) == int(arpo.steps) == 2
    assert torch.equal(resumed.buffer.rows.completion_ids, arpo.buffer.rows.completion_ids)
    nxt = episodes(["a", "a", "a", "b", "b"], [0.0] * 5, [3] * 5, seed=9)
    a, b = arpo.after_score(None, nxt), resumed.after_score(None, nxt)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions == b.completions
    assert a.samples == b.samples and torch.equal(a.rewards, b.rewards) and float(a.rewards[0]) == 1.0


def test_draws_are_uniform_over_a_tasks_successes():
    arpo = ARPO(per_task=4)
    arpo.after_score(None, episodes(["a"] * 4, [1.0, 1.0, 1.0, 1.0], [2, 3, 4, 5]))
    lengths = []
    for s in range(200):
        out = arpo.after_score(None, episodes(["a", "a"], [0.0, 0.0], [1, 1], seed=s))
        lengths.append(int(out.completion_mask[0].sum()))
    counts = [lengths.count(n) for n in (2, 3, 4, 5)]
    assert min(counts) > 25  # 50 expected each; P(any < 26) < 1e-4 under the binomial
