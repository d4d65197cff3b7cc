"""VLMPolicy: image placeholders == features (one-line error), log-probs under the loop equal a plain Llava
forward under the rollout's own image, generation sees the image, one optimiser step through the real loop, LoRA."""

from __future__ import annotations

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import LoRA
from common.rollout.base import Sampling
from common.rollout.hf import HFBackend
from multimodal.vlm.data import VQAReward, generate
from multimodal.vlm.model import IMAGE_TOKEN, TinyVLM, check_image_tokens, expand_image_tokens
from multimodal.vlm.policy import VLMPolicy


@pytest.fixture(scope="module")
def policy():
    return VLMPolicy(TinyVLM(seed=0), Sampling(max_new_tokens=5, logprobs=True))


def samples(n=3, seed=0):
    return generate(n, seed, size=16)


def plain_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """Reference: transformers' own Llava forward over prompt + completion with the row's pixels. -> (B, T)."""
    attn = batch.attention_mask.long()
    logits = model(input_ids=batch.input_ids, pixel_values=batch.inputs["pixel_values"], attention_mask=attn,
                   position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits  # (B, P + T, V)
    P = batch.prompt_ids.shape[1]
    lp = logits[:, P - 1 : -1].float().log_softmax(-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    return lp.masked_fill(~batch.completion_mask, 0.0)


def test_placeholder_count_check_is_one_line(policy):
    ids = torch.tensor([[5, 7, 7, 7, 9], [7, 7, 7, 7, 1]])
    pix = torch.zeros(2, 3, 16, 16)
    check_image_tokens(torch.tensor([[7, 7, 7, 7, 1]]), pix[:1], 7, 4)  # 4 == 4: passes
    with pytest.raises(ValueError, match=r"row 0 has 3 <image> tokens but its image gives 4 features") as err:
        check_image_tokens(ids, pix, 7, 4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        expand_image_tokens(["no image here"], 4)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        expand_image_tokens([IMAGE_TOKEN * 2], 4)
    # through the policy: a batch whose prompt lost a placeholder is refused before the forward, in one line
    torch.manual_seed(0)
    batch = policy.rollout(samples(2), 2)
    ids = batch.prompt_ids.clone()
    ids[0, (ids[0] == policy.image_token_id).nonzero()[0, 0]] = 42
    with pytest.raises(ValueError, match=r"image placeholder tokens != image features: row 0 has 3") as err:
        policy(batch.replace(prompt_ids=ids))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pixel_values"):
        policy(batch.replace(inputs={}))
    with pytest.raises(ValueError, match=r"sample 0: 'image' must be a uint8 tensor \(3, 16, 16\)"):
        policy.rollout([{"prompt": f"{IMAGE_TOKEN}\nq", "image": torch.zeros(3, 8, 8, dtype=torch.uint8)}], 1)


def test_logprobs_equal_plain_forward_under_the_rollouts_image(policy):
    torch.manual_seed(1)
    batch = policy.rollout(samples(3), 4)  # (12, T), groups of 4 share prompt and image
    assert batch.inputs["pixel_values"].shape == (12, 3, 16, 16)
    assert (batch.prompt_ids == policy.image_token_id).sum(1).eq(policy.per_image).all()
    with torch.no_grad():
        ref = plain_logprobs(policy.model, batch)
        shared = policy(batch).logprobs
        policy.share_prompt = False
        plain = policy(batch).logprobs
        policy.share_prompt = True
    # float32, one ~100-term reduction chain per logit: ~1e-6 relative
    torch.testing.assert_close(shared, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(batch.behaviour_logprobs, ref, atol=2e-5, rtol=0)  # what generate sampled from
    # the image matters: the same tokens under other pixels have other log-probs (teacher forcing, no generation)
    other = policy.teacher_forced(batch, batch.inputs["pixel_values"].flip(0))
    assert (other.logprobs - shared).abs().max() > 1e-3
    torch.testing.assert_close(other.logprobs, plain_logprobs(policy.model, batch.replace(
        inputs={"pixel_values": batch.inputs["pixel_values"].flip(0)})), atol=2e-5, rtol=0)


def test_generation_sees_the_image_with_and_without_shared_prefill(policy):
    s = samples(2)
    backend = policy.backend
    try:
        policy.backend = HFBackend(share_prefill=True)
        a = policy.rollout(s, 3, greedy=True)
        policy.backend = HFBackend(share_prefill=False)
        b = policy.rollout(s, 3, greedy=True)
    finally:
        policy.backend = backend
    assert torch.equal(a.completion_ids, b.completion_ids)
    # greedy tokens are the argmax of the plain forward under the image
    attn = a.attention_mask.long()
    with torch.no_grad():
        logits = policy.model(input_ids=a.input_ids, pixel_values=a.inputs["pixel_values"], attention_mask=attn,
                              position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    P = a.prompt_ids.shape[1]
    argmax = logits[:, P - 1 : -1].argmax(-1)
    assert torch.equal(argmax[a.completion_mask], a.completion_ids[a.completion_mask])
    # and a greedy answer depends on the image: other pixels give other logits at the first answer token
    with torch.no_grad():
        other = policy.model(input_ids=a.input_ids, pixel_values=a.inputs["pixel_values"].flip(0), attention_mask=attn,
                             position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    assert (other[:, P - 1] - logits[:, P - 1]).abs().max() > 1e-3


def test_one_optimiser_step_through_the_loop_trains_the_vision_tower():
    policy = VLMPolicy(TinyVLM(seed=0), Sampling(max_new_tokens=4, logprobs=True))
    reward = VQAReward()

    def score(b: RolloutBatch) -> RolloutBatch:
        r = reward(b.completions, b.samples) + 0.01 * torch.arange(b.batch_size)  # distinct: nonzero advantages
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("vqa",))

    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), group_size=4)
    torch.manual_seed(0)
    batch = loop.collect(samples(2)).kept
    with torch.no_grad():  # the loop's log-probs (micro-batched as in the update) against a plain forward
        torch.testing.assert_close(loop.old_logprobs(batch), plain_logprobs(policy.model, batch), atol=2e-5, rtol=0)
    vision = policy.model.model.vision_tower.embeddings.patch_embedding.weight
    before = [p.detach().clone() for p in (vision, policy.model.lm_head.weight)]
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    metrics = loop.update(batch, Stepper(opt, policy.trainable_parameters(), max_grad_norm=0))
    assert metrics and all(bool(torch.isfinite(v).all()) for v in metrics.values())
    assert not torch.equal(before[0], vision) and not torch.equal(before[1], policy.model.lm_head.weight)


def test_lora_on_the_language_model_only():
    policy = VLMPolicy(TinyVLM(seed=0), Sampling(max_new_tokens=4), lora=LoRA(rank=4, alpha=8.0))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    assert not any("vision_tower" in n for n, _ in policy.model.named_modules() if "lora_" in n)
    torch.manual_seed(0)
    batch = policy.rollout(samples(2), 2)
    with torch.no_grad():
        for p in policy.trainable_parameters():  # move the adapter off zero so it changes the output
            p.add_(0.05 * torch.randn_like(p))
        cur = policy(batch).logprobs
        ref = policy(batch, reference=True).logprobs
        base = policy.model.get_base_model()
        torch.testing.assert_close(cur, plain_logprobs(base, batch), atol=2e-5, rtol=0)
        with policy.model.disable_adapter():
            torch.testing.assert_close(ref, plain_logprobs(base, batch), atol=2e-5, rtol=0)
    assert (cur - ref).abs().max() > 1e-4


def test_a_vllm_backend_is_refused_in_one_line():
    class NotHF:  # any non-HF backend (vLLM's would be common.rollout.vllm.VLLMBackend)
        pass

    with pytest.raises(ValueError, match=r"^rollout_backend: vLLM rollouts of this LLaVA model are not supported: .*torchvision.*got NotHF$"):
        VLMPolicy(TinyVLM(), backend=NotHF())


def test_the_stale_sampler_canary_probes_a_vlm_without_switching_itself_off():
    """The canary's probe keeps a VLM prompt whole (cutting it would drop image placeholders, and the placeholder
    check would refuse the probe): two steps of the real loop, the probe scored at both, no CanaryWarning."""
    import warnings

    from common.methods.canaries import Canaries, CanaryWarning

    policy = VLMPolicy(TinyVLM(seed=0), Sampling(max_new_tokens=4, logprobs=True))
    reward = VQAReward()

    def score(b: RolloutBatch) -> RolloutBatch:
        r = reward(b.completions, b.samples) + 0.01 * torch.arange(b.batch_size)  # distinct: nonzero advantages
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("vqa",))

    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), methods=[Canaries(sync_check_every=1, probe_tokens=2)],
                group_size=4)
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=0.1), params, max_grad_norm=0)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = [loop.update(loop.collect(samples(2, seed=s)).kept, stepper) for s in range(2)]
    assert not [w for w in caught if issubclass(w.category, CanaryWarning)], [str(w.message) for w in caught]
    assert all("canary/policy_logprob_change" in m for m in metrics)
    assert float(metrics[0]["canary/policy_logprob_change"]) > 0  # the probe was scored before and after the step
