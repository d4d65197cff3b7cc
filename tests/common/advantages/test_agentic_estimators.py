"""UI-S1, MAPO and DCPO (common/advantages/{uis1,mapo,dcpo}.py) on hand-built trajectory tables: plain-loop
references written here, the spec's checks (agentic.md §9 (e), §10 (e), §11 (e)), both layouts, degenerate input."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.advantages.dcpo import DCPO, dcpo, sample_segments
from common.advantages.mapo import MAPO, mapo
from common.advantages.uis1 import UISemiOnline, reset_continuation, uis1
from common.batch import RolloutBatch
from common.methods.dcpo import DCPOSegmentSampler
from common.segment_ops import disc_return, turn_table
from tests.support.agentic_tables import make_batch, per_turn


def norm(x, pool, mode, singleton, eps=1e-6):
    if len(pool) == 1:
        return x if singleton == "raw" else 0.0
    mu = sum(pool) / len(pool)
    if mode == "mean":
        return x - mu
    sd = math.sqrt(sum((p - mu) ** 2 for p in pool) / (len(pool) - 1))
    return (x - mu) / (sd + eps)


def returns(ep, gamma, use_matched=False, field="reward"):
    turns = ep["turns"]
    out, G = [0.0] * len(turns), 0.0
    for k in range(len(turns) - 1, -1, -1):
        m_now = turns[k].get("matched", True)
        m_next = turns[k + 1].get("matched", True) if k + 1 < len(turns) else True
        c = float(m_now and m_next) if use_matched else 1.0
        G = turns[k].get(field, 0.0) + gamma * c * G
        out[k] = G
    return out


def uis1_reference(episodes, gamma, mode, signal):
    rets = [returns(ep, gamma, use_matched=True) for ep in episodes]
    out = []
    for e, ep in enumerate(episodes):
        row = []
        for k, turn in enumerate(ep["turns"]):
            step_pool = [rets[j][k] for j, o in enumerate(episodes) if o["group"] == ep["group"] and k < len(o["turns"])]
            a_s = norm(rets[e][k], step_pool, mode, "zero")
            if signal == "turn_score":
                pool = [t.get("reward", 0.0) for o in episodes if o["group"] == ep["group"] for t in o["turns"]]
                a_e = norm(turn.get("reward", 0.0), pool, mode, "raw")
            else:
                pool = [o["outcome"] for o in episodes if o["group"] == ep["group"]]
                a_e = norm(ep["outcome"], pool, mode, "raw")
            row.append(a_e + a_s)
        out.append(row)
    return out


def random_episodes(seed, groups=3):
    rng = random.Random(seed)
    eps_ = []
    for g in range(groups):
        for _ in range(1 if g == groups - 1 else rng.randint(2, 4)):
            T = rng.randint(1, 5)
            turns = [{"reward": rng.choice([0.0, 0.1, 0.5, 1.0]), "matched": rng.random() < 0.7,
                      "process": rng.uniform(-1, 1)} for _ in range(T)]
            eps_.append({"group": g, "outcome": float(rng.random() < 0.5), "turns": turns})
    return eps_


def test_uis1_return_semantics_and_shrinking_groups():
    ep = {"group": 0, "outcome": 1.0, "turns": [{"reward": 1.0, "matched": m} for m in (1, 1, 0, 1)]}
    assert returns(ep, 0.5, use_matched=True) == [1.5, 1.0, 1.0, 1.0]  # the spec's G
    tt = turn_table(make_batch([ep, dict(ep)], "B"))
    G = disc_return(tt.reward, tt.episode, tt.t, 0.5, cont=reset_continuation(tt.matched, tt.episode, tt.t, tt.num_episodes))
    assert G[:4].tolist() == [1.5, 1.0, 1.0, 1.0]
    # rollouts that terminate early: (task, t) groups shrink with t; a group of one at the last turn gets A^S = 0
    eps_ = [{"group": 0, "outcome": 0.0, "turns": [{"reward": float(i == j)} for j in range(T)]} for i, T in enumerate((1, 2, 3))]
    tt = turn_table(make_batch(eps_, "B"))
    _, _, a_s = uis1(tt, mode="mean")
    sizes = [int(((tt.t == k)).sum()) for k in range(3)]
    assert sizes == [3, 2, 1]
    assert a_s[(tt.t == 2).nonzero().item()] == 0


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("mode", ["mean", "mean_std"])
@pytest.mark.parametrize("signal", ["turn_score", "episode_return"])
def test_uis1_matches_loop(layout, mode, signal):
    eps_ = random_episodes(21)
    b = make_batch(eps_, layout)
    got = per_turn(b, UISemiOnline(gamma=0.5, mode=mode, episode_signal=signal)(b), eps_, layout)
    want = uis1_reference(eps_, 0.5, mode, signal)
    for g_row, w_row in zip(got, want):
        assert g_row == pytest.approx(w_row, abs=2e-5, rel=1e-5)


def mapo_batch():
    """agentic.md §10 (e): 2 prompts x 4 rollouts x 5 turns of positive rewards; turn 2 of prompt 0 ties."""
    rng = random.Random(4)
    eps_ = []
    for g in range(2):
        tail = [rng.uniform(0.2, 1.0) for _ in range(3)]
        for _ in range(4):
            r = [rng.uniform(0.2, 1.0) for _ in range(5)]
            if g == 0:
                r[2:] = tail  # identical future from turn 2 on: G ties there
            eps_.append({"group": g, "outcome": 0.0, "turns": [{"reward": x, "process": x} for x in r]})
    return eps_


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_mapo_spec_properties():
    eps_ = mapo_batch()
    tt = turn_table(make_batch(eps_, "B"))
    t = tt.t.float()
    batch_only = mapo(tt, w_batch=1.0, w_turn=0.0)[0]
    turn_only = mapo(tt, w_batch=0.0, w_turn=1.0)[0]
    mixed = mapo(tt)[0]
    assert corr(batch_only, t) < -0.5  # position bias
    tied = (tt.group == 0) & (tt.t == 2)
    assert (turn_only[tied] == 0).all()
    for g in range(2):
        for k in range(5):
            sel = (tt.group == g) & (tt.t == k)
            assert abs(float(turn_only[sel].sum())) < 1e-5
    assert abs(corr(turn_only, t)) < abs(corr(mixed, t)) < abs(corr(batch_only, t))
    assert (mixed[tied] != 0).all()
    G = disc_return(tt.reward, tt.episode, tt.t, 0.85)
    for g in range(2):
        for k in range(5):
            sel = ((tt.group == g) & (tt.t == k)).nonzero().squeeze(1)
            order = torch.argsort(G[sel])
            assert (mixed[sel][order].diff() >= -1e-6).all()  # monotone in G within (prompt, turn)


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("field", ["turn_rewards", "process_rewards"])
def test_mapo_matches_loop(layout, field):
    eps_ = random_episodes(8)
    key = "reward" if field == "turn_rewards" else "process"
    b = make_batch(eps_, layout)
    got = per_turn(b, MAPO(gamma=0.85, reward_field=field)(b), eps_, layout)
    rets = [returns(ep, 0.85, field=key) for ep in eps_]
    everything = [g for r in rets for g in r]
    for e, ep in enumerate(eps_):
        for k in range(len(ep["turns"])):
            pool = [rets[j][k] for j, o in enumerate(eps_) if o["group"] == ep["group"] and k < len(o["turns"])]
            want = 0.6 * norm(rets[e][k], everything, "mean_std", "zero") + 0.4 * norm(rets[e][k], pool, "mean_std", "zero")
            assert got[e][k] == pytest.approx(want, abs=2e-5, rel=1e-5)


def test_dcpo_spec_dedup():
    # group of 4: T1 succeeds with 4 segments, T2-T4 fail with one each; rows are segments (shuffled)
    ep = torch.tensor([0, 1, 0, 2, 0, 3, 0])
    rewards = torch.tensor([1.0 if e == 0 else 0.0 for e in ep.tolist()])
    a = dcpo(rewards, torch.zeros(7, dtype=torch.long), ep + 40, norm_by_std=False)
    assert a.tolist() == pytest.approx([0.75, -0.25, 0.75, -0.25, 0.75, -0.25, 0.75])
    per_traj = {int(e): float(v) for e, v in zip(ep, a)}
    assert sum(per_traj.values()) == pytest.approx(0.0)  # Σ over trajectories = 0
    naive = rewards - rewards.mean()  # per-segment GRPO: μ = 4/7
    assert naive[0] == pytest.approx(3 / 7) and naive[1] == pytest.approx(-4 / 7)
    # std mode, a singleton group keeps R_e, an all-equal group gives 0
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2, 2])
    eps2 = torch.cat([ep, torch.tensor([7, 8, 9])])
    r2 = torch.cat([rewards, torch.tensor([0.5, 1.0, 1.0])])
    b = RolloutBatch(completion_ids=torch.zeros(10, 2, dtype=torch.long), completion_mask=torch.ones(10, 2, dtype=torch.bool),
                     group_ids=groups, rewards=r2, episode_ids=eps2)
    out = DCPO()(b)
    R = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert out[0] == pytest.approx(float((1 - R.mean()) / (R.std() + 1e-6)))
    assert out[7] == 0.5 and out[8] == 0 and out[9] == 0 and torch.isfinite(out).all()


def test_dcpo_sampler():
    counts = [1, 3, 2, 1, 1, 5, 1, 2]
    ep = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)])
    perm = torch.randperm(ep.numel(), generator=torch.Generator().manual_seed(0))
    ep = ep[perm]
    for seed in range(5):
        rows = sample_segments(ep, torch.zeros_like(ep), 12, torch.Generator().manual_seed(seed))
        assert rows.numel() == 12 and rows.unique().numel() == 12  # unused segments first: no repeats
        assert set(ep[rows].tolist()) == set(range(8))  # every trajectory at least once
    ep15 = torch.arange(15).repeat_interleave(2)
    rows = sample_segments(ep15, torch.zeros_like(ep15), 12, torch.Generator().manual_seed(1))
    assert rows.numel() == 12 and ep15[rows].unique().numel() == 12  # 12 distinct trajectories
    # two groups, one with fewer segments than n: filled round-robin with repeats
    ep2 = torch.tensor([0, 0, 1, 2])
    rows = sample_segments(ep2, torch.tensor([0, 0, 0, 1]), 4, torch.Generator().manual_seed(2))
    assert rows.numel() == 8 and set(rows[:4].tolist()) == {0, 1, 2} and rows[4:].tolist() == [3, 3, 3, 3]
    # the Method keeps its RNG in a buffer: same seed, same rows
    b = RolloutBatch(completion_ids=torch.zeros(16, 1, dtype=torch.long), completion_mask=torch.ones(16, 1, dtype=torch.bool),
                     group_ids=torch.zeros(16, dtype=torch.long), episode_ids=ep)
    m1, m2 = DCPOSegmentSampler(12, seed=3), DCPOSegmentSampler(12, seed=3)
    assert torch.equal(m1.after_rollout(None, b).episode_ids, m2.after_rollout(None, b).episode_ids)
    m3 = DCPOSegmentSampler(12, seed=0)
    m3.load_state_dict(m1.state_dict())
    assert torch.equal(m1.after_rollout(None, b).episode_ids, m3.after_rollout(None, b).episode_ids)


def test_degenerate_all_equal_zero():
    eps_ = [{"group": 0, "outcome": 1.0, "turns": [{"reward": 0.5, "process": 0.5}] * 2} for _ in range(3)]
    for layout in ("A", "B"):
        b = make_batch(eps_, layout)
        for est in (UISemiOnline(), UISemiOnline(episode_signal="episode_return"), MAPO(), MAPO(reward_field="process_rewards")):
            out = est(b)
            assert torch.isfinite(out).all()
            if not isinstance(est, MAPO):
                assert (out == 0).all()
    with pytest.raises(ValueError, match="episode_signal"):
        UISemiOnline(episode_signal="x")
    with pytest.raises(ValueError, match="reward_field"):
        MAPO(reward_field="x")
