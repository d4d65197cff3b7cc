"""The multi-scope combiner (common/advantages/combine.py) and its ToMPO / HRPO configurations: per-scope zero
means, reductions to GRPO (agentic.md §12 (e), §13 (e)), a plain-loop reference, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
import yaml

from common.advantages.combine import MultiScope, Scope, mix_rewards, multi_scope
from common.advantages.group import grpo
from common.segment_ops import dense_ids, turn_table
from tests.support.agentic_tables import make_batch, per_turn


def episodes(seed=0):
    rng = random.Random(seed)
    out = []
    for g in range(3):
        for _ in range(4):
            T = rng.randint(1, 4)
            out.append({"group": g, "outcome": float(rng.random() < 0.5),
                        "turns": [{"reward": rng.uniform(0, 1), "kind": rng.randrange(2)} for _ in range(T)]})
        out[-1]["outcome"], out[-2]["outcome"] = 1.0, 0.0
    return out


def tompo(lam):
    return MultiScope([Scope(signal="mixed", keys=("group", "t", "kind")), Scope(signal="mixed", keys=("group",))], mix=lam)


def test_each_scope_zero_mean():
    eps_ = episodes()
    tt = turn_table(make_batch(eps_, "B"))
    for keys in (("group", "t", "kind"), ("group",), ()):
        a = multi_scope(tt, [Scope(signal="mixed", keys=keys, mode="mean")], mix=0.3)
        ids, n = dense_ids(*[getattr(tt, k) if k != "kind" else tt.kind for k in keys]) if keys else (torch.zeros_like(tt.t), 1)
        sums = torch.zeros(n).index_add_(0, ids, a)
        assert sums.abs().max() < 1e-5


def test_tompo_lambda_extremes_reduce_to_single_reward_grpo():
    eps_ = episodes(1)
    b = make_batch(eps_, "B")
    tt = turn_table(b)
    # λ = 1: both scopes see R_e only; the (group, t, kind) scope and the group scope are GRPO over their pools
    only_group = multi_scope(tt, [Scope(signal="mixed", keys=("group",))], mix=1.0)
    ids, n = dense_ids(tt.group)
    pooled = grpo(tt.outcome, ids)  # R_e over the group's turns (per-turn weighting)
    assert torch.allclose(only_group, pooled, atol=1e-5)
    # λ = 0: the turn reward alone
    zero = multi_scope(tt, [Scope(signal="mixed", keys=("group",))], mix=0.0)
    assert torch.allclose(zero, grpo(tt.reward, ids), atol=1e-5)
    assert torch.allclose(mix_rewards(torch.tensor(2.0), torch.tensor(4.0), 0.25), torch.tensor(3.5))
    out = tompo(0.5)(b)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_hrpo_configuration():
    eps_ = episodes(2)
    b = make_batch(eps_, "B")
    tt = turn_table(b)
    hrpo = lambda la: MultiScope([Scope(signal="outcome", keys=("group",), per_episode=True),  # noqa: E731
                                  Scope(signal="reward", keys=(), mode="none", weight=la)])
    # λ_a = 0: exactly episode GRPO
    got = hrpo(0.0)(b)
    assert torch.allclose(got, grpo(b.rewards, b.group_ids)[:, None] * b.loss_mask, atol=1e-5)
    # the per-turn additive term changes only within-episode differences, by λ_a (r_t − r_t')
    a = per_turn(b, hrpo(0.5)(b), eps_, "B")
    a0 = per_turn(b, got, eps_, "B")
    for e, ep in enumerate(eps_):
        for k in range(len(ep["turns"])):
            assert a[e][k] - a0[e][k] == pytest.approx(0.5 * ep["turns"][k]["reward"], abs=1e-5)


@pytest.mark.parametrize("layout", ["A", "B"])
def test_matches_loop(layout):
    eps_ = episodes(3)
    b = make_batch(eps_, layout)
    est = MultiScope([Scope(signal="return", keys=("group", "t"), mode="mean_std", weight=0.4),
                      Scope(signal="return", keys=(), mode="mean", std="population", weight=0.6),
                      Scope(signal="outcome", keys=("group",), per_episode=True, singleton="raw")], gamma=0.9)
    got = per_turn(b, est(b), eps_, layout)
    rets = []
    for ep in eps_:
        G, r = 0.0, []
        for turn in reversed(ep["turns"]):
            G = turn["reward"] + 0.9 * G
            r.append(G)
        rets.append(r[::-1])
    allg = [g for r in rets for g in r]
    mu_all = sum(allg) / len(allg)
    for e, ep in enumerate(eps_):
        outcomes = [o["outcome"] for o in eps_ if o["group"] == ep["group"]]
        mu_o = sum(outcomes) / len(outcomes)
        sd_o = math.sqrt(sum((x - mu_o) ** 2 for x in outcomes) / (len(outcomes) - 1))
        for k in range(len(ep["turns"])):
            pool = [rets[j][k] for j, o in enumerate(eps_) if o["group"] == ep["group"] and k < len(o["turns"])]
            if len(pool) > 1:
                mu = sum(pool) / len(pool)
                sd = math.sqrt(sum((x - mu) ** 2 for x in pool) / (len(pool) - 1))
                a1 = (rets[e][k] - mu) / (sd + 1e-6)
            else:
                a1 = 0.0
            want = 0.4 * a1 + 0.6 * (rets[e][k] - mu_all) + (ep["outcome"] - mu_o) / (sd_o + 1e-6)
            assert got[e][k] == pytest.approx(want, abs=2e-5, rel=1e-5)


def test_yaml_configs_build_and_bad_input():
    for name in ("tompo", "hrpo"):
        cfg = yaml.safe_load(open(f"configs/agentic/{name}.yaml"))
        adv = cfg["model"]["init_args"]["advantage"]
        assert adv["class_path"] == "common.advantages.combine.MultiScope"
        est = MultiScope(**adv["init_args"])
        assert torch.isfinite(est(make_batch(episodes(4), "B"))).all()
    with pytest.raises(ValueError, match="keys"):
        Scope(keys=("nope",))
    with pytest.raises(ValueError, match="per_episode"):
        Scope(signal="reward", per_episode=True)
    with pytest.raises(ValueError, match="mix"):
        MultiScope([Scope()], mix=2.0)
    deg = [{"group": 0, "outcome": 1.0, "turns": [{"reward": 0.5}]} for _ in range(3)]
    assert (tompo(0.5)(make_batch(deg, "B")) == 0).all()


def test_batch_scopes_refuse_data_parallelism():
    from common.advantages.mapo import MAPO

    b = make_batch(episodes(5), "B")
    for est in (MAPO(), MultiScope([Scope(signal="reward", keys=())])):
        est.all_reduce = lambda t: t
        with pytest.raises(ValueError, match="data parallelism"):
            est(b)
    ok = MultiScope([Scope(signal="outcome", keys=("group",)), Scope(signal="reward", keys=(), mode="none")])
    ok.all_reduce = lambda t: t
    assert torch.isfinite(ok(b)).all()  # group scopes and raw terms need no cross-rank statistics
