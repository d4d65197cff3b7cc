"""MultiTurnAgentPolicy beyond the basics (issue 21, "Beyond the anchors"): layout A (one row per turn) holds the same
tokens and log-probs as layout B (one row per episode); the per-turn table; typed episode ends with configured
rewards and counts; a hanging tool times out deterministically on a fake clock; a parse-error budget; episodes reset
by (task id, seed) with a reproducible panel hash; deliberately broken chat templates (one that drops <think> from
the history, one without a turn separator, one whose tokens merge across the boundary): the training sequence is
still what was sampled and what the environment wrote, environment tokens get no gradient, and the re-rendering
drift is reported per turn (never zeroed, never a crash), with the correct template as the no-drift control."""

from __future__ import annotations

import re
import time

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.episode_stats import EpisodeStats
from common.models import TinyLlama
from common.policies.agent import MultiTurnAgentPolicy, turn_rows, turn_table
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from common.rollout.env import END_REASONS, Environment, EpisodeLimits, FakeClock, Step
from common.rollout.hf import HFBackend
from agent_support import Script
from helpers import DIGITS
from text_reasoning.envs.grid import GridTasks, GridWorld

GRID = DIGITS + "udlr.AG\n"


def grid_agent(layout="episode", max_turns=3, **limits) -> MultiTurnAgentPolicy:
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=GRID, seed=0),
                        Sampling(max_new_tokens=4, logprobs=True))
    return MultiTurnAgentPolicy(lm, GridWorld(), EpisodeLimits(max_turns=max_turns, max_total_tokens=60, layout=layout,
                                                               step_timeout_s=5.0, **limits))


def grid_tasks(n):
    return [p.as_sample() for p in GridTasks(3).make(n, 0)]


def test_both_layouts_hold_the_same_tokens_logprobs_and_turn_table(one_thread):
    """Layout A's row for turn t of episode e: prompt + completion (unpadded) = layout B's prompt + completion up to
    the end of that turn's action, the completion = the turn's action tokens; the same sampler log-probs; the policy's
    log-probs at the action tokens agree (float64 model: to float32 log-softmax rounding); the turn tables are equal;
    a rollout in layout "turn" under the same seed gives that batch."""
    torch.manual_seed(0)
    b = grid_agent().double().rollout(grid_tasks(3), 3)
    torch.manual_seed(0)
    policy_a = grid_agent("turn").double()
    a = policy_a.rollout(grid_tasks(3), 3)
    tok = policy_a.tokenizer
    conv = turn_rows(b, tok)
    for name in ("prompt_ids", "completion_ids", "completion_mask", "token_turn", "turn_rewards", "turn_keys", "episode_ids"):
        assert torch.equal(getattr(a, name), getattr(conv, name)), name
    assert a.batch_size == int(b.num_turns.sum()) and a.turn_mask.shape[1] == 1 and a.turn_mask.all()
    assert not a.env_mask.any() and b.env_mask.any()
    for u in range(a.batch_size):
        e, t = int(a.episode_ids[u]), int(a.turn_ids[u])
        row_a = torch.cat([a.prompt_ids[u][a.prompt_mask[u]], a.completion_ids[u][a.completion_mask[u]]])
        ids_b, mine = b.completion_ids[e], b.token_turn[e] == t
        end = int(mine.nonzero().max()) + 1
        row_b = torch.cat([b.prompt_ids[e][b.prompt_mask[e]], ids_b[:end][b.completion_mask[e][:end]]])
        assert torch.equal(row_a, row_b)
        assert torch.equal(a.completion_ids[u][a.completion_mask[u]], ids_b[mine])
        assert torch.equal(a.behaviour_logprobs[u][a.completion_mask[u]], b.behaviour_logprobs[e][mine])
    out_a, out_b = policy_a(a).logprobs, policy_a(b).logprobs
    for u in range(a.batch_size):
        e, t = int(a.episode_ids[u]), int(a.turn_ids[u])
        torch.testing.assert_close(out_a[u][a.completion_mask[u]], out_b[e][b.token_turn[e] == t], rtol=0, atol=2e-6)
    ta, tb = turn_table(a), turn_table(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k != "tu_row":
            assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(tb["tu_row"], tb["tu_episode"]) and torch.equal(ta["tu_row"], torch.arange(a.batch_size))
    # the turn rewards of an episode sum to its return; keys are the hashes of the rendered grid states
    sums = torch.zeros(b.batch_size, dtype=torch.float32).index_add_(0, tb["tu_episode"], tb["tu_reward"])
    assert sums.tolist() == [s["episode_return"] for s in b.samples]
    assert (tb["tu_state_key"] >= 0).all() and tb["tu_done"].sum() == b.batch_size
    # EpisodeStats counts each episode once in either layout
    sa, sb = EpisodeStats().after_update(None, a), EpisodeStats().after_update(None, b)
    for k in sb:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-6, atol=1e-6)


