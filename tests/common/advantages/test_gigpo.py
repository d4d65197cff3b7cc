"""GiGPO (common/advantages/gigpo.py) on hand-built trajectory tables, against a plain-loop reference written here
and the spec's corridor check (agentic.md §3 (e)), in both storage layouts."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.advantages.gigpo import GiGPO, anchor_group_size, gigpo
from common.advantages.group import grpo
from common.segment_ops import turn_table
from tests.support.agentic_tables import make_batch, per_turn


def _stats(vals):
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mu, sd


def reference(episodes, gamma, omega, mode, weighting, c_inv, eps=1e-6):
    """GiGPO by plain loops over the episode list (agentic.md §3 (b))."""
    rows = []  # (e, k, group, key, score, G)
    for e, ep in enumerate(episodes):
        G, rets = 0.0, []
        for turn in reversed(ep["turns"]):
            G = turn.get("reward", 0.0) + gamma * G
            rets.append(G)
        rets.reverse()
        for k, turn in enumerate(ep["turns"]):
            pen = c_inv * (not turn.get("valid", True))
            rows.append((e, k, ep["group"], turn.get("key", -1), ep["outcome"] - pen, rets[k] - pen))
    out = [[0.0] * len(ep["turns"]) for ep in episodes]
    for e, k, g, key, s, G in rows:
        if weighting == "per_turn":
            pool = [r[4] for r in rows if r[2] == g]
        else:
            pool = [ep["outcome"] for ep in episodes if ep["group"] == g]
        x = s if weighting == "per_turn" else episodes[e]["outcome"]
        if len(pool) == 1:
            a_e = x
        else:
            mu, sd = _stats(pool)
            a_e = (x - mu) / (sd + eps) if mode == "mean_std" else x - mu
        if weighting == "per_episode":
            a_e -= c_inv * (not episodes[e]["turns"][k].get("valid", True))
        anchor = [r[5] for r in rows if r[2] == g and r[3] == key and key != -1]
        if len(anchor) <= 1:
            a_s = 0.0
        else:
            mu, sd = _stats(anchor)
            a_s = (G - mu) / (sd + eps) if mode == "mean_std" else G - mu
        out[e][k] = a_e + omega * a_s
    return out


def corridor():
    """agentic.md §3 (e): corridor pos 0..4, goal 4; two 'right x4' and two with one 'stay' at pos 2; + a failure."""
    right = {"group": 0, "outcome": 1.0, "turns": [{"key": p} for p in (0, 1, 2, 3)]}
    right["turns"][-1]["reward"] = 1.0
    stay = {"group": 0, "outcome": 1.0, "turns": [{"key": p} for p in (0, 1, 2, 2, 3)]}
    stay["turns"][-1]["reward"] = 1.0
    return [right, dict(right), stay, dict(stay)]


@pytest.mark.parametrize("layout", ["A", "B"])
def test_corridor_spec_values(layout):
    eps_ = corridor()
    b = make_batch(eps_, layout)
    tt = turn_table(b)
    a, a_e, a_s = gigpo(tt, gamma=0.95, mode="mean")
    assert (a_e == 0).all()  # every episode succeeds
    got = per_turn(b, GiGPO(gamma=0.95, mode="mean")(b), eps_, layout)
    mu = (4 * 0.95 + 2 * 0.9025) / 6
    assert got[0][2] == pytest.approx(0.95 - mu, abs=1e-6) and got[0][2] == pytest.approx(0.016, abs=5e-4)
    assert got[2][2] == pytest.approx(0.9025 - mu, abs=1e-6) and got[2][2] == pytest.approx(-0.032, abs=5e-4)
    assert got[2][3] == pytest.approx(0.95 - mu, abs=1e-6)  # the revisit of pos 2 is its own member
    pos2 = [got[0][2], got[1][2], got[2][2], got[2][3], got[3][2], got[3][3]]
    assert sum(pos2) == pytest.approx(0.0, abs=1e-6)
    assert got[0][2] > 0 > got[2][2]


def test_failing_singleton_state_and_weighting_regression():
    eps_ = corridor() + [{"group": 0, "outcome": 0.0, "turns": [{"key": 0}, {"key": 99}, {"key": 98}]}]
    b = make_batch(eps_, "B")
    tt = turn_table(b)
    _, _, a_s = gigpo(tt, gamma=0.95, mode="mean")
    u = ((tt.episode == 4) & (tt.t == 1)).nonzero().item()
    assert a_s[u] == 0  # a state no other trajectory visits: singleton anchor group
    a_turn = gigpo(tt, mode="mean_std", episode_weighting="per_turn")[1]
    a_ep = gigpo(tt, mode="mean_std", episode_weighting="per_episode")[1]
    assert not torch.allclose(a_turn, a_ep)  # code (per turn) and paper (per episode) differ when lengths differ


def test_omega_zero_is_grpo():
    rng = random.Random(3)
    eps_ = [{"group": g, "outcome": float(rng.random() < 0.5), "turns": [{"key": rng.randrange(3)} for _ in range(rng.randint(1, 4))]}
            for g in range(3) for _ in range(4)]
    eps_[0]["outcome"], eps_[1]["outcome"] = 1.0, 0.0
    b = make_batch(eps_, "B")
    got = GiGPO(omega=0.0, mode="mean_std", episode_weighting="per_episode")(b)
    want = grpo(b.rewards, b.group_ids)[:, None].expand_as(got) * b.loss_mask
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("mode", ["mean", "mean_std"])
@pytest.mark.parametrize("weighting", ["per_turn", "per_episode"])
def test_random_tables_match_loop(layout, mode, weighting):
    rng = random.Random(hash((layout, mode, weighting)) % 1000)
    eps_ = []
    for g in range(4):
        n = 1 if g == 3 else rng.randint(2, 4)  # group 3 holds one episode
        for _ in range(n):
            T = rng.randint(1, 5)
            turns = [{"key": rng.choice([-1, 1, 2, 3]), "reward": rng.choice([0.0, 0.0, 0.5, 1.0]),
                      "valid": rng.random() < 0.8} for _ in range(T)]
            eps_.append({"group": g, "outcome": sum(t["reward"] for t in turns), "turns": turns})
    eps_.append({"group": 4, "outcome": 0.5, "turns": [{"key": 1}, {"key": 1}]})  # all-equal episode scores
    eps_.append({"group": 4, "outcome": 0.5, "turns": [{"key": 1}]})
    b = make_batch(eps_, layout)
    got = per_turn(b, GiGPO(gamma=0.9, omega=0.7, mode=mode, episode_weighting=weighting, invalid_penalty=0.1)(b), eps_, layout)
    want = reference(eps_, 0.9, 0.7, mode, weighting, 0.1)
    for g_row, w_row in zip(got, want):
        assert g_row == pytest.approx(w_row, abs=2e-5, rel=1e-5)


def test_degenerate_groups_zero_and_anchor_size():
    eps_ = [{"group": 0, "outcome": 1.0, "turns": [{"key": 5, "reward": 1.0}]} for _ in range(4)]
    b = make_batch(eps_, "B")
    out = GiGPO(mode="mean_std")(b)
    assert (out == 0).all() and torch.isfinite(out).all()
    assert anchor_group_size(turn_table(b)) == 4.0


def test_bad_arguments_and_missing_fields():
    with pytest.raises(ValueError, match="gamma"):
        GiGPO(gamma=1.5)
    with pytest.raises(ValueError, match="episode_weighting"):
        GiGPO(episode_weighting="both")
    b = make_batch(corridor(), "B").replace(turn_keys=None)
    with pytest.raises(ValueError, match="turn_keys"):
        GiGPO()(b)
