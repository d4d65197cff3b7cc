"""ROMA on the LLaVA-style VLM (multimodal.vlm, its TinyVLM built from config with SmolLM2's real tokenizer): the
corrupted views' log-probs are teacher-forced under each view with no generation, one optimiser step through the loop."""

import pytest
import torch

from common.advantages.group import GRPO
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.rollout.base import Sampling

vlm = pytest.importorskip("multimodal.vlm.policy")
from multimodal.roma.augment import NaiveAugmentation  # noqa: E402
from multimodal.roma.method import ROMA  # noqa: E402
from multimodal.vlm.data import VQAReward, generate  # noqa: E402
from multimodal.vlm.model import PIXEL_MEAN, PIXEL_STD, TinyVLM, pixels_from_uint8  # noqa: E402


@pytest.fixture(scope="module")
def policy():  # one load for the file; the ROMA test (last) trains it
    return vlm.VLMPolicy(TinyVLM(seed=0), Sampling(max_new_tokens=4))


def score(batch):
    rewards = VQAReward()(batch.completions, batch.samples)
    return batch.replace(rewards=rewards, correct=rewards > 0.5)


def test_naive_augmentation_on_the_vlm_rolls_out_on_uint8_corrupted_images(policy):
    aug = NaiveAugmentation(prob=1.0)
    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), methods=[aug], group_size=2, provided=("correct",))
    prompts = generate(2, 0, size=16)
    batch = loop.rollout(prompts)
    assert all(s["augmentation"] is not None for s in batch.samples)
    images = torch.stack([s["image"] for s in batch.samples[::2]])  # the corrupted uint8 images it rolled out on
    assert images.dtype == torch.uint8 and not torch.equal(images, torch.stack([p["image"] for p in prompts]))
    torch.testing.assert_close(batch.inputs["pixel_values"], pixels_from_uint8(images).repeat_interleave(2, 0))


def test_roma_on_the_vlm_teacher_forces_every_view_without_generating(policy):
    calls = []
    real = policy.backend.generate
    policy.backend.generate = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    roma = ROMA(num_views=2, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(aggregation="token_mean"), methods=[roma], group_size=2,
                provided=("correct",))
    torch.manual_seed(0)
    prompts = generate(2, 0, size=16)
    batch = loop.collect(prompts).kept
    assert len(calls) == 1
    views = batch.inputs["roma_views"]  # (4, 2, 3, 16, 16) in the policy's normalisation
    assert views.shape == (4, 2, 3, 16, 16) and views.min() >= -1 - 1e-6 and views.max() <= 1 + 1e-6
    clean = pixels_from_uint8(torch.stack([p["image"] for p in prompts])).repeat_interleave(2, 0)
    torch.testing.assert_close(batch.inputs["pixel_values"], clean)
    with torch.no_grad():
        lp = roma.view_logprobs(loop, batch)  # (4, 2, T)
        for k in range(2):
            torch.testing.assert_close(lp[:, k], policy.teacher_forced(batch, views[:, k]).logprobs, rtol=1e-5, atol=1e-5)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    batch = batch.replace(correct=torch.ones(4, dtype=torch.bool))  # let the gate through
    metrics = loop.update(batch, Stepper(torch.optim.SGD(policy.trainable_parameters(), lr=1e-2), policy.trainable_parameters()))
    assert len(calls) == 1 and int(roma.step) == 1 and float(metrics["roma/gated_frac"]) == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))
