"""HAPO's adaptive temperature (common/methods/hapo.py): statistics, the sign of h̃, the per-row temperature,
checkpointed state, and the method part that hands it to the HF backend and feeds it the update's entropies."""

from __future__ import annotations

import math

import pytest
import torch

from common.methods.hapo import AdaptiveTemperature, AdaptiveTemperatureSampling


def observed(code_compat=False) -> AdaptiveTemperature:
    at = AdaptiveTemperature(tau=0.05, pivot=0.8, code_compat=code_compat)
    entropy = torch.tensor([[math.e**-2, math.e**-1, 1.0, math.e**1, math.e**2]])  # z = -2, -1, 0, 1, 2
    at.observe(entropy, torch.ones_like(entropy, dtype=torch.bool))
    return at


def test_statistics_match_the_formula():
    at = observed()
    # z = [-2,-1,0,1,2]; nearest 0.8-quantile: position 0.8*4 = 3.2 -> index 3 -> q = 1
    assert float(at.pivot) == pytest.approx(1.0)
    # s = sqrt(mean((z-q)^2)) = sqrt((9+4+1+0+1)/5) = sqrt(3)
    assert float(at.scale) == pytest.approx(math.sqrt(3.0))
    # h = (z-1)/sqrt3 ; max h = 1/sqrt3, |min h| = 3/sqrt3
    assert float(at.pos_scale) == pytest.approx(1 / math.sqrt(3)) and float(at.neg_scale) == pytest.approx(3 / math.sqrt(3))
    z = torch.tensor([-2.0, 0.0, 1.0, 2.0, 5.0])
    torch.testing.assert_close(at.normalised(z), torch.tensor([-1.0, -1 / 3, 0.0, 1.0, 1.0]))  # clipped at 1


def test_code_compat_reproduces_the_public_codes_nonnegative_h():
    assert bool((observed(code_compat=True).normalised(torch.linspace(-3, 3, 13)) >= 0).all())


def test_temperature_rises_on_uncertain_rows_and_falls_on_confident_ones():
    at = observed()
    scores = torch.stack([torch.zeros(50), torch.tensor([20.0] + [0.0] * 49)])  # uniform row, peaked row
    factor = at.temperature_factor(scores)
    assert factor[0] > 1 > factor[1]
    assert torch.all((factor >= 0.95) & (factor <= 1.05))  # |τ h̃| <= τ
    fresh = AdaptiveTemperature()
    torch.testing.assert_close(fresh(torch.zeros(2, 1, dtype=torch.long), scores), scores)  # no stats yet: T = T_0


def test_state_is_checkpointed():
    at = observed()
    fresh = AdaptiveTemperature()
    fresh.load_state_dict(at.state_dict())
    z = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(fresh.normalised(z), at.normalised(z))
    assert bool(fresh.ready)


def tiny_module(**overrides):
    from common.models import TinyLlama
    from common.rewards.length import LengthReward
    from common.rollout.base import Sampling
    from helpers import DIGITS
    from text_reasoning.module import TextReasoningModule

    kwargs = dict(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS),
                  rewards=[LengthReward(target=3)], sampling=Sampling(max_new_tokens=5), group_size=4,
                  log_samples_every=0, methods=[AdaptiveTemperatureSampling()])
    kwargs.update(overrides)
    return TextReasoningModule(**kwargs)


def test_hf_backend_samples_with_it_and_the_method_feeds_it():
    import lightning as L
    from torch.utils.data import DataLoader

    from helpers import digit_prompts

    module = tiny_module()
    method = module.methods[0]
    assert module.policy.backend.logits_processors == [method.temperature]  # handed over once, in setup
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, DataLoader(digit_prompts(4), batch_size=2, collate_fn=list))
    assert bool(method.temperature.ready)
    assert "methods.0.temperature.pivot" in module.state_dict()  # the method owns the state, not the backend
    assert not any(k.startswith("policy.backend.") for k in module.state_dict())


def test_it_needs_the_hf_backend():
    from common.rollout.vllm import VLLMBackend

    with pytest.raises(ValueError, match="HFBackend"):
        tiny_module(rollout_backend=VLLMBackend())


@pytest.mark.slow
def test_adaptive_temperature_resumes_exactly(tmp_path):
    """The statistics are checkpointed method state: a SIGKILLed and resumed hapo.yaml run samples with the same
    temperatures as an uninterrupted one (every checkpointed tensor and logged metric equal)."""
    from resume import TINY, assert_sigkill_resume_exact, cli

    run = cli("configs/text_reasoning/hapo.yaml", *TINY, "--model.init_args.group_size", "4",
              "--data.init_args.prompts_per_step", "2")
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6)
    state = ckpt["state_dict"]
    assert bool(state["methods.0.temperature.ready"]) and float(state["methods.0.temperature.scale"]) != 1.0
