"""MultiTurnAgentPolicy (common/policies/agent.py) on tiny real models with real generation: log-probs at the
assistant tokens equal a plain full forward over prompt + completion; the training sequence is exactly what was
sampled and what the environment wrote (no re-tokenisation); environment tokens never reach the loss (gradient
check); a calculator tool episode end to end; a hanging, raising or failing-to-reset environment ends its episode
with a typed reason, never the run. (The loop conformance test runs the agent as the ``agent`` kind of
tests/common/test_loop.py.)"""

from __future__ import annotations

import time

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import TinyLlama
from common.policies.agent import MultiTurnAgentPolicy, pack
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from common.rollout.env import END_REASONS, EpisodeLimits
from common.rollout.hf import HFBackend
from agent_support import Script
from helpers import DIGITS
from text_reasoning.envs.calculator import Calculator
from text_reasoning.envs.grid import GridTasks, GridWorld

GRID = DIGITS + "udlr.AG\n"


class RecordingGrid(GridWorld):
    """The grid world, keeping every episode's instance (spawn order = row order) and what each one saw."""

    def __init__(self):
        super().__init__()
        self.children: list[RecordingGrid] = []
        self.actions: list[str] = []
        self.observations: list[str] = []

    def spawn(self):
        child = RecordingGrid()
        self.children.append(child)
        return child

    def step(self, action):
        self.actions.append(action)
        out = super().step(action)
        self.observations.append(out.observation)
        return out


def grid_agent(env=None, *, logprobs=True, max_turns=3, max_total_tokens=60) -> MultiTurnAgentPolicy:
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=GRID, seed=0),
                        Sampling(max_new_tokens=4, logprobs=logprobs))
    return MultiTurnAgentPolicy(lm, env if env is not None else GridWorld(),
                                EpisodeLimits(max_turns=max_turns, max_total_tokens=max_total_tokens, step_timeout_s=0.5))


def tasks(n: int) -> list[dict]:
    return [p.as_sample() for p in GridTasks(3).make(n, 0)]


def test_pack_moves_valid_entries_to_one_end_in_order():
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    ids = torch.tensor([[9, 1, 9, 2], [3, 9, 9, 9]])
    m, x = pack(mask, ids)
    assert m.tolist() == [[True, True, False, False], [True, False, False, False]] and x[:, :2].tolist() == [[1, 2], [3, 9]]
    m, x = pack(mask, ids, left=True)
    assert m.tolist() == [[False, False, True, True], [False, False, False, True]] and x[:, 2:].tolist() == [[1, 2], [9, 3]]


def test_logprobs_equal_a_plain_full_forward_on_prompt_and_completion(one_thread):
    """A float64 model: the policy's log-probs at the assistant tokens equal log_softmax (float64) of one plain
    forward of each row's unpadded prompt + completion (the reference, a loop over rows) to the rounding of the
    policy's float32 log-softmax (a few ulps of |log p| < 8: 2e-6); 0 at environment tokens; the sampler's
    per-turn log-probs (float32, recorded while generating turn by turn) agree to the same rounding."""
    torch.manual_seed(0)
    policy = grid_agent().double()
    batch = policy.rollout(tasks(3), 3)
    env, act = batch.env_mask, batch.loss_mask
    assert env.any() and act.any() and not (env & act).any()
    assert (batch.token_turn[act] >= 0).all() and (batch.token_turn[~act] == -1).all()
    out = policy(batch)
    model = policy.lm.model
    for i in range(batch.batch_size):
        p = batch.prompt_ids[i][batch.prompt_mask[i]]
        c = batch.completion_ids[i][batch.completion_mask[i]]
        with torch.no_grad():
            logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1 : -1].double()  # (|c|, V)
        ref = logits.log_softmax(-1).gather(1, c[:, None]).squeeze(1)  # (|c|,)
        keep = act[i][batch.completion_mask[i]]  # assistant tokens among the valid ones
        got = out.logprobs[i][batch.completion_mask[i]][keep].detach().double()
        assert ref[keep].abs().max() < 8
        torch.testing.assert_close(got, ref[keep], rtol=0, atol=2e-6)
    assert (out.logprobs[env] == 0).all() and (out.entropy[env] == 0).all()
    torch.testing.assert_close(batch.behaviour_logprobs[act], out.logprobs[act].detach(), rtol=0, atol=2e-6)
    assert (batch.behaviour_logprobs[env] == 0).all()