class ToolEnv(Environment):
    """A tool that takes ``latency`` seconds of the environment's clock per call; "bad" actions do not parse."""

    stop_strings = ("</tool>",)

    def __init__(self, latency: float = 0.1):
        self.latency = latency

    def reset(self, task):
        self.latency = float(task.get("latency", self.latency))
        return "use the tool"

    def step(self, action):
        if "bad" in action:
            return Step("error: not a tool call", 0.25, False, False)
        self.clock.sleep(self.latency)  # a slow (or hanging) tool waits on the clock
        return Step("ok", 0.5, False)


def forced_agent(env, turns: list[str], *, template=None, **limits) -> MultiTurnAgentPolicy:
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, seed=0), Sampling(max_new_tokens=12),
                        chat_template=template)
    lm.backend = HFBackend(logits_processors=[Script(lm.tokenizer, turns)])
    return MultiTurnAgentPolicy(lm, env, EpisodeLimits(max_total_tokens=120, **limits))


def test_a_hanging_tool_times_out_on_a_fake_clock_and_end_rewards_are_typed(one_thread, caplog):
    """A tool that sleeps an hour of fake time ends its episode 'timeout' at once (CPU time, not wall time, is
    asserted); a 0.1 s tool under the 5 s limit does not; the configured timeout reward replaces the return and is
    carried on the last turn; EpisodeStats counts the reason."""
    clock = FakeClock()
    policy = forced_agent(ToolEnv(), ["<tool>go</tool>"] * 3, max_turns=3, step_timeout_s=5.0, clock=clock,
                          end_rewards={"timeout": -2.0, "max_turns": 0.75})
    cpu = time.process_time()
    batch = policy.rollout([{"prompt": "a", "latency": 3600.0}, {"prompt": "b", "latency": 0.1}], 1)
    assert time.process_time() - cpu < 30  # nothing waited for an hour
    assert [END_REASONS[i] for i in batch.end_reason.tolist()] == ["timeout", "max_turns"]
    assert clock.now() == pytest.approx(3600.0 + 3 * 0.1)
    assert [s["episode_return"] for s in batch.samples] == [-2.0, 0.75]
    assert batch.turn_rewards[0, :1].tolist() == [-2.0] and batch.turn_mask[0].tolist() == [True, False, False]
    assert batch.turn_rewards[1].tolist() == pytest.approx([0.5, 0.5, -0.25])  # 0.75 = 0.5 + 0.5 - 0.25
    assert "timed out after 5.0 s" in caplog.text
    stats = EpisodeStats().after_update(None, batch)
    assert float(stats["end_count/timeout"]) == 1 and float(stats["end/max_turns"]) == 0.5
    with pytest.raises(ValueError, match=r"end_rewards names unknown end reasons \['crash'\]"):
        EpisodeLimits(end_rewards={"crash": 0.0})


