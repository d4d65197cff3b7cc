"""The MedScope VLM agent: the VLM of ``multimodal/vlm`` (SmolLM2 + SigLIP tower + projector) acting in the tool
environment, with the frames the tools return *as images in its context* — by composition, no change to the agent or
the VLM policy.

``MultiTurnAgentPolicy`` (common/policies/agent.py) runs the episodes over ``lm.backend.generate(lm.model, ...)`` and
``lm(batch)``; :class:`MedScopeVLMPolicy` (a ``VLMPolicy``, named as the module's ``policy_kind``) makes both see
images anywhere in the sequence. The environment (``MedScopeEnv(render="image")``) writes each image as a marker
followed by its placeholder tokens:

    first observation   "... Video 123456. Coarse view: <image>\\n ..."          (widened by ``encode``, as VLMPolicy)
    tool observation    "<result>frames 40,42,44,...: <image><image>...</result>"  (image_tokens placeholders)

so an image is a pure function of the tokens before it (the video seed and the frame list): the policy re-renders
every sheet from the decoded context (:func:`images_in`, bounded regex on the decoded text) — at generation, in the
backend's model wrapper (:class:`FramesBound`), and in the update's forward (:meth:`completion_hidden`) — and splices
the projected features at the placeholder tokens, in order. Nothing is stored beside the tokens, so what is trained
on is exactly what was sampled from. The ``<image>`` token is suppressed in sampled actions (it is the environment's
to write); ``check`` errors name the row whose placeholders do not match its images.

Observation tokens are the agent's ``env_mask``: out of the loss (``RolloutBatch.loss_mask``) and 0 in the log-probs.
"""

from __future__ import annotations

import functools
import json
import random
import re
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.logprobs import token_logprobs
from common.rollout.hf import HFBackend
from common.sft import SFTObjective, SFTSource
from multimodal.medscope import video as V
from multimodal.medscope.env import MedScopeEnv, MedScopeTasks
from multimodal.vlm.model import IMAGE_TOKEN, pixels_from_uint8
from multimodal.vlm.policy import VLMPolicy, llava_of

_VIDEO = re.compile(r"Video (\d{1,10})\.")
_MARK = re.compile(r"(Coarse view: |frames ([0-9,]{1,160}): )((?:" + re.escape(IMAGE_TOKEN) + r")+)")
MAX_DECODED_CHARS = 200_000


@functools.lru_cache(maxsize=4096)
def _features(seed: int) -> Tensor:
    return V.make_video(seed)["features"]


def images_in(text: str, image_size: int) -> tuple[list[Tensor], list[int]]:
    """The images a decoded context holds, in order: (uint8 (3, S, S) sheets, placeholder count of each). The coarse
    view renders the coarse frames without colour; ``frames a,b,...`` renders those frames at full resolution."""
    text = text[:MAX_DECODED_CHARS]
    m = _VIDEO.search(text)
    if m is None:
        return [], []
    feats = _features(int(m.group(1)))
    coarse = V.coarse_view(feats[None])[0]
    out, counts = [], []
    for mark in _MARK.finditer(text):  # ok: a few images per context
        count = mark.group(3).count(IMAGE_TOKEN)
        if mark.group(2) is None:
            out.append(V.render_sheet(coarse, list(range(V.COARSE_FRAMES)), image_size))
        else:
            frames = [min(max(int(x), 0), V.NUM_FRAMES - 1) for x in mark.group(2).split(",") if x.isdigit()][:16]
            out.append(V.render_sheet(feats, frames, image_size))
        counts.append(count)
    return out, counts


class FramesBound(nn.Module):
    """``model`` with the images of each row's context bound at call time (recomputed from the token ids), for the
    generation backend; the ``<image>`` token is suppressed in what is sampled."""

    def __init__(self, model: nn.Module, policy: "MedScopeVLMPolicy"):
        super().__init__()
        self.model, self.policy = model, policy
        self.generation_config = model.generation_config

    def forward(self, input_ids: Tensor, **kwargs: Any):
        if kwargs.get("past_key_values") is None or (input_ids == self.policy.image_token_id).any():
            kwargs["pixel_values"] = self.policy.pixels_for(input_ids)
        return self.model(input_ids=input_ids, **kwargs)

    def generate(self, input_ids: Tensor, **kwargs: Any):
        if kwargs.get("past_key_values") is None:
            kwargs["pixel_values"] = self.policy.pixels_for(input_ids)
        kwargs.setdefault("suppress_tokens", [self.policy.image_token_id])
        return self.model.generate(input_ids=input_ids, **kwargs)


