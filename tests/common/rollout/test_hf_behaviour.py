"""The HF backend records the behaviour log-probs of the distribution it actually samples from: after the
temperature T_0, the methods' logits processors (HAPO's adaptive temperature, arXiv 2509.16591) and top-k / top-p.
Expected values are recomputed independently from one plain forward of the tiny model over prompt + completion."""

from __future__ import annotations

import math

import pytest
import torch

from common.methods.hapo import AdaptiveTemperatureSampling
from common.models import TinyLlama
from common.rewards.length import LengthReward
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from text_reasoning.module import TextReasoningModule

TOL = 1e-4  # KV-cached decoding vs one full forward in float32: ~1e-6 apart; the effects below are > 1e-2


def module(sampling: Sampling, methods=(), sharpen: float = 1.0) -> TextReasoningModule:
    m = TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                            rewards=[LengthReward(target=3)], sampling=sampling, group_size=4, log_samples_every=0,
                            methods=list(methods))
    with torch.no_grad():  # a fresh tiny model is nearly uniform; scaled logits give it entropies of ~0.7 to ~2.3 nats
        m.policy.model.model.norm.weight.mul_(sharpen)  # the final norm scales the logits only (embeddings are tied)
    return m


@torch.no_grad()
def full_logits(m: TextReasoningModule, batch) -> torch.Tensor:
    """Next-token logits at the completion positions from one plain forward. -> (B, T, V) float32."""
    attn = batch.attention_mask.long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = m.policy.model(input_ids=batch.input_ids, attention_mask=attn, position_ids=pos).logits.float()
    P = batch.prompt_ids.shape[1]
    return logits[:, P - 1 : -1]


def at_tokens(logp: torch.Tensor, batch) -> torch.Tensor:  # (B, T, V) -> (B, T), 0 off the mask
    return logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1).masked_fill(~batch.completion_mask, 0.0)


def hapo_factor(logits: torch.Tensor, T: float, tau: float, q: float, s: float, pos: float, neg: float) -> torch.Tensor:
    """1 + τ h̃ from the entropy at temperature T, written out: z = log max(H, 1e-8), h = (z − q)/s,
    h̃ = h/pos (h > 0) or h/neg (h <= 0), clipped to [−1, 1]. (B, T, V) -> (B, T)."""
    logp = (logits / T).log_softmax(-1)
    H = -(logp.exp() * logp).sum(-1)
    h = (H.clamp(min=1e-8).log() - q) / s
    return 1 + tau * torch.where(h > 0, h / pos, h / neg).clamp(-1, 1)


def test_hapo_behaviour_logprobs_are_those_of_the_adaptive_temperature():
    T0, tau = 0.7, 0.5  # a large τ so the adaptive factor moves log-probs far beyond TOL
    m = module(Sampling(max_new_tokens=6, temperature=T0, logprobs=True), [AdaptiveTemperatureSampling(tau=tau)], sharpen=5.0)
    at = m.methods[0].temperature
    # statistics from known entropies: z = log H = -1.5, -1, ..., 1 -> q (0.8-quantile), s, the two scales
    z = torch.linspace(-1.5, 1.0, 6)
    at.observe(z.exp()[None], torch.ones(1, 6, dtype=torch.bool))
    q, s, pos, neg = (float(getattr(at, n)) for n in ("pivot", "scale", "pos_scale", "neg_scale"))
    torch.manual_seed(0)
    batch = m.policy.rollout(digit_prompts(3), 4)
    logits = full_logits(m, batch)  # (B, T, V)
    factor = hapo_factor(logits, T0, tau, q, s, pos, neg)  # (B, T)
    expected = at_tokens((logits / (T0 * factor[..., None])).log_softmax(-1), batch)
    torch.testing.assert_close(batch.behaviour_logprobs, expected, rtol=0, atol=TOL)
    # the test can fail: the factor is far from 1, and the two divergences it guards against are far off
    assert float(((factor - 1).abs() * batch.completion_mask).max()) > 0.1
    at_T0 = at_tokens((logits / T0).log_softmax(-1), batch)  # recorder before the adaptive temperature
    factor_T1 = hapo_factor(logits, 1.0, tau, q, s, pos, neg)  # entropy measured at T = 1
    entropy_at_1 = at_tokens((logits / (T0 * factor_T1[..., None])).log_softmax(-1), batch)
    for wrong in (at_T0, entropy_at_1):
        assert float((batch.behaviour_logprobs - wrong).abs().max()) > 100 * TOL


def test_top_k_one_and_a_tiny_top_p_record_log_one():
    # one token kept: the sampled distribution is one-hot, so every recorded log-prob is log 1 = 0
    for sampling in (Sampling(max_new_tokens=5, temperature=0.7, top_k=1, logprobs=True),
                     Sampling(max_new_tokens=5, temperature=1.3, top_p=1e-4, logprobs=True)):
        m = module(sampling)
        torch.manual_seed(0)
        batch = m.policy.rollout(digit_prompts(2), 3)
        assert batch.completion_mask.any()
        assert batch.behaviour_logprobs.abs().max().item() == 0.0


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.8), (5, 0.9)])
def test_top_k_top_p_record_the_truncated_renormalised_distribution(top_k: int, top_p: float):
    T0 = 0.8
    m = module(Sampling(max_new_tokens=6, temperature=T0, top_k=top_k, top_p=top_p, logprobs=True))
    torch.manual_seed(1)
    batch = m.policy.rollout(digit_prompts(3), 4)
    logits = full_logits(m, batch) / T0  # (B, T, V)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k:
        keep &= logits >= logits.topk(top_k, -1).values[..., -1:]  # the k largest
    probs = logits.masked_fill(~keep, -math.inf).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    above = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    keep &= torch.zeros_like(keep).scatter(-1, order, above < top_p)  # nucleus: until the mass reaches top_p
    expected = at_tokens(logits.masked_fill(~keep, -math.inf).log_softmax(-1), batch)
    torch.testing.assert_close(batch.behaviour_logprobs, expected, rtol=0, atol=TOL)
    full = at_tokens(logits.log_softmax(-1), batch)
    assert float((batch.behaviour_logprobs - full).max()) > 100 * TOL  # truncation raised some log-probs


def test_greedy_records_the_models_log_probs():
    m = module(Sampling(max_new_tokens=5, temperature=0.5, top_k=2, logprobs=True))
    batch = m.policy.rollout(digit_prompts(2), 1, greedy=True)
    expected = at_tokens(full_logits(m, batch).log_softmax(-1), batch)
    torch.testing.assert_close(batch.behaviour_logprobs, expected, rtol=0, atol=TOL)