def test_the_sequence_is_what_was_sampled_and_what_the_environment_saw(one_thread):
    """Per row and turn: the decoded action tokens are the text the environment stepped on, and the environment
    tokens are the tokenizer's ids of its observation (the sequence is the concatenation, never re-tokenised)."""
    torch.manual_seed(1)
    env = RecordingGrid()
    policy = grid_agent(env)
    batch = policy.rollout(tasks(2), 4)
    tok = policy.tokenizer
    assert len(env.children) == batch.batch_size
    multi = 0
    for i, child in enumerate(env.children):
        ids, valid = batch.completion_ids[i], batch.completion_mask[i]
        turn, envm = batch.token_turn[i], batch.env_mask[i]
        assert int(batch.num_turns[i]) == len(child.actions)
        for t, action in enumerate(child.actions):
            assert tok.decode(ids[turn == t], skip_special_tokens=True) == action
        # environment tokens: every observation the episode went on with, in order
        shown = [o for o in child.observations if o][: len(child.actions) - 1]
        expected = [x for o in shown for x in tok(o, add_special_tokens=False)["input_ids"]]
        assert ids[envm & valid].tolist() == expected
        multi += len(shown) > 0
    assert multi > 0  # some episodes really are multi-turn
    reasons = {END_REASONS[i] for i in batch.end_reason.tolist()}
    assert reasons <= {"done", "stopped", "max_turns", "overflow"}


def test_environment_tokens_never_enter_the_loss(one_thread):
    """Gradient check: d loss / d log π(token) is 0 at every environment token and non-zero at assistant tokens,
    even when the raw LM log-probs (not zeroed) are fed to the loss."""
    torch.manual_seed(2)
    policy = grid_agent().double()
    batch = policy.rollout(tasks(2), 4)
    batch = batch.replace(advantages=torch.linspace(-1, 1, batch.batch_size, dtype=torch.float64))
    raw = policy.lm(batch).logprobs  # (B, T) log-probs of every completion token, environment tokens included
    raw.retain_grad()
    loss = ClippedPolicyLoss()(logprobs=raw, old_logprobs=raw.detach(), advantages=batch.advantages, mask=batch.loss_mask,
                               ref_logprobs=None, entropy=torch.zeros_like(raw), normaliser=Normaliser.of(batch.loss_mask, 60),
                               batch=batch).loss
    loss.backward()
    assert batch.env_mask.any()
    assert (raw.grad[batch.env_mask] == 0).all()
    assert (raw.grad[batch.loss_mask] != 0).any()


CHAT_TOOL_TURN = ("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")  # SmolLM2's turn markers


