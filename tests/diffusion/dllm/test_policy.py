"""MaskedDiffusionPolicy (diffusion/dllm/policy.py): d1's one-step estimator against a plain re-computation, the
per-epoch prompt mask shared by old / reference / current log-probs, the completion layout."""

from __future__ import annotations

import pytest
import torch

from common.batch import RolloutBatch
from common.ops import seeded_uniform
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy
from helpers import DIGITS, digit_prompts


def policy(**kw) -> MaskedDiffusionPolicy:
    args = dict(gen_length=4, block_length=2, steps=2, p_mask=0.3) | kw
    return MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=DIGITS, hidden_size=32, num_layers=1, num_heads=2), **args).double()


def test_one_step_estimate_equals_a_plain_recomputation(one_thread):
    """Row by row: mask prompt token j iff u_{seed, e}(P − 1 − j) < p_mask (real tokens only), the completion all
    MASK, one forward, log-softmax without the MASK token, gathered at the sampled tokens; entropy of the same."""
    torch.manual_seed(0)
    pol = policy()
    batch = pol.rollout(digit_prompts(3) + [{"prompt": "1+2"}], 2)  # the short prompt is left-padded
    out = pol(batch, epoch=3)
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    for b in range(batch.batch_size):
        u = seeded_uniform(batch.seeds[b : b + 1], 3, (P,))[0]
        ids = batch.prompt_ids[b].clone()
        for j in range(P):
            if batch.prompt_mask[b, j] and u[P - 1 - j] < pol.p_mask:
                ids[j] = pol.mask_id
        x = torch.cat([ids, torch.full((T,), pol.mask_id)])[None]
        logits = pol.model(x, torch.cat([batch.prompt_mask[b], torch.ones(T, dtype=torch.bool)])[None])[0, P:]
        logits[:, pol.mask_id] = float("-inf")
        logp = logits.log_softmax(-1)  # (T, V)
        m = batch.completion_mask[b]
        expect = logp.gather(1, batch.completion_ids[b][:, None])[:, 0] * m
        torch.testing.assert_close(out.logprobs[b], expect.float(), rtol=0, atol=2e-6)
        ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) * m
        torch.testing.assert_close(out.entropy[b], ent.float(), rtol=0, atol=2e-6)
    # mean-field: a token's log-prob does not depend on the other completion tokens (they are MASK in the input)
    other = batch.replace(completion_ids=batch.completion_ids.roll(1, dims=1))
    lp_other = pol(other, epoch=3).logprobs
    rolled_back = pol(other.replace(completion_ids=batch.completion_ids), epoch=3).logprobs
    assert torch.equal(rolled_back, out.logprobs) and not torch.equal(lp_other, out.logprobs)


def test_old_reference_and_current_share_the_epochs_mask_whatever_the_split_or_padding(one_thread):
    torch.manual_seed(1)
    pol = policy(p_mask=0.5)
    pol.enable_reference()
    batch = pol.rollout(digit_prompts(4), 3)
    whole = pol(batch, epoch=2).logprobs
    assert torch.equal(pol(batch, epoch=2, reference=True).logprobs, whole)  # same weights, same mask
    assert torch.equal(torch.cat([pol(m, epoch=2).logprobs for m in batch.split(5)]), whole)
    assert (pol(batch, epoch=3).logprobs - whole).abs().max() > 1e-4  # a new mask each epoch
    wide = pol.rollout([{"prompt": "1234+5678"}], 2)  # a longer prompt: cat left-pads this batch further
    both = RolloutBatch.cat([batch, wide])
    assert both.prompt_ids.shape[1] > batch.prompt_ids.shape[1]
    torch.testing.assert_close(pol(both, epoch=2).logprobs[: batch.batch_size], whole, rtol=0, atol=1e-12)


def test_the_prompt_mask_rate_is_p_mask_on_real_tokens_only():
    pol = policy(p_mask=0.15)
    B, P = 4000, 6
    prompt_mask = torch.arange(P)[None, :] >= torch.randint(0, 3, (B, 1))  # left padding
    batch = RolloutBatch(completion_ids=torch.zeros(B, 1, dtype=torch.long), completion_mask=torch.ones(B, 1, dtype=torch.bool),
                         group_ids=torch.arange(B), prompt_ids=torch.ones(B, P, dtype=torch.long), prompt_mask=prompt_mask,
                         seeds=torch.arange(B) * 7919)
    drawn = pol.prompt_mask_draw(batch, epoch=0)
    assert not (drawn & ~prompt_mask).any()
    rate = drawn.sum() / prompt_mask.sum()
    n = int(prompt_mask.sum())
    assert abs(float(rate) - 0.15) < 5 * (0.15 * 0.85 / n) ** 0.5


def test_completion_mask_stops_at_the_first_eos_unless_eos_padding_counts():
    pol = policy()
    eos = pol.tokenizer.eos_token_id
    tokens = torch.tensor([[5, eos, 6, eos], [5, 6, 7, 8]])
    mask, truncated = pol.completion_layout(tokens)
    assert mask.tolist() == [[True, True, False, False], [True] * 4] and truncated.tolist() == [False, True]
    assert policy(include_eos_padding=True).completion_layout(tokens)[0].all()
    assert pol.decode(tokens)[0] == pol.tokenizer.decode([5])


@pytest.mark.parametrize("kw, match", [(dict(gen_length=5, block_length=2), "multiple of block_length"),
                                       (dict(steps=3), "steps"), (dict(p_mask=1.0), "p_mask")])
def test_bad_arguments_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        policy(**kw)