class FramesBackend(HFBackend):
    """HF generation with the model wrapped in :class:`FramesBound` (the images re-rendered from the contexts). The
    policy is held by a weak reference (the backend is the policy's submodule)."""

    def bind(self, policy: "MedScopeVLMPolicy") -> "FramesBackend":
        self._policy = weakref.ref(policy)
        return self

    def generate(self, policy, tokenizer, prompt_ids, prompt_mask, num_samples, sampling, *, greedy: bool = False,
                 generator: torch.Generator | None = None):
        return super().generate(FramesBound(policy, self._policy()), tokenizer, prompt_ids, prompt_mask, num_samples,
                                sampling, greedy=greedy, generator=generator)


class MedScopeVLMPolicy(VLMPolicy):
    """VLMPolicy whose images are the MedScope sheets named in its context (module docstring); arguments as
    ``VLMPolicy``. Prompts (the first observation) hold one ``<image>``, widened by ``encode``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        inner = self.backend
        self.backend = FramesBackend(inner.share_prefill, getattr(inner, "logits_processors", ())).bind(self)

    def images_of(self, samples):  # the coarse view is rendered from the prompt text, not read from the sample
        raise ValueError("MedScopeVLMPolicy acts through the MedScope environment (model.init_args.environment: "
                         "multimodal.medscope.env.MedScopeEnv with render: image); single-turn rollouts are not supported")

    def pixels_for(self, ids: Tensor) -> Tensor | None:
        """Pixel values of every image in the rows of ``ids`` (R, L), rows in order, images in order within a row
        -> (N_images, 3, S, S) float, or None without images. Each image must have ``per_image`` placeholders."""
        rows = self.tokenizer.batch_decode(ids.masked_fill(ids < 0, self.tokenizer.pad_token_id), skip_special_tokens=False)
        images, total = [], 0
        for r, text in enumerate(rows):  # ok: host-side, a few images per row
            imgs, counts = images_in(text, self.image_size)
            bad = [c for c in counts if c != self.per_image]
            placeholders = int((ids[r] == self.image_token_id).sum())
            if bad or placeholders != self.per_image * len(imgs):
                raise ValueError(f"image placeholder tokens != image features: row {r} holds {placeholders} "
                                 f"{IMAGE_TOKEN} tokens for {len(imgs)} images of {self.per_image} features each "
                                 f"(marker counts {counts}); the environment's image_tokens must be {self.per_image}")
            images += imgs
            total += len(imgs)
        if not images:
            return None
        return pixels_from_uint8(torch.stack(images)).to(self.device)  # (N, 3, S, S)

    def completion_hidden(self, model: nn.Module, batch: RolloutBatch) -> Tensor:
        """Hidden states that predict the completion tokens, with every image of each row (prompt and observations)
        spliced at its placeholders. Shapes: -> (B, T, H)."""
        ids = batch.input_ids  # (B, P + T)
        llava = llava_of(model).model
        embeds = llava.get_input_embeddings()(ids)  # (B, L, H)
        pixels = self.pixels_for(ids)
        if pixels is not None:
            feats = llava.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            feats = torch.cat(list(feats), 0).to(embeds.dtype)  # (N·per_image, H), row-major as the placeholders
            embeds = embeds.masked_scatter((ids == self.image_token_id).unsqueeze(-1), feats)
        attn = batch.attention_mask.long()
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        hidden = llava.language_model(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids).last_hidden_state
        P = batch.prompt_ids.shape[1]
        return hidden[:, P - 1: -1]

    def sampler_logprobs(self, batch: RolloutBatch) -> Tensor:
        return self(batch).logprobs


# ---------------------------------------------------------------------- SFT warm start on tool-use trajectories
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"


class MedScopeTrajectories(SFTSource):
    """Generated expert tool-use trajectories ``{prompt, response}`` for the VLM agent's SFT warm start: the prompt is
    the environment's first observation (``render="image"``), the response ``crop_video`` of a *jittered* evidence
    window (each end moved out by 0..``jitter`` s, the window shifted by up to ±``shift`` s: mean tIoU ≈ 0.4, so
    grounding has room to improve under RL), the environment's real observation of that window, and the answer.

    Args:
        jitter, shift: the window jitter (seconds).
        image_size, image_tokens: as the environment of the RL recipe (the VLM's tower).
        max_tool_calls: as the environment.
    """

    def __init__(self, jitter: int = 6, shift: int = 3, image_size: int = 32, image_tokens: int = 16,
                 max_tool_calls: int = 3):
        if jitter < 0 or shift < 0:
            raise ValueError(f"jitter and shift must be >= 0 seconds, got {jitter}, {shift}")
        self.jitter, self.shift = jitter, shift
        self.env = MedScopeEnv(max_tool_calls, render="image", image_size=image_size, image_tokens=image_tokens)

    def make(self, n: int | None, seed: int) -> list[dict]:
        rng, out = random.Random(seed + 7), []
        for p in MedScopeTasks().make(n or 1024, seed):  # ok: host-side data generation
            task = p.as_sample()
            first = self.env.reset(task)
            d = rng.randint(-self.shift, self.shift)
            s = max(0, task["evidence_start"] - rng.randint(0, self.jitter) + d)
            e = min(V.NUM_FRAMES - 1, max(s, task["evidence_end"] + rng.randint(0, self.jitter) + d))
            call = ("<tool_call>" + json.dumps({"name": "crop_video", "arguments": {"start_time": s, "end_time": e}})
                    + "</tool_call>")
            obs = self.env.step(call).observation
            answer = f"<answer>{task['answer']}</answer>"
            # tokenised segment by segment (common.sft.encode_examples), as the episode is: generation stops at
            # </tool_call> and the observation is encoded on its own; one string would merge "><" across the boundary
            out.append({"prompt": first, "response": call + obs + answer, "response_segments": [call, obs, answer],
                        "answer": task["answer"], "evidence_start": task["evidence_start"],
                        "evidence_end": task["evidence_end"]})
        return out


def observation_tokens(tokenizer, ids: Tensor) -> Tensor:
    """Tokens inside ``<result>...</result>`` spans (the environment's text) of each row, found on the tokens' own
    strings (byte-level BPE keeps ASCII as is); a token that straddles a span's boundary (BPE merges ``><``) holds
    the agent's own character and stays out of the mask. ids (R, L) -> (R, L) bool. Host-side, bounded by L."""
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):  # ok: host-side, once per SFT micro-batch
        pieces = tokenizer.convert_ids_to_tokens(row)
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece or "")
            ends.append(pos)
        text = "".join(p or "" for p in pieces)
        at = 0
        while True:
            a = text.find(RESULT_OPEN, at)
            if a < 0:
                break
            b = text.find(RESULT_CLOSE, a)
            b = len(text) if b < 0 else b + len(RESULT_CLOSE)
            starts = torch.tensor([0] + ends[:-1])
            out[r] |= (starts >= a) & (torch.tensor(ends) <= b)  # a token straddling a boundary stays the agent's
            at = b
    return out.to(ids.device)


