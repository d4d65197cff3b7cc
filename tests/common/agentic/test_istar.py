"""iStar / OPRL (common/advantages/istar.py, common/methods/istar.py): the advantage against a plain-loop reference
on hand-built tables (layouts A and B, episodes of different lengths, a group of one, all-fail groups), the PRM's
trajectory DPO loss against a loop over pairs, the spec's tabular chain-MDP check (agentic.md §6 (e)), and the online
PRM on a tiny real model: step rewards = β Σ (log π_φ − log π_old) per turn, the micro-batched gradient equals the
full-graph gradient, environment tokens get no gradient, and PRM weights + optimiser state round-trip through a
weights_only save/load."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from agentic_tables import make_batch

from common.advantages.istar import IStar, istar_turn_advantages, prm_dpo_loss, trajectory_scores
from common.batch import RolloutBatch
from common.losses.ppo_clip import ClippedPolicyLoss
from common.loop import Loop
from common.methods.istar import OnlinePRM, with_turn_mask
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy, Sampling
from common.segment_ops import turn_table

EPISODES = [  # group 0: 3 episodes of 3, 1, 2 turns; group 1: one episode (a group of one); group 2: all fail
    {"group": 0, "outcome": 1.0, "turns": [{"process": 0.2}, {"process": -0.4}, {"process": 0.1}]},
    {"group": 0, "outcome": 0.0, "turns": [{"process": -0.3}]},
    {"group": 0, "outcome": 1.0, "turns": [{"process": 0.5}, {"process": 0.0}]},
    {"group": 1, "outcome": 0.7, "turns": [{"process": 0.9}, {"process": -0.1}]},
    {"group": 2, "outcome": 0.0, "turns": [{"process": 0.05}, {"process": 0.05}]},
    {"group": 2, "outcome": 0.0, "turns": [{"process": -0.2}]},
]


def loo(values):
    n = len(values)
    return [v if n == 1 else v - (sum(values) - v) / (n - 1) for v in values]


def grpo_like(values, std):
    n = len(values)
    if n == 1:
        return list(values)
    mu = statistics.mean(values)
    sd = statistics.stdev(values) if std else 0.0
    return [(v - mu) / (sd + 1e-6) if std else v - mu for v in values]


def reference(episodes, alpha=1.0, ep_est="rloo", step_est="rloo", pool="all_turns"):
    """{(episode, turn): A} by the equations, written with loops over groups, episodes and turns."""
    scale = max(abs(t["process"]) for ep in episodes for t in ep["turns"]) + 1e-6
    rel = {"rloo": loo, "mean": lambda v: grpo_like(v, False), "mean_std": lambda v: grpo_like(v, True)}
    out = {}
    for g in sorted({ep["group"] for ep in episodes}):
        members = [e for e, ep in enumerate(episodes) if ep["group"] == g]
        a_ep = dict(zip(members, rel[ep_est]([episodes[e]["outcome"] for e in members])))
        turns = [(e, k, episodes[e]["turns"][k]["process"] / scale) for e in members for k in range(len(episodes[e]["turns"]))]
        if pool == "all_turns":
            a_step = dict(zip([(e, k) for e, k, _ in turns], rel[step_est]([r for _, _, r in turns])))
        else:
            firsts = [r for e, k, r in turns if k == 0]
            n, mu = len(firsts), statistics.mean(firsts)
            a_step = {(e, k): (r if n == 1 else (r - mu) * n / (n - 1)) for e, k, r in turns}
        for e, k, _ in turns:
            out[e, k] = a_ep[e] + alpha * a_step[e, k]
    return out


@pytest.mark.parametrize("layout", ["B", "A"])
@pytest.mark.parametrize("ep_est,step_est,pool,alpha", [("rloo", "rloo", "all_turns", 1.0), ("mean_std", "mean", "all_turns", 0.5),
                                                        ("mean", "mean_std", "all_turns", 2.0), ("rloo", "rloo", "first_turn", 1.0)])
def test_advantage_matches_the_plain_loop_reference(layout, ep_est, step_est, pool, alpha):
    batch = make_batch(EPISODES, layout=layout, seed=3)
    adv = IStar(alpha=alpha, episode_estimator=ep_est, step_estimator=step_est, step_pool=pool)(batch)
    want = reference(EPISODES, alpha, ep_est, step_est, pool)
    first = batch.turn_ids
    for b in range(batch.batch_size):
        e = int(batch.episode_ids[b]) - (100 if layout == "A" else 0)  # agentic_tables numbers layout-A episodes from 100
        for j in range(batch.completion_ids.shape[1]):
            t = int(batch.token_turn[b, j])
            if t >= 0 and bool(batch.loss_mask[b, j]):
                assert float(adv[b, j]) == pytest.approx(want[e, t], abs=1e-5)
            else:
                assert float(adv[b, j]) == 0.0  # environment tokens and padding
    assert int(first.max()) >= (1 if layout == "A" else 0)


def test_degenerate_tables_give_zeros_not_nan():
    flat = [{"group": 0, "outcome": 0.0, "turns": [{"process": 0.0}] * 2}, {"group": 0, "outcome": 0.0, "turns": [{"process": 0.0}]}]
    adv = IStar()(make_batch(flat))
    assert bool(torch.isfinite(adv).all()) and bool((adv == 0).all())
    tt = turn_table(make_batch(flat))
    empty = istar_turn_advantages(tt.ep_outcome[:0], tt.ep_group[:0], tt.episode[:0], tt.group[:0], tt.process_reward[:0])
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="step_pool"):
        IStar(step_pool="first")


def test_dpo_loss_matches_a_loop_over_pairs_and_no_pair_is_zero():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    success = torch.tensor([True, False, False, True, True, False, False])
    group = torch.tensor([0, 0, 0, 1, 2, 2, 2])  # group 1: a success alone (no pair)
    loss, n, acc = prm_dpo_loss(scores, success, group)
    pairs = [(i, j) for i in range(7) for j in range(7) if group[i] == group[j] and success[i] and not success[j]]
    s = scores.tolist()
    want = -sum(math.log(1 / (1 + math.exp(-(s[i] - s[j])))) for i, j in pairs) / len(pairs)
    assert int(n) == len(pairs) == 4 and float(loss) == pytest.approx(want, rel=1e-12)
    assert float(acc) == pytest.approx(sum(s[i] > s[j] for i, j in pairs) / 4)
    none, n0, _ = prm_dpo_loss(scores, torch.zeros(7, dtype=torch.bool), group)  # all-fail: no pair
    (grad,) = torch.autograd.grad(none, scores)
    assert float(none) == 0.0 and int(n0) == 0 and bool((grad == 0).all())
    assert trajectory_scores(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 1]), 2, "mean").tolist() == [1.5, 4.0]


def test_spec_chain_mdp_the_prm_credits_the_key_step():
    """agentic.md §6 (e): 3 steps, 3 actions, success iff the action at step 1 is 2; uniform π_old; tabular PRM logits
    φ[t, a] from 0; β = 0.5; 300 DPO steps on 16 fresh trajectories (sum score)."""
    g = torch.Generator().manual_seed(0)
    phi = torch.zeros(3, 3, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    beta, log_old = 0.5, math.log(1 / 3)

    def rewards(actions):  # (N, 3) -> (N, 3) r_φ(t) = β (log π_φ(a_t) − log π_old(a_t))
        return beta * (torch.log_softmax(phi, 1)[torch.arange(3), actions] - log_old)

    for _ in range(300):
        a = torch.randint(3, (16, 3), generator=g)
        loss, n, _ = prm_dpo_loss(rewards(a).sum(1), a[:, 1] == 2, torch.zeros(16, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = beta * (torch.log_softmax(phi, 1) - log_old)  # (3, 3)
        held = torch.randint(3, (400, 3), generator=g)
        sc, ok = rewards(held).sum(1), held[:, 1] == 2
        acc = (sc[ok][:, None] > sc[~ok][None, :]).float().mean()
    assert float(r[1, 2]) > 0 and bool((r[1, :2] < 0).all())
    assert float(r[[0, 2]].abs().max()) < 0.1 * float(r.abs().max())
    assert float(acc) > 0.95


# ------------------------------------------------------------------ the online PRM on a tiny real model


def tiny_loop(micro=None):
    lm = CausalLMPolicy(TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="0123456789+udlr", seed=0),
                        Sampling(max_new_tokens=4))
    prm = OnlinePRM(beta=0.5, lr=1e-2)
    loop = Loop(lm, lambda b: b, IStar(), ClippedPolicyLoss(), methods=[prm], group_size=2, micro_batch_size=micro,
                provided=("episode_ids", "token_turn"))
    return loop, prm


def agent_batch(seed=0):
    """Layout-B rows over the tiny model's vocabulary: 2 groups x 3 episodes, turns of 2-3 action tokens with one
    environment token between turns; rewards give every group a success and a failure."""
    g = torch.Generator().manual_seed(seed)
    turns = [[3, 2], [2], [2, 3, 2], [3], [2, 2], [3, 3]]
    rows, tts, envs = [], [], []
    for ep in turns:
        ids, tt, env = [], [], []
        for k, n in enumerate(ep):
            ids += torch.randint(1, 14, (n,), generator=g).tolist()
            tt += [k] * n
            env += [False] * n
            if k < len(ep) - 1:
                ids.append(int(torch.randint(1, 14, (), generator=g)))
                tt.append(-1)
                env.append(True)
        rows.append((ids, tt, env))
    T = max(len(r[0]) for r in rows)
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
    cmask = torch.tensor(pad([[True] * len(r[0]) for r in rows], False))
    return RolloutBatch(prompt_ids=torch.tensor([[1, 2, 3]] * 3 + [[4, 5, 6]] * 3), prompt_mask=torch.ones(6, 3, dtype=torch.bool),
                        completion_ids=torch.tensor(pad([r[0] for r in rows], 0)), completion_mask=cmask,
                        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]), rewards=torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
                        episode_ids=torch.arange(6), turn_ids=torch.zeros(6, dtype=torch.long),
                        token_turn=torch.tensor(pad([r[1] for r in rows], -1)), env_mask=torch.tensor(pad([r[2] for r in rows], False)),
                        num_turns=torch.tensor([len(t) for t in turns]))


def test_online_prm_step_rewards_gradient_and_round_trip(tmp_path, one_thread):
    loop, prm = tiny_loop(micro=4)
    batch = agent_batch()
    with torch.no_grad():  # move φ away from θ so the step rewards are not all 0
        for p in prm.prm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = [p.detach().clone() for p in prm.prm.parameters()]
    full = with_turn_mask(batch)
    with torch.no_grad():
        q = torch.where(full.loss_mask, prm.prm_logprobs(full) - loop.logprobs(full), torch.zeros(()))
    out = prm.after_score(loop, batch)
    # process_rewards[b, k] = β Σ_{j in turn k} q_{b,j}, from the pre-update φ
    for b in range(6):
        for k in range(int(batch.num_turns[b])):
            want = 0.5 * float(q[b][batch.token_turn[b] == k].sum())
            assert float(out.process_rewards[b, k]) == pytest.approx(want, abs=1e-5)
    assert bool((out.process_rewards[~out.turn_mask] == 0).all())
    assert any(not torch.equal(a, p) for a, p in zip(before, prm.prm.parameters()))  # the PRM stepped
    assert int(prm.last["prm/pairs"]) == 2 + 2
    # the micro-batched gradient equals the full-graph gradient of J(φ)
    tt = turn_table(full)
    for p in prm.prm.parameters():
        p.grad = None
    lp = prm.prm_logprobs(full)  # one graph over the whole batch
    r_turn = 0.5 * torch.zeros(tt.episode.shape[0]).index_add(0, tt.tok_turn[tt.tok_turn >= 0],
                                                              (lp - loop.logprobs(full))[tt.tok_turn >= 0])
    loss, _, _ = prm_dpo_loss(trajectory_scores(r_turn, tt.episode, tt.num_episodes, "mean"), tt.ep_outcome > 0, tt.ep_group)
    loss.backward()
    want = [p.grad.clone() for p in prm.prm.parameters()]
    for p in prm.prm.parameters():
        p.grad = None
    prm.dpo_backward(full, full.split(4), tt, r_turn.detach())
    for w, p in zip(want, prm.prm.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
    token_w = prm.token_weights(full, tt, r_turn.detach())[0]
    assert bool((token_w[full.env_mask] == 0).all()) and bool((token_w[full.loss_mask] != 0).any())  # env tokens: none
    # round trip: PRM weights and AdamW state through a weights_only save/load
    torch.save(prm.state_dict(), tmp_path / "prm.pt")
    loop2, prm2 = tiny_loop(micro=4)
    prm2.load_state_dict(torch.load(tmp_path / "prm.pt", weights_only=True))
    for a, b in zip(prm.prm.parameters(), prm2.prm.parameters()):
        assert torch.equal(a, b)
    s1, s2 = prm.optimizer.state_dict()["state"], prm2.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # the loop's estimator consumes the PRM's field
    adv = loop.advantage(out)
    assert adv.shape == batch.completion_ids.shape and bool(torch.isfinite(adv).all()) and bool((adv[batch.env_mask] == 0).all())
