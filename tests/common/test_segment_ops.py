"""common/segment_ops.py against plain-loop references written here (agentic.md §2)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.batch import RolloutBatch
from common.segment_ops import (dense_ids, disc_return, gnorm, hist_keys, mix_keys, rloo, seg_stats, text_key,
                                turn_sum, turn_table, turn_to_token)


def ref_groups(ids):
    groups = {}
    for i, g in enumerate(ids):
        if g >= 0:
            groups.setdefault(g, []).append(i)
    return groups


def ref_gnorm(x, ids, mode, std, eps, singleton, weights=None):
    out = [0.0] * len(x)
    for g, members in ref_groups(ids).items():
        w = [1.0 if weights is None else weights[i] for i in members]
        W = sum(w)
        mu = sum(wi * x[i] for wi, i in zip(w, members)) / W
        sq = sum(wi * (x[i] - mu) ** 2 for wi, i in zip(w, members))
        var = sq / W if std == "population" else (sq / (W - 1) if W > 1 else 0.0)
        for i in members:
            if len(members) == 1:
                out[i] = x[i] if singleton == "raw" else 0.0
            elif mode == "mean":
                out[i] = x[i] - mu
            else:
                out[i] = (x[i] - mu) / (math.sqrt(var) + eps)
    return out


def test_dense_ids_excludes_minus_one_and_is_dense():
    a = torch.tensor([3, 3, -1, 7, 3, 7])
    b = torch.tensor([1, 2, 5, 1, 1, 1])
    ids, n = dense_ids(a, b)
    assert n == 3
    assert ids[2] == -1
    assert ids[0] == ids[4] and ids[3] == ids[5] and len({int(ids[0]), int(ids[1]), int(ids[3])}) == 3
    assert set(ids[ids >= 0].tolist()) == {0, 1, 2}
    ids, n = dense_ids(torch.zeros(0, dtype=torch.long))
    assert n == 0 and ids.numel() == 0
    with pytest.raises(ValueError, match="keys\\[1\\]"):
        dense_ids(a, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("mode", ["mean", "mean_std"])
@pytest.mark.parametrize("std", ["unbiased", "population"])
@pytest.mark.parametrize("singleton", ["zero", "raw", "drop"])
def test_gnorm_matches_loop(mode, std, singleton):
    rng = random.Random(0)
    ids = [0, 0, 0, 1, 2, 2, -1, 3, 3, 3, 3, 1, 4]  # group 4 is a singleton, 3 is all-equal
    x = [rng.uniform(-2, 2) for _ in ids]
    for i, g in enumerate(ids):
        if g == 3:
            x[i] = 0.1
    got = gnorm(torch.tensor(x), torch.tensor(ids), 5, mode=mode, std=std, singleton=singleton)
    want = ref_gnorm(x, ids, mode, std, 1e-6, singleton)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    assert (got[[7, 8, 9, 10]] == 0).all()  # all-equal group: exact zeros
    assert got[6] == 0 and torch.isfinite(got).all()


def test_gnorm_weighted_matches_loop_and_per_episode_equivalence():
    x = [1.0, 1.0, 1.0, 0.0, 0.0, 2.0]
    ids = [0, 0, 0, 0, 0, 0]
    w = [1 / 3, 1 / 3, 1 / 3, 0.5, 0.5, 1.0]  # three episodes of lengths 3, 2, 1: per-episode weighting
    got = gnorm(torch.tensor(x), torch.tensor(ids), 1, weights=torch.tensor(w))
    want = ref_gnorm(x, ids, "mean_std", "unbiased", 1e-6, "zero", w)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    ep = ref_gnorm([1.0, 0.0, 2.0], [0, 0, 0], "mean_std", "unbiased", 1e-6, "zero")  # one value per episode
    assert torch.allclose(got[[0, 3, 5]], torch.tensor(ep), atol=1e-5)


def test_seg_stats_loop():
    x = torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0])
    s = seg_stats(x, torch.tensor([0, 0, 0, 1, 1]), 2)
    assert s.count.tolist() == [3, 2]
    assert torch.allclose(s.mean, torch.tensor([7 / 3, 5.0]))
    assert torch.allclose(s.var_pop[0], torch.tensor(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3))
    assert torch.allclose(s.var_unb[0], s.var_pop[0] * 3 / 2)
    assert s.var_unb[1] == 0 and s.var_pop[1] == 0


def test_rloo_loop():
    x = [1.0, 0.0, 0.5, 3.0, 2.0, 2.0]
    ids = [0, 0, 0, 1, 2, 2]
    got = rloo(torch.tensor(x), torch.tensor(ids))
    want = []
    for i, g in enumerate(ids):
        others = [x[j] for j in range(len(x)) if ids[j] == g and j != i]
        want.append(x[i] - sum(others) / len(others) if others else x[i])
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert got[4] == 0 and got[5] == 0


def ref_return(r, ep, t, gamma, cont=None):
    out = [0.0] * len(r)
    for e in set(ep):
        turns = sorted((t[i], i) for i in range(len(r)) if ep[i] == e)
        g = 0.0
        for _, i in reversed(turns):
            c = 1.0 if cont is None else cont[i]
            g = r[i] + gamma * c * g
            out[i] = g
    return out


def test_disc_return_loop_resets_and_underflow():
    rng = random.Random(1)
    ep, t = [], []
    for e, T in enumerate([3, 1, 5, 2]):  # different lengths, shuffled order
        ep += [e] * T
        t += list(range(T))
    perm = list(range(len(ep)))
    rng.shuffle(perm)
    ep, t = [ep[i] for i in perm], [t[i] for i in perm]
    r = [rng.uniform(-1, 1) for _ in ep]
    cont = [float(rng.random() < 0.6) for _ in ep]
    got = disc_return(torch.tensor(r), torch.tensor(ep), torch.tensor(t), 0.9)
    assert torch.allclose(got, torch.tensor(ref_return(r, ep, t, 0.9)), atol=1e-5)
    got = disc_return(torch.tensor(r), torch.tensor(ep), torch.tensor(t), 0.9, cont=torch.tensor(cont))
    assert torch.allclose(got, torch.tensor(ref_return(r, ep, t, 0.9, cont)), atol=1e-5)
    # UI-S1 §9(e): matched = [1, 1, 0, 1], r = 1, γ = 0.5 -> G = [1.5, 1, 1, 1] with c_t = m_t ∧ m_{t+1}
    m = [1, 1, 0, 1]
    c = [float(m[k] and (m[k + 1] if k + 1 < 4 else 1)) for k in range(4)]
    G = disc_return(torch.ones(4), torch.zeros(4, dtype=torch.long), torch.arange(4), 0.5, cont=torch.tensor(c))
    assert G.tolist() == [1.5, 1.0, 1.0, 1.0]
    # γ = 0.5, T = 50: the first turn's return is 2^-49, not 0 or NaN (no γ^t cumsum)
    r = torch.zeros(50)
    r[-1] = 1.0
    G = disc_return(r, torch.zeros(50, dtype=torch.long), torch.arange(50), 0.5)
    assert G[0] == 2.0 ** -49


def test_hist_keys_loop():
    ep = [0, 0, 0, 0, 1, 1, 1]
    t = [0, 1, 2, 3, 0, 1, 2]
    s = [10, 11, 10, 11, 20, 11, 10]
    got = hist_keys(torch.tensor(s), torch.tensor(ep), torch.tensor(t), 2)
    assert got.shape == (7, 3)
    S = torch.tensor(s)
    for u in range(7):
        assert got[u, 0] == s[u]
        for k in (1, 2):
            if t[u] < k:
                assert got[u, k] == -1
            else:
                h = S[u]
                for j in range(1, k + 1):
                    h = mix_keys(h, S[u - j])
                assert got[u, k] == h
    # windows: (s_{t-1}, s_t) = (11, 10) at ep0 t2 and ep1 t2 -> same level-1 key; level-2 differs (10 vs 20)
    assert got[2, 1] == got[6, 1] and got[2, 2] != got[6, 2]
    # an unknown state makes every window containing it unknown
    got = hist_keys(torch.tensor([5, -1, 6]), torch.zeros(3, dtype=torch.long), torch.arange(3), 1)
    assert got[:, 1].tolist() == [-1, -1, -1] and got[2, 0] == 6


def test_turn_broadcast_and_sum():
    a = torch.tensor([0.5, -1.0, 2.0])
    tok = torch.tensor([[0, 0, -1, 1, 1], [2, 2, 2, -1, -1]])
    out = turn_to_token(a, tok)
    assert out.tolist() == [[0.5, 0.5, 0.0, -1.0, -1.0], [2.0, 2.0, 2.0, 0.0, 0.0]]
    assert turn_sum(torch.ones(2, 5), tok, 3).tolist() == [2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="tok_turn"):
        turn_to_token(a, torch.tensor([[3]]))


def test_text_key_stable():
    assert text_key("A..\n.G.") == text_key("A..\n.G.")
    assert text_key("A..") != text_key("..A")
    assert text_key("x") != -1


def _batch(layout: str) -> RolloutBatch:
    """Two episodes (3 turns, 1 turn) of one group, in layout B (a row per episode) or A (a row per turn)."""
    if layout == "B":
        T = 8
        tok = torch.tensor([[0, 0, -1, 1, -1, 2, 2, 2], [0, 0, 0, -1, -1, -1, -1, -1]])
        env = torch.tensor([[0, 0, 1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]).bool()
        cmask = torch.tensor([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]).bool()
        return RolloutBatch(
            completion_ids=torch.zeros(2, T, dtype=torch.long), completion_mask=cmask, group_ids=torch.tensor([0, 0]),
            rewards=torch.tensor([1.0, 0.0]), episode_ids=torch.tensor([0, 1]), turn_ids=torch.tensor([0, 0]),
            token_turn=tok, env_mask=env, turn_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]).bool(),
            turn_rewards=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
            turn_keys=torch.tensor([[5, 6, 7], [5, -1, -1]]))
    # layout A: rows in shuffled order (turn 2 of ep 0, ep 1's turn, turn 0 and 1 of ep 0)
    return RolloutBatch(
        completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]).bool(),
        group_ids=torch.zeros(4, dtype=torch.long), rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        episode_ids=torch.tensor([7, 9, 7, 7]), turn_ids=torch.tensor([2, 0, 0, 1]),
        token_turn=torch.tensor([[2, 2, 2], [0, 0, 0], [0, 0, -1], [1, -1, -1]]),
        turn_mask=torch.ones(4, 1, dtype=torch.bool), turn_rewards=torch.tensor([[1.0], [0.0], [0.0], [0.0]]),
        turn_keys=torch.tensor([[7], [5], [5], [6]]))


@pytest.mark.parametrize("layout", ["A", "B"])
def test_turn_table_both_layouts(layout):
    tt = turn_table(_batch(layout))
    assert tt.num_episodes == 2
    assert tt.episode.tolist() == [0, 0, 0, 1] and tt.t.tolist() == [0, 1, 2, 0]
    assert tt.reward.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert tt.state_key.tolist() == [5, 6, 7, 5]
    assert tt.ep_outcome.tolist() == [1.0, 0.0] and tt.ep_len.tolist() == [3, 1]
    a_tok = turn_to_token(torch.tensor([10.0, 11.0, 12.0, 20.0]), tt.tok_turn)
    b = _batch(layout)
    if layout == "B":
        assert a_tok.tolist() == [[10, 10, 0, 11, 0, 12, 12, 12], [20, 20, 20, 0, 0, 0, 0, 0]]
    else:
        assert a_tok.tolist() == [[12, 12, 12], [20, 20, 20], [10, 10, 0], [11, 0, 0]]
    assert ((a_tok != 0) <= b.loss_mask).all()


def test_no_group_at_all_gives_zeros():
    x = torch.tensor([1.0, 2.0])
    ids = torch.tensor([-1, -1])
    for singleton in ("zero", "raw", "drop"):
        assert gnorm(x, ids, singleton=singleton).tolist() == [0.0, 0.0]
    assert rloo(x, ids).tolist() == [0.0, 0.0]
    assert seg_stats(x, ids).count.tolist() == [0.0]
