"""POAD's BAD GAE (common/advantages/poad.py) against a plain-loop reference over turns and tokens, the spec's
hand-computed one-step check (agentic.md §5 (e): BAD prefers the better long action, NTPO the worse short one),
telescoping, padding invariance, degenerate input, and the critic's clipped value loss (common/methods/poad.py)."""

from __future__ import annotations

import pytest
import torch

from common.advantages.poad import POAD, bad_gae, poad_token_rewards, turn_boundaries, whiten_nonzero
from common.batch import RolloutBatch
from common.methods.poad import clipped_value_loss


def reference(episodes, gamma, lam, mode="bad"):
    """episodes: list of turns, each turn a list of values V_j (one per action token) and a reward r_t.
    Returns per-turn lists of advantages, by the equations of agentic.md §5 (b) written turn by turn."""
    out = []
    for turns in episodes:
        adv = [[0.0] * len(vs) for vs, _ in turns]
        nxt_first_adv, nxt_first_v = 0.0, 0.0  # Â_{t+1,1}, V_1^{t+1}; m = 0 after the last turn
        for t in range(len(turns) - 1, -1, -1):
            vs, r = turns[t]
            m = 1.0 if t < len(turns) - 1 else 0.0
            n = len(vs)
            for j in range(n - 1, -1, -1):
                if mode == "bad":
                    if j == n - 1:
                        delta = r + gamma * m * nxt_first_v - vs[j]
                        adv[t][j] = delta + gamma * lam * m * nxt_first_adv
                    else:
                        delta = vs[j + 1] - vs[j]
                        adv[t][j] = delta + lam * adv[t][j + 1]
                else:  # NTPO: γ at every token; the reward at the turn's last token
                    if j == n - 1:
                        delta = r + gamma * m * nxt_first_v - vs[j]
                        adv[t][j] = delta + gamma * lam * m * nxt_first_adv
                    else:
                        delta = gamma * vs[j + 1] - vs[j]
                        adv[t][j] = delta + gamma * lam * adv[t][j + 1]
            nxt_first_adv, nxt_first_v = adv[t][0], vs[0]
        out.append(adv)
    return out


def layout_b(episodes, env_tokens=2, pad=3):
    """Rows [a_0, o_0, a_1, o_1, ..., a_k] + padding: action tokens, then env_tokens environment tokens per turn."""
    B = len(episodes)
    T = max(sum(len(vs) + env_tokens for vs, _ in turns) for turns in episodes) + pad
    values = torch.zeros(B, T)
    cmask = torch.zeros(B, T, dtype=torch.bool)
    env = torch.zeros(B, T, dtype=torch.bool)
    tt = torch.full((B, T), -1)
    K = max(len(t) for t in episodes)
    tr = torch.zeros(B, K)
    where = []
    for b, turns in enumerate(episodes):
        p, pos = 0, []
        for t, (vs, r) in enumerate(turns):
            tr[b, t] = r
            pos.append(list(range(p, p + len(vs))))
            for v in vs:
                values[b, p], cmask[b, p], tt[b, p] = v, True, t
                p += 1
            if t < len(turns) - 1:
                for _ in range(env_tokens):
                    cmask[b, p], env[b, p], values[b, p] = True, True, 99.0  # the critic's value here is never used
                    p += 1
        where.append(pos)
    return values, cmask, env, tt, tr, where