class TrajectoryCE(SFTObjective):
    """Next-token cross-entropy on a trajectory's *own* tokens: the response minus the environment's observations
    (``<result>`` spans) and image placeholders, with every image spliced in (``MedScopeVLMPolicy.pixels_for``).
    total = Σ_{action tokens} −log p(x_i | x_<i); the module's normaliser counts all response tokens (a constant
    factor per step). Packing is not supported (one trajectory per row)."""

    def forward(self, policy: Any, batch, generator=None) -> tuple[Tensor, Tensor]:
        if batch.packed:
            raise ValueError("TrajectoryCE: pack_length must be null (one trajectory per row)")
        if not isinstance(policy, MedScopeVLMPolicy):
            raise ValueError(f"TrajectoryCE needs a MedScopeVLMPolicy, got {type(policy).__name__}")
        ids, attn = batch.input_ids, batch.attention_mask.long()  # (R, L)
        llava = llava_of(policy.model).model
        embeds = llava.get_input_embeddings()(ids)
        pixels = policy.pixels_for(ids)
        if pixels is not None:
            feats = torch.cat(list(llava.get_image_features(pixel_values=pixels, return_dict=True).pooler_output), 0)
            embeds = embeds.masked_scatter((ids == policy.image_token_id).unsqueeze(-1), feats.to(embeds.dtype))
        h = llava.language_model(inputs_embeds=embeds, attention_mask=attn, position_ids=batch.position_ids).last_hidden_state
        own = ~observation_tokens(policy.tokenizer, ids) & (ids != policy.image_token_id)  # (R, L)
        m = batch.target_mask[:, 1:] & own[:, 1:]  # position i-1 predicts token i
        head = policy.model.get_output_embeddings()
        lp, _ = token_logprobs(h[:, :-1][m], head.weight, ids[:, 1:][m], bias=head.bias)
        return -lp.sum(), m.sum()


__all__ = ["MedScopeVLMPolicy", "FramesBound", "images_in", "MedScopeTrajectories", "TrajectoryCE", "observation_tokens"]
