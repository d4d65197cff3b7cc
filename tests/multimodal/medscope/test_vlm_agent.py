"""The MedScope VLM agent on the tiny VLM: tool frames enter as images spliced at their placeholders (the image
changes the next action's log-probs), observation tokens give 0 log-prob, generation runs after an image
observation with <image> never sampled, and the SFT objective leaves the <result> spans out."""

from __future__ import annotations

import json

import pytest
import torch

from common.batch import RolloutBatch
from common.policies.agent import MultiTurnAgentPolicy
from common.rollout.base import Sampling
from multimodal.medscope.env import MedScopeEnv, MedScopeTasks
from multimodal.medscope.vlm_agent import MedScopeVLMPolicy, images_in, observation_tokens
from multimodal.vlm.model import TinyVLM


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return MedScopeVLMPolicy(TinyVLM(), Sampling(max_new_tokens=4, temperature=1.0))


def episode(policy, frames_text: str):
    """One hand-built episode: the first observation as the prompt, then a crop call, its image observation (env
    tokens) and an answer."""
    task = MedScopeTasks().make(1, 5)[0].as_sample()
    env = MedScopeEnv(render="image", image_size=16, image_tokens=policy.per_image)
    first = env.reset(task)
    call = '<tool_call>' + json.dumps({"name": "crop_video", "arguments": {"start_time": 10, "end_time": 30}}) + '</tool_call>'
    obs = env.step(call).observation.replace("frames 10,13,16,19,21,24,27,30", frames_text)
    tok = policy.tokenizer
    a1, o1, a2 = (tok(t, add_special_tokens=False)["input_ids"] for t in (call, obs, "<answer>red</answer>"))
    ids, mask = policy.encode([{"prompt": first}])
    comp = torch.tensor([a1 + o1 + a2])
    env_mask = torch.tensor([[False] * len(a1) + [True] * len(o1) + [False] * len(a2)])
    return RolloutBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=comp, completion_mask=torch.ones_like(env_mask),
                        env_mask=env_mask, group_ids=torch.zeros(1, dtype=torch.long)), (len(a1), len(o1), len(a2))


def test_tool_frames_are_spliced_images_and_change_the_next_action(policy):
    a, (n1, _, n2) = episode(policy, "frames 10,13,16,19,21,24,27,30")
    b, _ = episode(policy, "frames 60,61,62,63,64,65,66,67")
    text = policy.tokenizer.decode(torch.cat([a.prompt_ids, a.completion_ids], 1)[0])
    imgs, counts = images_in(text, 16)
    assert len(imgs) == 2 and counts == [policy.per_image] * 2  # the coarse view and the crop
    assert policy.pixels_for(a.input_ids).shape == (2, 3, 16, 16)
    la, lb = policy(a).logprobs, policy(b).logprobs
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la[:, :n1], lb[:, :n1], rtol=0, atol=1e-5)  # the call itself: the same context
    agent = MultiTurnAgentPolicy(policy, MedScopeEnv(render="image", image_size=16, image_tokens=policy.per_image))
    lg = agent(a).logprobs  # what the loop trains: observation tokens are context, 0 here and off a.loss_mask
    assert (lg[a.env_mask] == 0).all() and torch.equal(lg[~a.env_mask], la[~a.env_mask])
    assert not (a.loss_mask & a.env_mask).any()
    assert (la[:, -n2:] - lb[:, -n2:]).abs().max() > 1e-4  # the answer reads the other image
    ids = a.input_ids.clone()
    ids[0, (ids[0] == policy.image_token_id).nonzero()[-1]] = policy.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="row 0 holds"):
        policy.pixels_for(ids)


def test_generation_after_an_image_observation_never_samples_the_image_token(policy):
    a, (n1, n_obs, _) = episode(policy, "frames 10,13,16,19,21,24,27,30")
    ctx = a.input_ids[:, : a.prompt_ids.shape[1] + n1 + n_obs]
    out = policy.backend.generate(policy.model, policy.tokenizer, ctx, torch.ones_like(ctx, dtype=torch.bool), 4,
                                  Sampling(max_new_tokens=6, temperature=1.0))
    assert out.completion_ids.shape[0] == 4 and not (out.completion_ids == policy.image_token_id).any()


def test_sft_objective_leaves_observations_out(policy):
    tok = policy.tokenizer
    text = '<tool_call>{"a": 1}</tool_call><result>frames 1,2: <image></result><answer>red</answer>'
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    obs = observation_tokens(tok, ids)[0]
    inside = tok.decode(ids[0][obs])
    outside = tok.decode(ids[0][~obs])
    assert "frames 1,2" in inside and "result>" in inside and "</result" in inside
    assert "<tool_call>" in outside and "</tool_call>" in outside and "answer>red</answer>" in outside
    assert "frames" not in outside


def test_sft_trajectories_are_tokenised_as_the_episode_is(policy):
    """SmolLM2's BPE merges the call's closing '>' with the observation's '<' into one '><' token when a trajectory
    is tokenised as one string; an episode never holds that token (generation stops at </tool_call> and the
    observation is encoded on its own), so SFT on the joined string teaches a call that never closes. The SFT
    tokens must be the segments' own tokens, concatenated, + EOS."""
    from common.sft import encode_examples
    from multimodal.medscope.vlm_agent import MedScopeTrajectories, TrajectoryCE

    tok = policy.tokenizer
    samples = MedScopeTrajectories(image_size=16, image_tokens=policy.per_image).make(2, 0)
    call, obs, answer = samples[0]["response_segments"]
    assert call + obs + answer == samples[0]["response"] and call.endswith("</tool_call>") and obs.startswith("<")
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc(call + obs) != enc(call) + enc(obs)  # the merge this guards against
    batch = encode_examples(policy, TrajectoryCE(), samples)
    for row, s in enumerate(samples):
        expected = [t for seg in s["response_segments"] for t in enc(seg)] + [tok.eos_token_id]
        assert batch.input_ids[row][batch.target_mask[row]].tolist() == expected