def random_episodes(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [[3, 1, 4], [2], [1, 1], [5, 2, 2, 1]]  # different numbers of turns and action lengths
    return [[(torch.randn(n, generator=g).tolist(), float(torch.randn((), generator=g))) for n in turns] for turns in lengths]


@pytest.mark.parametrize("mode", ["bad", "ntpo"])
@pytest.mark.parametrize("gamma,lam", [(0.95, 0.95), (1.0, 1.0), (0.5, 0.0)])
def test_matches_the_plain_loop_reference(mode, gamma, lam):
    eps = random_episodes(0)
    values, cmask, env, tt, tr, where = layout_b(eps)
    mask = cmask & ~env
    last = turn_boundaries(mask, tt)
    r = poad_token_rewards(tr.sum(1), mask, last, tt, tr, torch.zeros(len(eps), dtype=torch.long))
    got = bad_gae(values, mask, r, last, gamma=gamma, lam=lam, mode=mode)
    want = reference(eps, gamma, lam, mode)
    for b, turns in enumerate(want):
        for t, advs in enumerate(turns):
            assert got[b, where[b][t]].tolist() == pytest.approx(advs, abs=1e-5)
    assert bool((got[~mask] == 0).all())  # environment tokens and padding: 0


def test_spec_one_step_check_bad_prefers_the_better_long_action_ntpo_the_short_one():
    # S: one token, reward 0.8; L: five tokens, reward 1.0; pi(S) = pi(L) = 0.5; exact values (agentic.md §5 (e))
    # BAD: V(∅) = 0.9, inside L every V = 1.0.  NTPO (γ_tok = 0.9): V(∅) = 0.5·0.8 + 0.5·0.9⁴ = 0.728, inside L V_j = 0.9^{5−j}
    mask = torch.tensor([[True, False, False, False, False], [True] * 5])
    last = turn_boundaries(mask, None)
    r = poad_token_rewards(torch.tensor([0.8, 1.0]), mask, last, None)
    v_bad = torch.tensor([[0.9, 0, 0, 0, 0], [0.9, 1.0, 1.0, 1.0, 1.0]])
    bad = bad_gae(v_bad, mask, r, last, gamma=0.9, lam=1.0, mode="bad")
    assert bad[:, 0].tolist() == pytest.approx([-0.1, 0.1], abs=1e-6)
    v0 = 0.5 * 0.8 + 0.5 * 0.9 ** 4  # 0.72805 (the spec rounds it to 0.728)
    v_ntpo = torch.tensor([[v0, 0, 0, 0, 0], [v0, 0.9 ** 3, 0.9 ** 2, 0.9, 1.0]])
    ntpo = bad_gae(v_ntpo, mask, r, last, gamma=0.9, lam=1.0, mode="ntpo")
    assert ntpo[:, 0].tolist() == pytest.approx([0.8 - v0, 0.9 ** 4 - v0], abs=1e-6)  # ±0.07195: the sign flips
    assert float(ntpo[0, 0]) > 0 > float(ntpo[1, 0])


def test_telescoping_and_padding_invariance():
    g = torch.Generator().manual_seed(1)
    eps = [[(torch.randn(4, generator=g).tolist(), 0.3), (torch.randn(2, generator=g).tolist(), 0.7)]]
    values, cmask, env, tt, tr, where = layout_b(eps)
    mask = cmask & ~env
    last = turn_boundaries(mask, tt)
    r = poad_token_rewards(tr.sum(1), mask, last, tt, tr, torch.zeros(1, dtype=torch.long))
    gamma = 0.9
    adv = bad_gae(values, mask, r, last, gamma=gamma, lam=1.0)
    v0, v1 = eps[0][0][0][0], eps[0][1][0][0]
    # λ = 1: Â_{0,1} = r_0 + γ V_1^{1} − V_1^{0} + γ Â_{1,1}, and Â_{1,1} = r_1 − V_1^{1}
    assert float(adv[0, where[0][1][0]]) == pytest.approx(0.7 - v1, abs=1e-6)
    assert float(adv[0, where[0][0][0]]) == pytest.approx(0.3 + gamma * v1 - v0 + gamma * (0.7 - v1), abs=1e-6)
    # padding the first action with deterministic tokens (V unchanged) keeps BAD's first-token advantage, not NTPO's
    padded = eps
    longer = [[(eps[0][0][0][:1] + [eps[0][0][0][1]] * 3 + eps[0][0][0][1:], 0.3), eps[0][1]]]
    firsts = {}
    for name, e in (("short", padded), ("long", longer)):
        values, cmask, env, tt, tr, where = layout_b(e)
        mask = cmask & ~env
        last = turn_boundaries(mask, tt)
        r = poad_token_rewards(tr.sum(1), mask, last, tt, tr, torch.zeros(1, dtype=torch.long))
        for mode in ("bad", "ntpo"):
            firsts[name, mode] = float(bad_gae(values, mask, r, last, gamma=gamma, lam=1.0, mode=mode)[0, 0])
    assert firsts["short", "bad"] == pytest.approx(firsts["long", "bad"], abs=1e-6)
    assert abs(firsts["short", "ntpo"] - firsts["long", "ntpo"]) > 1e-3


def test_degenerate_input_gives_zeros_not_nan():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, :2] = True  # row 0 and 2: no action token
    values = torch.zeros(3, 4)
    last = turn_boundaries(mask, None)
    r = poad_token_rewards(torch.zeros(3), mask, last, None)
    adv = bad_gae(values, mask, r, last)
    assert bool((adv == 0).all()) and bool(torch.isfinite(whiten_nonzero(adv)).all())
    assert bad_gae(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0),
                   torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 0)
    w = whiten_nonzero(torch.tensor([[0.0, 2.0, 4.0], [0.0, 0.0, 6.0]]))
    assert w[0, 0] == 0 and float(w[w != 0].mean()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="mode"):
        bad_gae(values, mask, r, last, mode="gae")


