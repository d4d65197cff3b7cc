"""Micro-batches by tokens, not rows (RolloutBatch.split_tokens, Loop(micro_batch_tokens=...)): the cuts by hand,
and one update on a real tiny causal LM with mixed completion lengths equal to the padded path's (float64)."""

from __future__ import annotations

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts


def synthetic(widths: list[int], T: int = 6, P: int = 2) -> RolloutBatch:
    B = len(widths)
    mask = torch.arange(T)[None, :] < torch.tensor(widths)[:, None]  # (B, T) right-padded
    ids = torch.arange(B * T).reshape(B, T)
    return RolloutBatch(completion_ids=ids, completion_mask=mask, group_ids=torch.arange(B) // 2,
                        prompt_ids=torch.zeros(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P, dtype=torch.bool),
                        old_logprobs=ids.double(), advantages=torch.arange(B).double(),
                        turn_rewards=torch.ones(B, T))  # a (B, K) per-turn table with K = T: never trimmed


def test_cuts_by_hand():
    # P = 2; widths 1 4 2 2 5 1; budget 12. Rows x (P + widest) per micro-batch:
    # [0, 1] -> 2 x 6 = 12; adding row 2 -> 3 x 6 = 18 > 12: cut.  [2, 3] -> 2 x 4 = 8; adding row 4 -> 3 x 7: cut.
    # [4] -> 7; adding row 5 -> 2 x 7 = 14 > 12: cut.  [5] -> 3.
    b = synthetic([1, 4, 2, 2, 5, 1])
    parts = b.split_tokens(12)
    assert [p.batch_size for p in parts] == [2, 2, 1, 1]
    assert [p.completion_ids.shape[1] for p in parts] == [4, 2, 5, 1]
    assert torch.equal(parts[1].completion_ids, b.completion_ids[2:4, :2])
    assert torch.equal(parts[1].old_logprobs, b.old_logprobs[2:4, :2])
    assert torch.equal(parts[1].advantages, b.advantages[2:4])  # (B,) fields are not cut
    assert parts[1].turn_rewards.shape == (2, 6)  # per-turn tables keep their K columns
    # a row wider than the budget goes alone; the whole batch fits a large budget as one micro-batch
    assert [p.batch_size for p in b.split_tokens(3)] == [1, 1, 1, 1, 1, 1]
    assert [p.batch_size for p in b.split_tokens(10**6)] == [6]
    with pytest.raises(ValueError, match="budget"):
        b.split_tokens(0)


def test_update_equals_the_padded_path_with_mixed_lengths(one_thread):
    """One update with token-budget micro-batches moves the weights as the padded single micro-batch does, with
    fewer padded tokens through the model. The model runs in float64 but the head's log-softmax in float32 (as
    on every path): rows computed in batches of other shapes may round differently there (u = 6e-8 relative),
    so the bound is 1e-6 of the step's size, and 1e-6 on log-probs of magnitude < 10."""
    torch.manual_seed(0)

    def policy():
        return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                              Sampling(max_new_tokens=6)).double()

    def score(b):
        r = (b.completion_ids == 7).double().mean(1) + 1e-3 * torch.arange(b.batch_size, dtype=torch.float64)
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",))

    pol_a, pol_b = policy(), policy()
    loop_a = Loop(pol_a, score, GRPO(), ClippedPolicyLoss(), group_size=4)
    loop_b = Loop(pol_b, score, GRPO(), ClippedPolicyLoss(), group_size=4, micro_batch_tokens=40)
    batch = loop_a.collect(digit_prompts(3)).kept
    # mixed lengths: row i keeps its first 1 + (i mod 6) tokens (a right-padded batch, as EOS would leave it)
    T = batch.completion_mask.shape[1]
    keep = torch.arange(T)[None, :] <= (torch.arange(batch.batch_size) % 6)[:, None]
    batch = batch.replace(completion_mask=batch.completion_mask & keep)
    P = batch.prompt_ids.shape[1]
    micro, inverse = loop_b.micro_batches(batch)
    padded_tokens = sum(m.batch_size * (P + m.completion_ids.shape[1]) for m in micro)
    assert len(micro) > 1 and padded_tokens < batch.batch_size * (P + T) and inverse is not None
    before = [p.detach().clone() for p in pol_a.trainable_parameters()]
    metrics = {}
    for name, pol, loop in (("a", pol_a, loop_a), ("b", pol_b, loop_b)):
        opt = torch.optim.SGD(pol.trainable_parameters(), lr=1.0)
        metrics[name] = loop.update(batch, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0.0))
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(pol_a.trainable_parameters(), before))
    gap = max((p.detach() - q.detach()).abs().max().item()
              for p, q in zip(pol_a.trainable_parameters(), pol_b.trainable_parameters()))
    assert moved > 1e-6 and gap <= 1e-6 * moved, (moved, gap)
    torch.testing.assert_close(metrics["a"]["loss"], metrics["b"]["loss"], rtol=1e-6, atol=1e-12)  # ~0: Σ A = 0
    # per-token outputs come back at full width, in rollout order
    with torch.no_grad():
        torch.testing.assert_close(loop_a.logprobs(batch), loop_b.logprobs(batch), rtol=0, atol=1e-6)


def test_bad_budget_names_the_argument():
    pol = CausalLMPolicy(TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                         Sampling(max_new_tokens=2))
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        Loop(pol, lambda b: b, GRPO(), ClippedPolicyLoss(), group_size=2, micro_batch_tokens=0)