def test_a_parse_error_budget_ends_the_episode_with_its_own_reward(one_thread):
    policy = forced_agent(ToolEnv(), ["<tool>bad</tool>", "<tool>go</tool>", "<tool>bad</tool>", "<tool>go</tool>"], max_turns=4, max_parse_errors=2, clock=FakeClock(),
                          end_rewards={"parse_error": -1.0})
    batch = policy.rollout([{"prompt": "a"}], 1)
    assert END_REASONS[int(batch.end_reason[0])] == "parse_error" and int(batch.num_turns[0]) == 3
    assert batch.turn_valid[0, :3].tolist() == [False, True, False]
    assert batch.samples[0]["episode_return"] == -1.0 and float(batch.turn_rewards[0].sum()) == -1.0
    assert float(EpisodeStats().after_update(None, batch)["invalid_turns"]) == pytest.approx(2 / 3)


class SeededLevel(Environment):
    """Draws its level from ``self.rng`` (seeded by the agent from (task id, seed)) at reset."""

    def reset(self, task):
        return f"level {task['task_id']}: {self.rng.randint(0, 10**9)}"

    def step(self, action):
        return Step("", 1.0, True)


def test_episodes_reset_by_task_id_and_seed_give_a_reproducible_panel_hash(one_thread):
    """A greedy (evaluation) panel resets to the same levels and hash in every run; sampled rollouts draw their
    seeds from torch's RNG (same torch seed, same levels); the samples record (task id, seed)."""
    panel = [{"prompt": "x", "task_id": "t0"}, {"prompt": "x", "task_id": "t1"}]
    lm = CausalLMPolicy(TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=GRID, seed=0), Sampling(max_new_tokens=2))
    policy = MultiTurnAgentPolicy(lm, SeededLevel(), EpisodeLimits(max_turns=1, max_total_tokens=8))
    first = policy.rollout(panel, 2, greedy=True)
    h1 = policy.last_panel_hash
    again = policy.rollout(panel, 2, greedy=True)
    assert policy.last_panel_hash == h1 and len(h1) == 16
    assert [s["env_seed"] for s in first.samples] == [s["env_seed"] for s in again.samples]
    assert len({s["env_seed"] for s in first.samples}) == 4 and [s["task_id"] for s in first.samples] == ["t0", "t0", "t1", "t1"]
    assert torch.equal(first.prompt_ids, again.prompt_ids)
    torch.manual_seed(5)
    s1 = [s["env_seed"] for s in policy.rollout(panel, 2).samples]
    torch.manual_seed(5)
    s2 = [s["env_seed"] for s in policy.rollout(panel, 2).samples]
    torch.manual_seed(6)
    s3 = [s["env_seed"] for s in policy.rollout(panel, 2).samples]
    assert s1 == s2 != s3


class Talk(Environment):
    """Answers every turn with the next of ``replies``; done after the last (a fixed multi-turn conversation)."""

    def __init__(self, replies=("lo world", "ok then")):
        self.replies, self.t = tuple(replies), 0

    def reset(self, task):
        self.t = 0
        return task["prompt"]

    def step(self, action):
        self.t += 1
        return Step(self.replies[self.t - 1] if self.t <= len(self.replies) else "", 0.0, self.t > len(self.replies))


SMOL = None  # the tokenizer's own (correct) template: the no-drift control
DROPS_THINK = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and '</think>' in c %}"
               "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_SEPARATOR = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
MERGES = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # nothing between turns: "hel" + "lo" -> "hello"


