"""The shared update loop through the text-reasoning module, on tiny real models with real generation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from common.advantages.group import GRPO, grpo
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling
from helpers import DIGITS, digit_data, digit_prompts
from text_reasoning.module import TextReasoningModule


class SevensReward(RewardFunction):
    """Fraction of the completion's characters that are "7": learnable by any policy that can emit "7"."""

    name = "sevens"

    def __call__(self, completions, samples):
        return torch.tensor([c.count("7") / max(len(c), 1) for c in completions])


def make_module(**overrides) -> TextReasoningModule:
    kwargs = dict(
        policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
        rewards=[SevensReward()], verifier=SevensReward(), sampling=Sampling(max_new_tokens=6),
        group_size=8, lr=3e-3, log_samples_every=0,
    )
    kwargs.update(overrides)
    return TextReasoningModule(**kwargs)


def fit(module, prompts, steps: int, seed: int = 0):
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(prompts, batch_size=4, collate_fn=list))
    return trainer


@torch.no_grad()
def mean_reward(module, prompts, seed=123) -> float:
    torch.manual_seed(seed)
    rollouts = module.score(module.loop.rollout(prompts))
    return float(rollouts.rewards.mean())


def test_grpo_learns_a_trivially_learnable_reward():
    module = make_module()
    prompts = digit_prompts(4 * 40)
    before = mean_reward(module, prompts[:16])  # about 1/14 of characters are "7" at init
    fit(module, prompts, steps=40)
    after = mean_reward(module, prompts[:16])
    assert after > before + 0.3, f"reward did not rise: {before:.3f} -> {after:.3f}"


