"""Rollouts with transformers' ``generate``: batched, KV-cached, ``n`` samples per prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteriaList
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.rollout.base import Sampling, stop_string_lengths


def completion_mask(completion_ids: Tensor, eos_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Valid positions up to and including the first EOS, and whether an EOS was produced.

    Shapes: completion_ids (B, T), eos_ids (E,) -> mask (B, T) bool, ended (B,) bool.
    """
    is_eos = torch.isin(completion_ids, eos_ids)  # (B, T)
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, is_eos.any(1)


class BehaviourLogProbs:
    """A transformers logits processor that records log μ(x_t) of every sampled token, μ the distribution ``generate``
    actually samples from: it runs last, after the temperature, the methods' processors and top-k / top-p
    (:meth:`HFBackend.sampling_processors`), and returns the scores unchanged, so ``softmax(scores)`` is what
    ``generate`` draws from. With top-k / top-p that is the truncated, renormalised distribution (tokens outside the
    kept set have log-prob −inf and are never sampled), as vLLM's ``processed_logprobs``; it then differs from the
    trainer's full-softmax log π at T_0 by the log of the kept mass, which an importance correction
    (``RolloutCorrection``) sees as off-policy-ness. It keeps one step's log-probs (B, V) instead of every step's
    logits (B, T, V) (12.9 GB in float32 for 512 rows x 128 tokens of a 49 k vocabulary): at step t the last input
    token is step t-1's sample."""

    def __init__(self):
        self.last: Tensor | None = None  # (B, V) log-probs of the latest step
        self.steps: list[Tensor] = []  # (B, 1) per finished step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.last is not None:
            self.steps.append(self.last.gather(1, input_ids[:, -1:]))
        self.last = scores.float().log_softmax(-1)  # (B, V)
        return scores

    def result(self, completion_ids: Tensor) -> Tensor:
        """Log-probs of the T generated tokens (the last step's sample read from completion_ids (B, T)) -> (B, T)."""
        last = [] if self.last is None else [self.last.gather(1, completion_ids[:, -1:])]
        return torch.cat(self.steps + last, 1)


