"""Naive augmentation (the baseline): rollouts on recorded corrupted images, scored under the image that produced
them; scoring under the clean image is a named option with its importance weight."""

import pytest
import torch

from common.advantages.group import GRPO
from common.loop import Loop
from common.losses.ppo_clip import ClippedPolicyLoss
from multimodal.roma import corruptions as C
from multimodal.roma import toy
from multimodal.roma.augment import NaiveAugmentation


def loop_with(method, policy):
    return Loop(policy, toy.score, GRPO(), ClippedPolicyLoss(), methods=[method], group_size=2, provided=("correct",))


def test_rollout_uses_the_recorded_corrupted_image_and_keeps_it_for_the_logprobs():
    prompts = [toy.render(0, i) for i in range(6)]
    policy = toy.TinyVLMPolicy(seed=0)
    aug = NaiveAugmentation(prob=0.5, seed=3)
    batch = loop_with(aug, policy).rollout(prompts)
    assert policy.generate_calls == 1
    hits = [s["augmentation"] for s in batch.samples[::2]]
    assert any(h is None for h in hits) and any(h is not None for h in hits)  # 6 prompts at p = 0.5 (seed fixed)
    for i, (p, rec) in enumerate(zip(prompts, hits)):
        expect = p["image"] if rec is None else C.corrupt(
            p["image"][None], torch.tensor([C.NAMES.index(rec["corruption"])]), torch.tensor([rec["level"]]),
            torch.tensor([rec["key"]]))[0]
        assert torch.equal(batch.inputs["pixel_values"][2 * i], expect)
    assert int(aug.step) == 0
    aug.after_update(None, batch)
    assert int(aug.step) == 1


def test_scoring_under_the_clean_image_is_an_option_with_its_importance_weight():
    prompts = [toy.render(0, i) for i in range(3)]
    policy = toy.TinyVLMPolicy(seed=0)
    aug = NaiveAugmentation(prob=1.0, score_under="clean")
    batch = loop_with(aug, policy).rollout(prompts)
    clean = torch.stack([p["image"] for p in prompts]).repeat_interleave(2, 0)
    assert torch.equal(batch.inputs["pixel_values"], clean)
    corrupted = torch.stack([C.corrupt(p["image"][None], torch.tensor([C.NAMES.index(s["augmentation"]["corruption"])]),
                                       torch.tensor([s["augmentation"]["level"]]), torch.tensor([s["augmentation"]["key"]]))[0]
                             for p, s in zip(prompts, batch.samples[::2])]).repeat_interleave(2, 0)
    with torch.no_grad():
        lp_c = policy(batch).logprobs
        lp_r = policy(batch.replace(inputs={"pixel_values": corrupted})).logprobs
    torch.testing.assert_close(batch.inputs["aug_log_iw"], (lp_c - lp_r).sum(1), rtol=1e-5, atol=1e-5)
    metrics = aug.after_update(None, batch)
    assert 0 < float(metrics["aug/ess"]) <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="prob must be in"):
        NaiveAugmentation(prob=1.5)
    with pytest.raises(ValueError, match="score_under"):
        NaiveAugmentation(score_under="both")
    with pytest.raises(ValueError, match="prompt_image_key"):
        NaiveAugmentation(prompt_image_key="img").rollout(None, [{"image": torch.zeros(3, 4, 4)}], 2)