@pytest.mark.parametrize("template, actions, drift", [
    (SMOL, ["<think>a</think>hi", "<think>b</think>yes", "bye"], [False, False, False]),
    (DROPS_THINK, ["<think>a</think>hi", "<think>b</think>yes", "bye"], [False, True, True]),
    (NO_SEPARATOR, ["hi", "yes", "bye"], None),
    (MERGES, ["hel", "yes", "bye"], [False, True, True]),
], ids=["correct", "drops_think", "no_separator", "merges"])
def test_broken_chat_templates_never_change_the_sequence_and_drift_is_reported(template, actions, drift, one_thread):
    """Per turn: the action tokens are exactly the ids sampled (forced here), the environment tokens exactly the
    template's markers + the observation as tokenised apart; the environment tokens get no gradient; the drift of
    re-rendering the history is reported per turn (True where the template loses or merges tokens)."""
    policy = forced_agent(Talk(), actions, template=template, max_turns=3, observation_role="user")
    tok = policy.tokenizer
    batch = policy.rollout([{"prompt": "hey"}], 1)
    assert END_REASONS[int(batch.end_reason[0])] == "done" and int(batch.num_turns[0]) == 3
    ids, valid, envm, turn = batch.completion_ids[0], batch.completion_mask[0], batch.env_mask[0], batch.token_turn[0]
    close, eos_text, head, tail = policy._chat_markers()
    expected = []
    for t, (action, reply) in enumerate(zip(actions, ("lo world", "ok then", None))):
        sampled = tok(action, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # Script: the text, then EOS
        assert ids[turn == t].tolist() == sampled
        expected += sampled
        if reply is not None:
            markers = [close[len(eos_text):] + head, reply, tail]
            obs = [x for part in markers if part for x in tok(part, add_special_tokens=False)["input_ids"]]
            assert ids[envm & (torch.arange(len(ids)) >= len(expected))][: len(obs)].tolist() == obs
            expected += obs
    assert ids[valid].tolist() == expected  # the whole sequence: sampled ids and environment ids, nothing else
    assert torch.equal(batch.loss_mask[0], turn >= 0)  # every sampled token trains (never a silently zeroed mask)
    got = batch.turn_drift[0].tolist()
    if drift is not None:
        assert got == drift
    else:
        assert got[0] is False and len(got) == 3  # reported (whatever the tokenizer makes of it), never a crash
    # gradient check: no gradient reaches the environment tokens
    raw = policy.lm(batch).logprobs  # (1, T) raw LM log-probs of every completion token
    raw.retain_grad()
    assert torch.isfinite(raw).all()
    ClippedPolicyLoss()(logprobs=raw, old_logprobs=raw.detach(), advantages=torch.ones(1), mask=batch.loss_mask,
                        ref_logprobs=None, entropy=torch.zeros_like(raw),
                        normaliser=Normaliser.of(batch.loss_mask, 120), batch=batch).loss.backward()
    assert envm.any() and (raw.grad[0][envm] == 0).all() and (raw.grad[0][batch.loss_mask[0]] != 0).all()
    stats = EpisodeStats().after_update(None, batch)
    assert float(stats["drift"]) == pytest.approx(sum(got) / 3) and "drift/turn_2" in stats


def test_bad_episode_settings_are_refused_naming_the_argument():
    for kwargs, message in [
        (dict(layout="rows"), "layout must be 'episode' (one row per episode) or 'turn'"),
        (dict(max_parse_errors=0), "max_parse_errors must be a positive integer or None, got 0"),
        (dict(observation_role=" "), "observation_role must be a chat role"),
        (dict(clock="wall"), "clock must be a common.rollout.env.Clock, got str"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            EpisodeLimits(**kwargs)
    # a template that does not render message contents verbatim cannot frame observations: refused at construction
    with pytest.raises(ValueError, match="observation_role='user': the chat template does not render"):
        forced_agent(Talk(), ["x"], template="{% for m in messages %}{{ m['role'] }}{% endfor %}", observation_role="user")


class Unresettable(Talk):
    def reset(self, task):
        if task["prompt"] == "bad":
            raise RuntimeError("no such level")
        return super().reset(task)


def test_an_episode_whose_reset_failed_keeps_one_empty_row_in_layout_a(one_thread, caplog):
    policy = forced_agent(Unresettable(), ["hi", "yes", "bye"], max_turns=3, layout="turn", observation_role="user",
                          end_rewards={"env_error": -1.0})
    batch = policy.rollout([{"prompt": "bad"}, {"prompt": "ok"}], 1)
    assert batch.episode_ids.tolist() == [0, 1, 1, 1] and batch.completion_mask[0].sum() == 0
    assert batch.turn_mask[:, 0].tolist() == [False, True, True, True] and batch.samples[0]["episode_return"] == -1.0
    stats = EpisodeStats().after_update(None, batch)
    assert float(stats["end_count/env_error"]) == 1 and float(stats["end/env_error"]) == 0.5
    assert "raised RuntimeError('no such level')" in caplog.text
    assert torch.isfinite(policy(batch).logprobs).all()