class SeededDraw:
    """A transformers logits processor that draws each token itself, from ``softmax(scores)`` with its own
    ``torch.Generator``, and returns scores that are 0 at the drawn token and −inf elsewhere; ``generate`` then
    runs greedily (``do_sample=False``) and takes it. The draw is the one ``generate``'s sampling makes,
    ``torch.multinomial(softmax(scores), 1)``, but never touches torch's global RNG: a generation in a background
    thread (``common.methods.overlap``) is a function of its seed alone, whatever the main thread draws meanwhile.
    On the CPU, a generator seeded ``s`` gives the tokens ``do_sample`` gives after ``torch.manual_seed(s)``."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)  # (B, V)


class HFBackend(nn.Module):
    """``model.generate`` with sampling (or greedy), left-padded prompts, per-token behaviour log-probs.

    The policy is the model being trained, so there are no weights to sync.

    Args:
        share_prefill: prefill each prompt once and expand its key/value cache to its G samples.
        logits_processors: extra transformers logits processors ``(input_ids (B, L), scores (B, V)) -> scores``
            applied when sampling (greedy decoding takes the model's argmax). They receive the scores at the
            sampling temperature T_0 (logits / T_0) and run before top-k / top-p and before the behaviour log-prob
            recorder (:meth:`sampling_processors`), so the recorded log-probs include what they do. A method that
            shapes sampling (HAPO's entropy-adaptive temperature, ``common/methods/hapo.py``) appends its processor
            here in its ``setup`` and keeps the processor's state itself (this list is no submodule).
    """

    def __init__(self, share_prefill: bool = True, logits_processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = ()):
        super().__init__()
        self._stop_criteria: dict[tuple, object] = {}  # (tokenizer id, stop strings) -> StopStringCriteria
        self.share_prefill = share_prefill
        self.logits_processors: list[Callable[[Tensor, Tensor], Tensor]] = list(logits_processors)

    def sampling_processors(self, sampling: Sampling) -> list[Callable[[Tensor, Tensor], Tensor]]:
        """The sampling warpers in the order they run: temperature T_0, the methods' ``logits_processors``, top-k,
        top-p. ``generate`` is called with its own warpers off (temperature 1, top_k 0, top_p 1), because it would
        run them after every custom processor, i.e. after the behaviour recorder."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers: list[Callable[[Tensor, Tensor], Tensor]] = []
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        warpers += self.logits_processors
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        return warpers

    @staticmethod
    def _shared_prefill(policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int):
        """Run each prompt once (all but its last token) and hand ``generate`` the key/value cache expanded to
        the ``num_samples`` rows of its group, instead of letting it prefill every copy: G times fewer prefill
        tokens. Positions follow generate()'s rule for left padding, so the cache is the one it would build."""
        from transformers import DynamicCache

        cache = DynamicCache()
        mask = prompt_mask.long()  # (P, L)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        policy(input_ids=prompt_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
               past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(num_samples)  # (P, ...) -> (P·G, ...)
        return cache

    @torch.no_grad()
    def score(self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
              completion_mask: Tensor) -> Tensor:
        """Teacher-forced log-probs (temperature 1) from one plain forward of ``policy``: the weights ``generate``
        samples from. Shapes: prompt (B, L) left-padded, completion (B, T) right-padded -> (B, T), 0 off the mask."""
        attn = torch.cat([prompt_mask, completion_mask], 1).long()  # (B, L + T)
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        logits = policy(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=attn,
                        position_ids=position_ids).logits[:, prompt_ids.shape[1] - 1 : -1].float()  # (B, T, V)
        logp = logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # (B, T)
        return logp.masked_fill(~completion_mask.bool(), 0.0)

    def stop_criterion(self, tokenizer, stops: tuple[str, ...]):
        """transformers' ``StopStringCriteria`` for ``stops``, built once per (tokenizer, stops) and reused: building
        it preprocesses the whole vocabulary (~0.9 s for SmolLM2's 49 k tokens on this CPU), and ``generate``'s own
        cache misses because the tokenizer lists its vocabulary in a different order on every call. Stateless
        between calls (it reads only the input ids), so one instance serves every ``generate``."""
        from transformers import StopStringCriteria

        key = (id(tokenizer), tuple(stops))
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(tokenizer, list(stops))
        return self._stop_criteria[key]

    def sync_weights(self, policy: nn.Module) -> None:
        return None

    @torch.no_grad()
    def generate(
        self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
        sampling: Sampling, *, greedy: bool = False, generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        """``generator``: draw the samples with it instead of torch's global RNG (:class:`SeededDraw`)."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        eos = policy.generation_config.eos_token_id if policy.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=prompt_ids.device)
        kwargs = dict(
            input_ids=prompt_ids.repeat_interleave(num_samples, 0),  # (P·G, L): row p·G + j is sample j of prompt p
            attention_mask=prompt_mask.long().repeat_interleave(num_samples, 0), max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids.tolist(),
            return_dict_in_generate=True, use_cache=True,
        )
        recorder = BehaviourLogProbs() if sampling.logprobs else None  # greedy: log-probs of the logits (T = 1)
        processors = ([] if greedy else self.sampling_processors(sampling)) + ([recorder] if recorder is not None else [])
        if generator is not None and not greedy:  # the recorder sees the distribution; SeededDraw picks the token
            processors.append(SeededDraw(generator))
        if greedy or generator is not None:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # the warpers are in `processors`, in their order
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        if sampling.stop_strings:
            kwargs.update(stopping_criteria=StoppingCriteriaList([self.stop_criterion(tokenizer, sampling.stop_strings)]))
        if processors:
            kwargs.update(logits_processor=processors)
        was_training = policy.training
        policy.eval()
        if self.share_prefill and num_samples > 1 and prompt_ids.shape[1] > 1:
            kwargs.update(past_key_values=self._shared_prefill(policy, prompt_ids, prompt_mask, num_samples))
        out = policy.generate(**kwargs)
        policy.train(was_training)

        L = prompt_ids.shape[1]
        completion_ids = out.sequences[:, L:]  # (B, T)
        mask, ended = completion_mask(completion_ids, eos_ids)  # (B, T), (B,)
        if sampling.stop_strings:
            stop_len = stop_string_lengths(tokenizer, completion_ids.cpu(), mask.cpu(), sampling.stop_strings)
            stopped = stop_len <= completion_ids.shape[1]
            pos = torch.arange(completion_ids.shape[1])
            mask = mask & (pos[None, :] < stop_len[:, None]).to(mask.device)
            ended = ended | stopped.to(ended.device)
        behaviour = None
        if recorder is not None:
            behaviour = recorder.result(completion_ids).masked_fill(~mask, 0.0)  # (B, T)
        completion_ids = completion_ids.masked_fill(~mask, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        P = prompt_ids.shape[0]
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(num_samples, 0),
            prompt_mask=prompt_mask.bool().repeat_interleave(num_samples, 0),
            completion_ids=completion_ids,
            completion_mask=mask,
            group_ids=torch.arange(P, device=prompt_ids.device).repeat_interleave(num_samples),
            behaviour_logprobs=behaviour,
            truncated=~ended,
            completions=texts,
        )
