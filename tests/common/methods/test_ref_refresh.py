"""Reference-model refresh (common/methods/ref_refresh.py): after N optimiser steps the reference weights are the
hand mix α·θ + (1 − α)·ref; LoRA's adapter-off reference is refused at start-up naming ``lora``."""

from __future__ import annotations

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.ref_refresh import RefRefresh
from common.models import LoRA, TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts


def policy(**kw) -> CausalLMPolicy:
    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=4), **kw)


def score(b: RolloutBatch) -> RolloutBatch:
    r = (b.completion_ids == 7).double().mean(1) + 1e-3 * torch.arange(b.batch_size, dtype=torch.float64)
    return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_reference_is_the_hand_mix_after_n_steps(alpha, one_thread):
    """float64, minibatch = half the batch: 2 optimiser steps per update, every = 3 -> no refresh after update 1
    (2 steps: the reference is bit-identical to the initial weights), a refresh after update 2 (4 steps) with the
    weights at its end: ref = α·θ + (1 − α)·ref_0 (α = 1: an exact copy)."""
    torch.manual_seed(0)
    pol = policy().double()
    refresh = RefRefresh(every=3, alpha=alpha)
    loop = Loop(pol, score, GRPO(), ClippedPolicyLoss(beta=0.04), methods=[refresh], group_size=4, minibatch_size=4)
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.5)
    ref0 = snapshot(pol.reference)
    loop.update(loop.collect(digit_prompts(2)).kept, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0))
    assert int(refresh.steps) == 2 and int(refresh.refreshes) == 0
    assert all(torch.equal(v, ref0[k]) for k, v in pol.reference.named_parameters())
    metrics = loop.update(loop.collect(digit_prompts(2)).kept, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0))
    assert int(refresh.steps) == 4 and metrics["ref_refreshes"] == 1
    theta = snapshot(pol.model)
    moved = max(float((theta[k] - ref0[k]).abs().max()) for k in theta)
    assert moved > 1e-3  # the policy moved, so the mix is not trivially the old reference
    for k, v in pol.reference.named_parameters():
        if alpha == 1.0:
            assert torch.equal(v, theta[k]), k
        else:  # lerp vs the hand formula: float64 rounding, a few ulps of |values| ≤ ~10
            torch.testing.assert_close(v, alpha * theta[k] + (1 - alpha) * ref0[k], rtol=0, atol=1e-14)
    # the policy itself is untouched by the refresh, and the reference still gives log-probs
    assert all(torch.equal(v, theta[k]) for k, v in pol.model.named_parameters())


def test_lora_reference_is_refused_at_start_up_naming_lora():
    pol = policy(lora=LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="RefRefresh: .*`lora`") as err:
        Loop(pol, score, GRPO(), ClippedPolicyLoss(beta=0.04), methods=[RefRefresh(every=2)], group_size=4)
    assert "\n" not in str(err.value)


def test_without_a_reference_or_with_bad_arguments_is_an_error():
    with pytest.raises(ValueError, match="nothing reads a reference"):
        Loop(policy(), score, GRPO(), ClippedPolicyLoss(), methods=[RefRefresh(every=2)], group_size=4)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        RefRefresh(every=0)
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\]"):
        RefRefresh(alpha=0.0)