def test_estimator_on_a_batch_and_whole_episode_check():
    eps = random_episodes(2)
    values, cmask, env, tt, tr, where = layout_b(eps)
    B, T = values.shape
    batch = RolloutBatch(completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=cmask,
                         group_ids=torch.zeros(B, dtype=torch.long), rewards=tr.sum(1), values=values.masked_fill(env, 0.0),
                         token_turn=tt, env_mask=env, turn_rewards=tr, turn_ids=torch.zeros(B, dtype=torch.long),
                         episode_ids=torch.arange(B))
    raw = POAD(gamma=0.9, lam=0.8, whiten=False)(batch)
    want = reference(eps, 0.9, 0.8)
    for b, turns in enumerate(want):
        for t, advs in enumerate(turns):
            assert raw[b, where[b][t]].tolist() == pytest.approx(advs, abs=1e-5)
    w = POAD(gamma=0.9, lam=0.8)(batch)
    nz = raw != 0
    assert float(w[nz].mean()) == pytest.approx(0.0, abs=1e-5) and float(w[nz].std()) == pytest.approx(1.0, abs=1e-3)
    # an end-reason reward the turn rewards leave out (R − Σ r_t = −0.5) goes on the final action token
    extra = POAD(gamma=0.9, lam=0.8, whiten=False)(batch.replace(rewards=tr.sum(1) - 0.5))
    eps_extra = [turns[:-1] + [(turns[-1][0], turns[-1][1] - 0.5)] for turns in eps]
    for b, turns in enumerate(reference(eps_extra, 0.9, 0.8)):
        for t, advs in enumerate(turns):
            assert extra[b, where[b][t]].tolist() == pytest.approx(advs, abs=1e-5)
    with pytest.raises(ValueError, match="whole episode"):
        POAD()(batch.replace(episode_ids=torch.zeros(B, dtype=torch.long)))


def test_value_loss_gives_environment_tokens_no_gradient():
    eps = random_episodes(3)
    values, cmask, env, tt, tr, where = layout_b(eps)
    mask = cmask & ~env
    v = torch.randn(values.shape, requires_grad=True)
    old = values.masked_fill(~mask, 0.0)
    targets = old + 0.3
    loss = clipped_value_loss(v, old, targets, mask, mask.sum(), 0.2)
    loss.backward()
    assert bool((v.grad[env] == 0).all()) and bool((v.grad[mask] != 0).any())
    # clipped: with V far from V_old the clipped branch bounds the error from below (max of the two squares)
    far = old + 5.0
    plain = clipped_value_loss(far, old, targets, mask, mask.sum(), None)
    clipped = clipped_value_loss(far, old, targets, mask, mask.sum(), 0.2)
    assert float(clipped) == pytest.approx(float(plain), rel=1e-6)  # (V − V̂)² is the larger one here
