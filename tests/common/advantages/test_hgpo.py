"""HGPO (common/advantages/hgpo.py): the spec's context-inconsistency check (agentic.md §4 (e)), a plain-loop
reference on random tables in both layouts, K = 0 vs GiGPO, degenerate groups."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.advantages.gigpo import gigpo
from common.advantages.hgpo import HGPO, hgpo
from common.segment_ops import turn_table
from tests.support.agentic_tables import make_batch, per_turn


def reference(episodes, K, gamma, alpha, mode, offset, include_zero, eps=1e-6):
    rows = []  # (e, k, group, states window source, G)
    for e, ep in enumerate(episodes):
        G, rets = 0.0, []
        for turn in reversed(ep["turns"]):
            G = turn.get("reward", 0.0) + gamma * G
            rets.append(G)
        rets.reverse()
        keys = [t.get("key", -1) for t in ep["turns"]]
        for k in range(len(keys)):
            rows.append((e, k, ep["group"], keys, rets[k]))

    def window(row, kc):
        _, k, _, keys, _ = row
        if k < kc - 1:
            return None
        w = tuple(keys[k - kc + 1: k + 1])
        return None if -1 in w else w

    out = [[0.0] * len(ep["turns"]) for ep in episodes]
    for row in rows:
        num = den = 0.0
        for kc in range(1, K + 2):
            w = window(row, kc)
            if w is None:
                continue
            members = [r[4] for r in rows if r[2] == row[2] and window(r, kc) == w]
            if len(members) < 2:
                continue
            mu = sum(members) / len(members)
            a = row[4] - mu
            if mode == "mean_std":
                a /= math.sqrt(sum((m - mu) ** 2 for m in members) / len(members)) + eps
            if a == 0 and not include_zero:
                continue
            weight = (kc + offset - 1) ** alpha
            num, den = num + weight * a, den + weight
        out[row[0]][row[1]] = num / (den + eps) if den > 0 else 0.0
    return out


def spec_table():
    """8 trajectories reach X (key 9) at t = 1: four from A (key 1), four from B (key 2); returns at X: A-path
    (go, go, wait, wait) = (1, 1, 0, 0), B-path all 0."""
    eps_ = []
    for prev, rewards in ((1, (1.0, 1.0, 0.0, 0.0)), (2, (0.0, 0.0, 0.0, 0.0))):
        for r in rewards:
            eps_.append({"group": 0, "outcome": r, "turns": [{"key": prev}, {"key": 9, "reward": r}]})
    return eps_


@pytest.mark.parametrize("layout", ["A", "B"])
def test_spec_context_inconsistency(layout):
    eps_ = spec_table()
    b = make_batch(eps_, layout)
    oracle = [0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0]

    def at_x(adv):
        return [row[1] for row in per_turn(b, adv, eps_, layout)]

    tt = turn_table(b)
    gi = gigpo(tt, mode="mean", omega=1.0)[2]
    gi_x = [float(gi[((tt.episode == e) & (tt.t == 1)).nonzero().item()]) for e in range(8)]
    code = at_x(HGPO(K=1, mode="mean")(b))
    zero = at_x(HGPO(K=1, mode="mean", include_zero_levels=True)(b))
    assert gi_x == pytest.approx([0.75, 0.75, -0.25, -0.25, -0.25, -0.25, -0.25, -0.25], abs=1e-6)
    assert code == pytest.approx([0.6, 0.6, -0.4, -0.4, -0.25, -0.25, -0.25, -0.25], abs=1e-5)
    assert zero == pytest.approx([0.6, 0.6, -0.4, -0.4, -0.1, -0.1, -0.1, -0.1], abs=1e-5)
    mse = lambda a: sum((x - o) ** 2 for x, o in zip(a, oracle)) / 8  # noqa: E731
    assert mse(gi_x) == pytest.approx(0.0625, abs=1e-6)
    assert mse(gi_x) > mse(code) > mse(zero) >= 0
    assert mse(code) == pytest.approx(0.29 / 8, abs=1e-5) and mse(zero) == pytest.approx(0.08 / 8, abs=1e-5)  # spec: 0.036, 0.010


def test_k0_mean_equals_gigpo_step_term():
    rng = random.Random(5)
    eps_ = [{"group": g, "outcome": 0.0, "turns": [{"key": rng.randrange(3), "reward": rng.random()} for _ in range(rng.randint(1, 4))]}
            for g in range(2) for _ in range(4)]
    tt = turn_table(make_batch(eps_, "B"))
    a_s = gigpo(tt, mode="mean", gamma=0.9)[2]
    a_h = hgpo(tt, K=0, mode="mean", gamma=0.9)
    # equal up to the ε in the weight normaliser: w·A/(w + ε)
    assert torch.allclose(a_h, a_s * 2 / (2 + 1e-6), atol=1e-6)


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("mode", ["mean", "mean_std"])
@pytest.mark.parametrize("include_zero", [False, True])
def test_random_tables_match_loop(layout, mode, include_zero):
    rng = random.Random(11)
    eps_ = []
    for g in range(3):
        for _ in range(1 if g == 2 else rng.randint(2, 5)):  # group 2: one episode
            T = rng.randint(1, 6)
            eps_.append({"group": g, "outcome": 0.0,
                         "turns": [{"key": rng.choice([-1, 1, 2, 2, 3]), "reward": rng.choice([0.0, 0.0, 1.0])} for _ in range(T)]})
    b = make_batch(eps_, layout)
    for K, offset, alpha in ((0, 2, 1.0), (2, 2, 1.0), (3, 1, 2.0)):
        got = per_turn(b, HGPO(K=K, mode=mode, weight_offset=offset, alpha=alpha, include_zero_levels=include_zero, gamma=0.9)(b),
                       eps_, layout)
        want = reference(eps_, K, 0.9, alpha, mode, offset, include_zero)
        for g_row, w_row in zip(got, want):
            assert g_row == pytest.approx(w_row, abs=2e-5, rel=1e-5)


def test_degenerate_and_base_group():
    eps_ = [{"group": 0, "outcome": 1.0, "turns": [{"key": 1, "reward": 1.0}]} for _ in range(3)]
    b = make_batch(eps_, "B")
    for kw in ({}, {"base_group": True}, {"include_zero_levels": True}):
        out = HGPO(**kw)(b)
        assert (out == 0).all() and torch.isfinite(out).all()
    eps_ = spec_table()
    tt = turn_table(make_batch(eps_, "B"))
    with_base = hgpo(tt, K=1, mode="mean", base_group=True)
    without = hgpo(tt, K=1, mode="mean")
    assert not torch.allclose(with_base, without)
    with pytest.raises(ValueError, match="weight_offset"):
        HGPO(weight_offset=3)
