"""SPEAR (common/methods/spear.py, common/replay/sil_buffer.py): the two cosine schedules, recalibration against
P50 of the baseline history, eviction by age, the replay trigger and subsample, the replay loss (its micro-batch
chunks sum to c_rep·L_replay over the whole replay batch; environment tokens get no gradient), and the buffer's round
trip through a weights_only state-dict save/load (agentic.md §7 (e) 1-3)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.entropy import ClipCovLoss
from common.methods.spear import SPEAR, replay_weight, tool_bonus_weight
from common.replay.sil_buffer import SelfImitationBuffer, mean_token_advantage


def rows(rewards, lengths, groups=None, seed=0, advantages=None):
    g = torch.Generator().manual_seed(seed)
    B, T = len(rewards), max(lengths)
    cmask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    env = cmask & (torch.arange(T)[None, :] % 4 == 3)
    return RolloutBatch(completion_ids=torch.randint(3, 30, (B, T), generator=g), completion_mask=cmask,
                        group_ids=torch.tensor(groups if groups is not None else [0] * B), rewards=torch.tensor(rewards),
                        env_mask=env, old_logprobs=-torch.rand(B, T, generator=g).masked_fill(~cmask | env, 0.0),
                        advantages=torch.tensor(advantages if advantages is not None else rewards),
                        num_turns=torch.tensor(lengths) // 4 + 1, samples=[{"i": i} for i in range(B)])


def test_schedules_match_the_spec():
    T = 200
    assert tool_bonus_weight(0, T) == 1.0 and tool_bonus_weight(T, T) == pytest.approx(0.0, abs=1e-12)
    ws = [tool_bonus_weight(s, T) for s in range(0, 260)]
    assert all(a >= b for a, b in zip(ws, ws[1:])) and ws[T + 1] == 0.0
    assert tool_bonus_weight(250, T, "constant") == 0.0 and tool_bonus_weight(7, T, "constant") == 1.0
    assert tool_bonus_weight(0, T, "none") == 0.0
    cs = [replay_weight(s, T, 2.0) for s in range(0, 260)]
    assert cs[0] == 0.0 and cs[T] == 2.0 and cs[-1] == 2.0 and all(a <= b for a, b in zip(cs, cs[1:]))
    assert replay_weight(50, T, 1.0) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    spear = SPEAR(tool_steps=T)
    n = torch.tensor([0, 3, 10, 25])
    assert spear.tool_bonus(n, 0).tolist() == pytest.approx([0.0, 0.3, 1.0, 1.0])  # min(1, 0.1 n) at τ = 0
    assert spear.tool_bonus(n, T).abs().max() < 1e-12


def test_recalibration_eviction_and_baseline_history():
    buf = SelfImitationBuffer(tolerate_steps=2, baseline_size=5)
    for means in ([0.1], [0.3, 0.9]):
        buf.push_baseline(means)
    assert buf.baseline() == pytest.approx(0.3)  # P50 of {0.1, 0.3, 0.9}
    buf.push_baseline([0.5, 0.5, 0.5])  # 6 group means > 5: the oldest step goes
    assert buf.history == [[0.3, 0.9], [0.5, 0.5, 0.5]] and buf.baseline() == pytest.approx(statistics.median([0.3, 0.9, 0.5, 0.5, 0.5]))
    buf.history = [[0.1], [0.3, 0.9]]
    buf.add(rows([0.2, 0.5], [4, 6]), step=0)
    buf.add(rows([0.3, 1.0, 0.0], [3, 5, 2], seed=1), step=2)
    assert buf.evict(2) == 0 and len(buf) == 5
    assert buf.evict(3) == 2 and buf.entry == [2, 2, 2]  # 3 − 0 > τ_tol = 2
    out = buf.replay(16, torch.Generator().manual_seed(0))
    # R = [0.3, 1.0, 0.0] − 0.3: keep Â ≥ 0 -> [0.0, 0.7]; 2^⌊log₂ 2⌋ = 2 rows
    assert out.advantages.tolist() == pytest.approx([0.0, 0.7]) and out.rewards.tolist() == pytest.approx([0.3, 1.0])
    assert len(buf) == 0 and buf.rows is None  # emptied
    buf.add(rows([1.0] * 7, [3] * 7), step=5)
    sub = buf.replay(16, torch.Generator().manual_seed(0))
    assert sub.batch_size == 4  # 2^⌊log₂ 7⌋
    buf.add(rows([1.0] * 7, [3] * 7), step=5)
    assert buf.replay(2, torch.Generator().manual_seed(0)).batch_size == 2  # capped
    assert buf.replay(2, torch.Generator().manual_seed(0)) is None  # empty
    assert SelfImitationBuffer(tolerate_steps=50).tolerance == 10


def test_after_score_adds_the_bonus_and_after_update_fills_the_buffer():
    spear = SPEAR(tool_steps=10, buffer_size=2, tolerate_steps=1)
    batch = rows([1.0, 0.0, 0.0, 1.0], [4, 8, 5, 2], groups=[0, 0, 1, 1], advantages=[0.5, -0.5, -0.5, 0.5])
    scored = spear.after_score(None, batch)
    bonus = (0.1 * batch.num_turns.float()).clamp(max=1.0)
    assert torch.allclose(scored.rewards, batch.rewards + bonus)
    metrics = spear.after_update(None, scored)
    assert len(spear.buffer) == 2 and int(spear.steps) == 1  # the rows with mean advantage > 0
    assert spear.buffer.history == [pytest.approx([statistics.mean(scored.rewards[:2].tolist()),
                                                   statistics.mean(scored.rewards[2:].tolist())])]
    assert float(metrics["spear/buffer_rows"]) == 2.0
    tok = torch.tensor([[1.0, 1.0, -3.0], [0.0, 2.0, 0.0]])
    assert mean_token_advantage(tok, torch.tensor([[True, True, False], [True, True, True]])).tolist() == pytest.approx([1.0, 2 / 3])


class LogitPolicy(torch.nn.Module):
    """A policy whose log-probs are a learnable (B, T) table over a fixed batch (the real loss sees real autograd)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.horizon, self.device = table.shape[1], torch.device("cpu")

    def forward(self, batch, **_):
        idx = torch.tensor([s["i"] for s in batch.samples])
        lp = self.table[idx, : batch.completion_ids.shape[1]]
        return type("Out", (), {"logprobs": lp.masked_fill(batch.env_mask, 0.0)})()


