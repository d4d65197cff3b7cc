"""The in-reward KL coefficient's controllers (common/losses/kl_control.py) and the loop's use of them."""

from __future__ import annotations

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.kl_control import AdaptiveKLController, KLController
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts


def test_adaptive_update_by_hand():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100.0)
    ctl.observe(torch.full((4,), 9.0))  # e = clip(9/6 − 1 = 0.5) = 0.2, K = 4/100: β = 0.1 · 1.008
    torch.testing.assert_close(ctl.coef, torch.tensor(0.1008))
    torch.testing.assert_close(ctl.metrics()["kl_coef"], torch.tensor(0.1))  # the β that round used
    torch.testing.assert_close(ctl.metrics()["kl_in_reward"], torch.tensor(9.0))
    ctl.observe(torch.tensor([4.0, 6.8, 5.4, 5.4]))  # mean 5.4: e = −0.1 -> β · (1 − 0.004)
    torch.testing.assert_close(ctl.coef, torch.tensor(0.1008 * 0.996))
    before = ctl.coef.clone()
    ctl.observe(torch.zeros(0))  # an empty round: n = 0, β unchanged, KL 0 (not NaN)
    torch.testing.assert_close(ctl.coef, before)
    assert ctl.metrics()["kl_in_reward"] == 0


def test_adaptive_matches_a_plain_reference_over_many_rounds():
    """OpenRLHF's / lm-human-preferences' AdaptiveKLController in plain Python floats (float64) as the reference;
    float32 β after 200 multiplicative updates agrees to 200 · 2⁻²³ relative (one rounding per update)."""
    gen = torch.Generator().manual_seed(0)
    ctl = AdaptiveKLController(init_coef=0.05, target=3.0, horizon=500.0)
    value = 0.05
    for _ in range(200):
        kl = torch.rand(16, generator=gen) * 8  # (16,) per-sequence KL
        current = float(kl.double().mean())
        value *= 1 + min(max(current / 3.0 - 1, -0.2), 0.2) * 16 / 500.0
        ctl.observe(kl)
    assert abs(float(ctl.coef) - value) <= 200 * 2**-23 * value


def test_fixed_is_the_constant_case_and_not_checkpointed():
    ctl = KLController(0.3)
    ctl.observe(torch.full((8,), 100.0))
    assert float(ctl.coef) == pytest.approx(0.3) and "coef" not in ctl.state_dict()
    assert KLController(0.0).metrics() == {} and not KLController(0.0).active
    assert "coef" in AdaptiveKLController().state_dict()  # the adaptive β is in the checkpoint
    fresh = AdaptiveKLController(init_coef=0.5)
    fresh.load_state_dict({"coef": torch.tensor(0.123)})
    assert float(fresh.coef) == pytest.approx(0.123)


def test_loop_subtracts_beta_kl_then_adapts(one_thread):
    """Through the loop with a real tiny causal LM: after one update the policy differs from its reference; the
    next round's rewards are r − β·Σ_t (ℓ − ℓ_ref) with the β before the round, and β then moves by the round's
    mean KL (hand formula)."""
    torch.manual_seed(0)
    policy = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                            Sampling(max_new_tokens=5)).double()
    ctl = AdaptiveKLController(init_coef=0.2, target=0.01, horizon=40.0).double()

    def score(b: RolloutBatch) -> RolloutBatch:
        r = (b.completion_ids == 7).double().mean(1) + 1e-3 * torch.arange(b.batch_size, dtype=torch.float64)
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",))

    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), group_size=4, kl_in_reward=ctl)
    first = loop.collect(digit_prompts(2)).kept  # policy = reference: KL 0, so e = −0.2
    torch.testing.assert_close(ctl.coef, torch.tensor(0.2 * (1 - 0.2 * 8 / 40), dtype=torch.float64))
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    metrics = loop.update(first, Stepper(opt, policy.trainable_parameters(), max_grad_norm=0))
    torch.testing.assert_close(metrics["kl_coef"], torch.tensor(0.2, dtype=torch.float64))
    beta = ctl.coef.clone()
    torch.manual_seed(1)
    raw = loop.rollout(digit_prompts(2))
    torch.manual_seed(1)
    shaped = loop.collect(digit_prompts(2)).kept
    with torch.no_grad():
        kl = ((policy(raw).logprobs - policy(raw, reference=True).logprobs) * raw.completion_mask).sum(1)  # (8,)
    assert kl.abs().max() > 1e-4  # the update moved the policy away from its reference
    torch.testing.assert_close(shaped.rewards, score(raw).rewards - beta * kl)
    e = (kl.mean() / 0.01 - 1).clamp(-0.2, 0.2)
    torch.testing.assert_close(ctl.coef, beta * (1 + e * 8 / 40))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKLController(target=0.0)
    with pytest.raises(ValueError, match="init_coef must be > 0"):
        AdaptiveKLController(init_coef=0.0)
    with pytest.raises(ValueError, match="kl_in_reward must be >= 0"):
        Loop(CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0)),
             lambda b: b, GRPO(), ClippedPolicyLoss(), kl_in_reward=-0.1)