@pytest.mark.parametrize("prefix, suffix", [("", ""), CHAT_TOOL_TURN], ids=["inline", "chat_turns"])
def test_a_calculator_tool_episode_end_to_end(prefix, suffix, one_thread):
    """The model calls the tool (the turn stops at </tool>), the tool's <result> is appended as environment tokens
    (inline, or as a user turn between the chat template's markers, whose special tokens are single ids), the model
    answers: reward 1, ended 'done' after 2 turns; the tool tokens are masked; log-probs as a plain forward."""
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, seed=0), Sampling(max_new_tokens=16))
    lm.backend = HFBackend(logits_processors=[Script(lm.tokenizer, ["<tool>calc: 12+7</tool>", "<answer>19</answer>"])])
    policy = MultiTurnAgentPolicy(lm, Calculator(), EpisodeLimits(max_turns=4, max_total_tokens=64,
                                                                  observation_prefix=prefix, observation_suffix=suffix))
    batch = policy.rollout([{"prompt": "What is 12+7?", "answer": "19"}], 1)
    s = batch.samples[0]
    assert (s["episode_return"], END_REASONS[int(batch.end_reason[0])], int(batch.num_turns[0])) == (1.0, "done", 2)
    tok = policy.tokenizer
    ids = batch.completion_ids[0]
    env = ids[batch.env_mask[0]]
    assert tok.decode(env) == prefix + "<result>19</result>" + suffix
    assert (env == tok.convert_tokens_to_ids("<|im_end|>")).sum() == (2 if prefix else 0)
    assert tok.decode(ids[batch.token_turn[0] == 0]) == "<tool>calc: 12+7</tool>"
    assert tok.decode(ids[batch.token_turn[0] == 1], skip_special_tokens=True) == "<answer>19</answer>"
    if not prefix:
        assert batch.completions[0] == "<tool>calc: 12+7</tool><result>19</result><answer>19</answer>"
    assert not bool(batch.truncated[0])
    with torch.no_grad():
        full = torch.cat([batch.prompt_ids[0][batch.prompt_mask[0]], ids[batch.completion_mask[0]]])
        logits = lm.model(full[None]).logits[0, batch.prompt_mask[0].sum() - 1 : -1].float()
        ref = logits.log_softmax(-1).gather(1, ids[batch.completion_mask[0]][:, None]).squeeze(1)
        got = policy(batch).logprobs[0][batch.completion_mask[0]]
    act = batch.loss_mask[0][batch.completion_mask[0]]
    assert ref[act].abs().max() < 16
    torch.testing.assert_close(got[act], ref[act], rtol=0, atol=2e-5)  # float32 model, |log p| < 16: a few ulps


class Faulty(GridWorld):
    """A grid world that hangs, raises or fails to reset, as the task says."""

    def reset(self, task):
        self.mode = task["mode"]
        if self.mode == "bad_reset":
            raise RuntimeError("no such level")
        return super().reset(task)

    def step(self, action):
        if self.mode == "hang":
            time.sleep(3)
        if self.mode == "raise":
            raise KeyError("boom")
        return super().step(action)


def test_hanging_raising_and_unresettable_environments_end_their_episodes(one_thread, caplog):
    modes = ["hang", "raise", "bad_reset", "ok"]
    ts = [{**t, "mode": m} for t, m in zip(tasks(4), modes)]
    policy = grid_agent(Faulty(), max_turns=2)
    policy.limits.failure_reward = -1.0
    policy.limits.step_timeout_s = 0.2
    start = time.perf_counter()
    batch = policy.rollout(ts, 1)
    assert time.perf_counter() - start < 10
    reasons = [END_REASONS[i] for i in batch.end_reason.tolist()]
    assert reasons[:3] == ["timeout", "env_error", "env_error"] and reasons[3] in ("done", "max_turns", "stopped")
    assert [s["episode_return"] for s in batch.samples[:3]] == [-1.0, -1.0, -1.0]
    assert batch.completion_mask[2].sum() == 0  # never reset: no turn was taken
    assert "timed out after 0.2 s" in caplog.text and "raised KeyError" in caplog.text and "no such level" in caplog.text
    out = policy(batch)
    assert torch.isfinite(out.logprobs).all()


def test_episode_stats_counts_end_reasons_and_turns(one_thread):
    """EpisodeStats' fractions per reason equal a count over the rows (hand reference); a non-agent policy fails at
    start-up because nothing provides end_reason."""
    from common.advantages.group import GRPO
    from common.loop import Loop
    from common.methods.episode_stats import EpisodeStats

    torch.manual_seed(3)
    batch = grid_agent(max_turns=2).rollout(tasks(3), 4)
    got = EpisodeStats().after_update(None, batch)
    names = [END_REASONS[i] for i in batch.end_reason.tolist()]
    for r in END_REASONS:
        assert float(got[f"end/{r}"]) == pytest.approx(names.count(r) / len(names), rel=1e-6)  # float32 fraction
    assert float(got["episode_turns"]) == sum(batch.num_turns.tolist()) / len(names)
    lm = grid_agent().lm
    with pytest.raises(ValueError, match=r"EpisodeStats requires RolloutBatch.end_reason"):
        Loop(lm, lambda b: b, GRPO(), ClippedPolicyLoss(), methods=[EpisodeStats()])