class FakeLoop:
    def __init__(self, policy, micro):
        self.policy, self.micro_batch_size = policy, micro


def test_replay_loss_chunks_sum_to_the_whole_and_env_tokens_get_no_gradient():
    spear = SPEAR(buffer_size=4, replay_steps=0, replay_coef=0.7)
    stored = rows([1.0, 0.9, 0.8, 0.7, 1.0, 0.95, 0.85], [5, 9, 7, 4, 8, 6, 3], seed=3)
    spear.buffer.add(stored, step=0)
    spear.buffer.history = [[0.5]]
    table = stored.old_logprobs + 0.05 * torch.randn(stored.old_logprobs.shape, generator=torch.Generator().manual_seed(1))
    policy = LogitPolicy(table)
    spear.prepare_replay(FakeLoop(policy, 3), step=0)
    assert sum(c.batch_size for c in spear.pending) == 4 and len(spear.pending) == 2  # 2^⌊log₂ 7⌋ = 4, chunks of 3
    replay = RolloutBatch.cat(list(spear.pending)) if len(spear.pending) > 1 else spear.pending[0]
    total = 0.0
    while spear.pending:
        total = total + spear.extra_loss(FakeLoop(policy, 3), None, None, None).loss
    total.backward()
    grad_chunks = policy.table.grad.clone()
    policy.table.grad = None
    # the reference: one ClipCov loss over the whole replay batch, same draws (same step, calls in order -> one call)
    ref_loss = ClipCovLoss(ratio=0.02, lb=2.0, ub=60.0, eps_low=0.2, eps_high=0.28, dual_clip=10.0,
                           aggregation="seq_mean_token_sum_norm")
    ref_loss.set_step(0)
    lp = policy(replay).logprobs
    whole = ref_loss(lp, replay.old_logprobs, replay.advantages, replay.loss_mask,
                     normaliser=Normaliser.of(replay.loss_mask, policy.horizon)).loss * 0.7
    assert float(total) == pytest.approx(float(whole), rel=1e-5, abs=1e-7)
    whole.backward()
    env_rows = torch.tensor([s["i"] for s in replay.samples])
    assert bool((grad_chunks[env_rows][replay.env_mask] == 0).all())  # environment tokens: no gradient
    assert bool((grad_chunks != 0).any())