class GradientCapture(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of the gradient it was asked to apply (the property is about the gradient,
    not about weights after AdamW, whose normalisation amplifies float32 rounding of tiny gradients)."""

    def __init__(self, params):
        self.params_list = list(params)
        super().__init__(self.params_list, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.params_list]).clone())
        return super().step(closure)


def test_micro_batch_split_does_not_change_the_update():
    """Gradient accumulation over micro-batches normalised by the whole minibatch gives the gradient of one pass:
    equal to float32 summation-order rounding (a few ulps of the largest gradient entry per accumulated term)."""
    from common.loop import Stepper

    prompts = digit_prompts(4)
    grads = []
    for micro in (None, 3, 5):
        module = make_module(micro_batch_size=micro, loss=ClippedPolicyLoss(aggregation="token_mean"))
        torch.manual_seed(0)
        batch = module.loop.collect(prompts).kept  # the same rollouts for every split (same weights, same seed)
        opt = GradientCapture(module.policy.trainable_parameters())
        module.loop.update(batch, Stepper(opt, module.policy.trainable_parameters(), max_grad_norm=0.0))
        grads.append(opt.grads[0])
    scale = grads[0].abs().max()
    assert scale > 0
    tol = float(scale) * 8 * torch.finfo(torch.float32).eps * 32  # 32 rows accumulated, a few ulps each
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tol)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equal_a_full_forward_and_the_samplers(temperature):
    """Logits only at completion positions (chunked) == log_softmax of a plain full forward == the sampler's
    own log-probs from generate, with left-padded prompts of different lengths."""
    module = make_module(sampling=Sampling(max_new_tokens=6, temperature=temperature, logprobs=True))
    torch.manual_seed(0)
    prompts = [{"prompt": "1+2"}, {"prompt": "12345+678"}]
    batch = module.policy.rollout(prompts, 3)
    out = module.policy(batch)
    ours, entropy = out.logprobs, out.entropy  # (B, T)
    with torch.no_grad():
        attn = batch.attention_mask.long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        logits = module.policy.model(input_ids=batch.input_ids, attention_mask=attn, position_ids=pos).logits.float()
        P = batch.prompt_ids.shape[1]
        logp = (logits[:, P - 1 : -1] / temperature).log_softmax(-1)  # (B, T, V)
        naive = logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask
        naive_entropy = -(logp.exp() * logp).sum(-1) * batch.completion_mask
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.behaviour_logprobs, naive, rtol=0, atol=1e-4)


def test_rollout_layout_groups_and_masks():
    module = make_module(sampling=Sampling(max_new_tokens=5))
    torch.manual_seed(0)
    batch = module.policy.rollout(digit_prompts(3), 4)
    assert batch.batch_size == 12
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    eos = module.policy.tokenizer.eos_token_id
    for ids, mask in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)  # a prefix
        assert eos not in ids[: n - 1]  # nothing after the first EOS is valid
    assert [s["prompt"] for s in batch.samples[:4]] == [batch.samples[0]["prompt"]] * 4


def test_logged_advantage_is_the_estimator_on_the_scored_rewards():
    module = make_module(advantage=GRPO(scale="group"))
    torch.manual_seed(0)
    rollouts = module.score(module.loop.rollout(digit_prompts(4)))
    expected = torch.tensor(
        [float(c.count("7") / max(len(c), 1)) for c in rollouts.completions]
    )
    torch.testing.assert_close(rollouts.rewards, expected)
    torch.testing.assert_close(module.advantage(rollouts), grpo(expected, rollouts.group_ids))


def test_kl_penalty_uses_a_frozen_reference_and_lora_uses_the_disabled_adapter():
    from common.models import LoRA

    full = make_module(loss=ClippedPolicyLoss(beta=0.1))
    assert full.policy.reference is not None and not any(p.requires_grad for p in full.policy.reference.parameters())
    lora = make_module(loss=ClippedPolicyLoss(beta=0.1), lora=LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    assert lora.policy.reference is None
    torch.manual_seed(0)
    batch = lora.policy.rollout(digit_prompts(2), 2)
    with torch.no_grad():  # make the adapter matter, then the reference must still be the base model
        for name, p in lora.policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    ref = lora.loop.reference_logprobs(lora.score(batch)).ref_logprobs
    with lora.policy.model.disable_adapter():
        expected = lora.policy(batch).logprobs
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(ref, lora.policy(batch).logprobs.detach())


def test_shared_prompt_forward_equals_the_plain_forward_with_gradients():
    """Running each group's prompt once and expanding its KV cache gives the same log-probs and gradients."""
    shared, plain = make_module(share_prompt=True), make_module(share_prompt=False)
    torch.manual_seed(0)
    batch = shared.policy.rollout([{"prompt": "1+2"}, {"prompt": "12345+678"}], 3)
    grads = []
    for module in (shared, plain):
        out = module.policy(batch)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        grads.append((out.logprobs.detach(), torch.cat([p.grad.flatten() for p in module.policy.model.parameters()])))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


def test_a_step_that_selects_nothing_still_counts_and_changes_no_weight():
    from common.sampling.filters import DynamicSampling

    module = make_module(rewards=[SevensReward()], selector=DynamicSampling(max_groups=2), max_generation_rounds=2)
    module.reward_fns = [lambda completions, samples: torch.zeros(len(completions))]  # nothing is informative
    before = [p.detach().clone() for p in module.policy.parameters()]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=digit_data(8, 4))  # refill rounds draw the stream's next prompts
    assert trainer.global_step == 2
    assert all(torch.equal(p, q) for p, q in zip(before, module.policy.parameters()))


def test_shared_prefill_generates_exactly_what_a_per_copy_prefill_generates():
    """The HF backend prefills each prompt once and expands the cache to its G rows: same tokens (greedy and
    seeded sampling) and the same behaviour log-probs as letting generate() prefill every copy."""
    module = make_module(sampling=Sampling(max_new_tokens=6, logprobs=True))
    prompts = [{"prompt": "1+2"}, {"prompt": "12345+678"}]
    out = {}
    for share in (True, False):
        module.policy.backend.share_prefill = share
        torch.manual_seed(0)
        out[share] = (module.policy.rollout(prompts, 2, greedy=True), module.policy.rollout(prompts, 3))
    for shared, plain in zip(out[True], out[False]):
        assert torch.equal(shared.completion_ids, plain.completion_ids)
        assert torch.equal(shared.completion_mask, plain.completion_mask)
        torch.testing.assert_close(shared.behaviour_logprobs, plain.behaviour_logprobs, rtol=0, atol=1e-5)
