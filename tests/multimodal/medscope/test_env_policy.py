"""The tool environment's cap (refused by observation, no crash), frames in the context, and the frame-feature
policy: observation slots are context, never in the loss (a gradient check against a plain reference)."""

from __future__ import annotations

import json

import torch

from common.advantages.group import GRPO
from common.loop import Loop
from common.losses.aggregate import Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss
from multimodal.medscope import toy
from multimodal.medscope import video as V
from multimodal.medscope.env import MedScopeEnv, MedScopeTasks


def crop(s, e):
    return "<tool_call>" + json.dumps({"name": "crop_video", "arguments": {"start_time": s, "end_time": e}}) + "</tool_call>"


def test_calls_beyond_the_cap_are_refused_with_an_observation():
    task = MedScopeTasks().make(1, 3)[0].as_sample()
    env = MedScopeEnv(max_tool_calls=2)
    first = env.reset(task)
    assert "colour=" not in first and first.count("t=") == V.COARSE_FRAMES  # coarse view: phase only
    s, e = task["evidence_start"], task["evidence_end"]
    one = env.step(crop(s, e))
    assert not one.done and one.valid and one.observation.count("t=") == V.CROP_FRAMES
    assert f"colour={task['answer']}" in one.observation  # full resolution inside the window shows the answer
    two = env.step('<tool_call>{"name": "get_frame", "time": 3}</tool_call>')
    assert two.observation.count("t=") == 3 and env.frames_read == V.CROP_FRAMES + 3
    three = env.step(crop(0, 127))
    assert "refused" in three.observation and not three.done and three.valid and env.frames_read == 11
    assert env.windows == [(float(s), float(e)), (3.0, 3.0)]
    bad = env.step('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')
    assert not bad.valid and not bad.done and "unknown tool" in bad.observation
    assert env.step("<answer>red</answer>").done
    img = MedScopeEnv(render="image", image_size=16)
    img.reset(task)
    img.step(crop(s, e))
    assert len(img.images) == 2 and img.images[1].shape == (3, 16, 16) and img.images[1].dtype == torch.uint8


def test_the_toy_policy_refuses_a_fourth_call_and_records_frames():
    policy = toy.FramePolicy(d=32, layers=1, max_calls=2, seed=0)
    samples = toy.tasks(2, 0)
    forced = torch.full((2, 3, 3), toy.PAD)
    forced[:, 0] = torch.tensor([toy.CROP, toy.BIN0 + 10, toy.BIN0 + 12])
    forced[:, 1] = torch.tensor([toy.FRAME, toy.BIN0 + 5, toy.PAD])
    forced[:, 2] = torch.tensor([toy.CROP, toy.BIN0 + 1, toy.BIN0 + 2])  # the third call: beyond max_calls = 2
    b = policy.run(samples, 1, forced=forced)
    rec = b.samples[0]["episode"]
    assert rec["tool_calls"] == 3 and rec["windows"] == [(40.0, 51.0), (22.0, 22.0)] and rec["frames_read"] == 11
    assert rec["prediction"] is None and not rec["format"]
    assert (b.completion_ids[:, 2 * toy.SLOTS + 3] == toy.REFUSED).all()


def test_observation_slots_are_out_of_the_loss_gradient_check():
    torch.manual_seed(0)
    policy = toy.FramePolicy(d=32, layers=1, seed=0)
    loop = Loop(policy, toy.score(toy.FULL), GRPO(), ClippedPolicyLoss(aggregation="token_mean"), group_size=2,
                provided=("correct",))
    samples = toy.tasks(2, 1)
    forced = torch.full((4, 4, 3), toy.PAD)  # per prompt: a crop then an answer, and a get_frame then an answer
    for i, s in enumerate(samples):  # the crop covers the evidence and answers right; the get_frame misses, answers wrong
        a, b = s["evidence_start"] // 4, s["evidence_end"] // 4
        colour = V.COLOURS.index(s["answer"])
        forced[2 * i, 0] = torch.tensor([toy.CROP, toy.BIN0 + a, toy.BIN0 + b])
        forced[2 * i, 1] = torch.tensor([toy.ANS, toy.COL0 + colour, toy.PAD])
        forced[2 * i + 1, 0] = torch.tensor([toy.FRAME, toy.BIN0 + (a + 16) % 32, toy.PAD])
        forced[2 * i + 1, 1] = torch.tensor([toy.ANS, toy.COL0 + (colour + 1) % 6, toy.PAD])
    batch = policy.run(samples, 2, forced=forced)
    batch = loop.score(batch)
    batch = batch.replace(advantages=loop.advantage(batch))
    assert (batch.advantages != 0).any()
    assert batch.env_mask.any() and not (batch.loss_mask & batch.env_mask).any()
    out = policy(batch)
    assert (out.logprobs[batch.env_mask] == 0).all() and (out.entropy[batch.env_mask] == 0).all()
    norm = Normaliser.of(batch.loss_mask, policy.horizon)
    loss = loop.micro_loss(batch, norm, 0)[0].loss
    grads = torch.autograd.grad(loss, policy.trainable_parameters())
    # plain reference: −Σ A·log π over the action slots only, / their count (ratio 1 at the first step)
    lsm = policy.log_softmax(batch)  # (B, T, V)
    lp = lsm.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    act = batch.completion_mask & ~batch.env_mask
    ref = -(batch.advantages[:, None] * torch.where(act, lp, torch.zeros_like(lp))).sum() / act.sum()
    ref_grads = torch.autograd.grad(ref, policy.trainable_parameters())
    for g, h in zip(grads, ref_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    # what stands in the observation slots as a token id never changes the loss (frames enter as features)
    swapped = batch.replace(completion_ids=torch.where(batch.env_mask, torch.full_like(batch.completion_ids, toy.BIN0),
                                                       batch.completion_ids))
    torch.testing.assert_close(loop.micro_loss(swapped, norm, 0)[0].loss, loss.detach(), rtol=0, atol=0)