def test_buffer_round_trips_through_a_weights_only_checkpoint(tmp_path):
    spear = SPEAR(buffer_size=8)
    spear.after_update(None, spear.after_score(None, rows([1.0, 0.0, 0.5], [4, 7, 3], advantages=[1.0, -1.0, 0.2])))
    spear.after_update(None, spear.after_score(None, rows([0.3, 0.9], [6, 2], seed=4, advantages=[0.1, 0.1])))
    torch.save(spear.state_dict(), tmp_path / "s.pt")
    resumed = SPEAR(buffer_size=8)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert int(resumed.steps) == 2 and resumed.buffer.entry == spear.buffer.entry == [0, 0, 1, 1]
    assert resumed.buffer.history == spear.buffer.history
    assert torch.equal(resumed.buffer.rows.old_logprobs, spear.buffer.rows.old_logprobs)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = spear.buffer.replay(8, g1), resumed.buffer.replay(8, g2)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.completion_ids, b.completion_ids)


def test_degenerate_input_and_bad_arguments():
    buf = SelfImitationBuffer()
    assert buf.baseline() == 0.0 and buf.replay(4, torch.Generator()) is None
    buf.add(rows([0.0, 0.0], [2, 2]), step=0)
    buf.history = [[0.5]]
    assert buf.replay(4, torch.Generator()) is None  # every Â < 0: nothing to replay, no NaN
    with pytest.raises(ValueError, match="tool_schedule"):
        SPEAR(tool_schedule="linear")
    with pytest.raises(ValueError, match="old_logprobs"):
        buf.add(rows([1.0], [2]).replace(old_logprobs=None), step=0)


def test_replay_runs_inside_the_loop_with_a_real_agent(one_thread):
    """Two real steps of the loop with a tiny agent in the grid world: step 1 fills the buffer with the episodes of
    positive advantage, step 2 replays them (extra_loss: a policy forward on the replayed rows) next to the on-policy
    loss; the update is finite and the replayed rows' environment tokens stay out of the loss."""
    from common.advantages.group import DrGRPO
    from common.loop import Loop, Stepper
    from common.models import TinyLlama
    from common.policies.agent import MultiTurnAgentPolicy
    from common.policies.causal_lm import CausalLMPolicy, Sampling
    from common.rollout.env import EpisodeLimits
    from text_reasoning.envs.grid import GridTasks, GridWorld

    torch.manual_seed(0)
    lm = CausalLMPolicy(TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="0123456789+udlr.AG\n", seed=0),
                        Sampling(max_new_tokens=3))
    policy = MultiTurnAgentPolicy(lm, GridWorld(), EpisodeLimits(max_turns=2, max_total_tokens=30))
    spear = SPEAR(buffer_size=2, replay_steps=0, replay_coef=0.5)
    gen = torch.Generator().manual_seed(0)
    loop = Loop(policy, lambda b: b.replace(rewards=torch.rand(b.batch_size, generator=gen)), DrGRPO(),
                ClipCovLoss(eps_high=0.28, aggregation="seq_mean_token_sum_norm"), methods=[spear], group_size=4,
                micro_batch_size=4)
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=0.01), params)
    tasks = [p.as_sample() for p in GridTasks(3).make(2, 0)]
    first = loop.update(loop.collect(tasks).kept, stepper)
    assert "spear/replay_loss" not in first and len(spear.buffer) > 3  # > 1.5 x buffer_size rows stored
    stored = spear.buffer.rows
    assert bool((stored.old_logprobs[stored.env_mask] == 0).all())
    second = loop.update(loop.collect(tasks).kept, stepper)
    assert float(second["spear/replay_rows"]) == 2.0 and torch.isfinite(second["spear/replay_loss"])
    assert float(second["spear/replay_dropped"]) == 0.0 and bool(torch.isfinite(second["loss"]))
