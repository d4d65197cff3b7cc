"""MaskedDiffusionPolicy: a masked-diffusion LM (LLaDA family) as a Policy of the shared loop.

Rollout: LLaDA's low-confidence remasking sampler (``sampler.py``); each row records a seed (``batch.seeds``).

Log-probs: d1's one-step mean-field estimator (Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language
Models via Reinforcement Learning", arXiv 2504.12216, §3.2; domains.md §0.5):

    log π(o | q) ≈ Σ_t log f_θ(o_t | q̃, MASK^T)

with ``q̃`` the prompt with each (non-padding) token replaced by MASK independently with probability ``p_mask`` and
the whole completion replaced by MASK: **one** forward pass, log-softmax at the completion positions, gathered at the
sampled tokens (entropy likewise). The prompt mask of inner epoch e is ``seeded_uniform(batch.seeds, e, ·) <
p_mask`` (``common.ops``): old, reference and current log-probs of one epoch see the same mask whatever the
minibatch or micro-batch split, and every epoch sees a new one (d1: the per-iteration random mask is the
regulariser that allows μ = 12). The uniforms are indexed by the distance from the end of the prompt, so a row's
mask does not depend on how far a batch is left-padded. Hence ``epoch_dependent = True``.

The MASK token is never proposed by the sampler and is removed from the estimator's softmax too (``MASK_LOGIT``).
Log-probs are at ``logprob_temperature`` (1, as d1 scores them [mem]), the sampler draws at ``temperature``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.logprobs import token_logprobs
from common.models import PolicySource
from common.ops import seeded_uniform
from common.policies.base import Policy, PolicyOutput
from diffusion.dllm.sampler import MASK_LOGIT, sample


class MaskedDiffusionPolicy(Policy):
    """A bidirectional masked-diffusion LM with its tokenizer (module docstring).

    Args:
        source: ``load() -> (BidirectionalLM, tokenizer with a mask token)`` (``diffusion.dllm.model.TinyDiffusionLM``).
        gen_length: T, completion positions.
        block_length: positions per block of the sampler.
        steps: sampler steps in all (a multiple of T / block_length).
        temperature: the sampler's Gumbel-max temperature.
        p_mask: probability of masking each prompt token in the estimator (d1: 0.15; 0 = the prompt is kept).
        logprob_temperature: temperature of the estimator's softmax.
        include_eos_padding: the completion mask covers all T positions (LLaDA pads with EOS and d1/IGPO train on
            those positions) instead of stopping at the first EOS.
        instruction: text appended to every prompt.
        logprob_chunk_size: rows per chunk of the chunked log-softmax.
    """

    provides = ("prompt_ids", "prompt_mask", "truncated", "seeds")
    epoch_dependent = True

    def __init__(self, source: PolicySource, gen_length: int = 12, block_length: int = 12, steps: int = 6,
                 temperature: float = 1.0, p_mask: float = 0.15, logprob_temperature: float = 1.0,
                 include_eos_padding: bool = False, instruction: str = "", logprob_chunk_size: int = 1024):
        super().__init__()
        problems = []
        if gen_length < 1 or block_length < 1 or gen_length % block_length:
            problems.append(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
        elif steps < 1 or steps % (gen_length // block_length):
            problems.append(f"steps ({steps}) must be a positive multiple of gen_length / block_length")
        if temperature < 0 or logprob_temperature <= 0:
            problems.append(f"temperature must be >= 0 and logprob_temperature > 0, got {temperature}, {logprob_temperature}")
        if not 0 <= p_mask < 1:
            problems.append(f"p_mask must be in [0, 1), got {p_mask}")
        if problems:
            raise ValueError("MaskedDiffusionPolicy: " + "; ".join(problems))
        self.source = source
        self.model, self.tokenizer = source.load()
        if self.tokenizer.mask_token_id is None:
            raise ValueError("MaskedDiffusionPolicy: the source's tokenizer has no mask token")
        self.model.eval()  # no dropout: the ratio must be exactly 1 on the first pass
        self.mask_id = int(self.tokenizer.mask_token_id)
        self.gen_length, self.block_length, self.steps = gen_length, block_length, steps
        self.temperature, self.p_mask, self.logprob_temperature = temperature, p_mask, logprob_temperature
        self.include_eos_padding, self.instruction = include_eos_padding, instruction
        self.logprob_chunk_size = logprob_chunk_size
        self.reference: nn.Module | None = None
        self.horizon = gen_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ rollout
    def encode(self, samples: Sequence[dict], key: str = "prompt") -> tuple[Tensor, Tensor]:
        """BOS + the chat-templated prompt (+ instruction), left-padded. Shapes: -> ids (P, L) long, mask (P, L) bool."""
        tok = self.tokenizer
        texts = [tok.bos_token + tok.apply_chat_template([{"role": "user", "content": s[key] + self.instruction}],
                                                         tokenize=False, add_generation_prompt=True) for s in samples]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def completion_layout(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The completion mask (up to and including the first EOS, or all T with ``include_eos_padding``) and
        ``truncated`` (no EOS). Shapes: tokens (B, T) -> (B, T) bool, (B,) bool."""
        eos = tokens == self.tokenizer.eos_token_id  # (B, T)
        truncated = ~eos.any(1)  # (B,)
        before = (eos.long().cumsum(1) - eos.long()) == 0  # (B, T): at or before the first EOS
        mask = torch.ones_like(eos) if self.include_eos_padding else before
        return mask, truncated

    def decode(self, tokens: Tensor) -> list[str]:
        """Text before the first EOS (B, T) -> B strings."""
        eos = tokens == self.tokenizer.eos_token_id
        keep = (eos.long().cumsum(1) == 0)  # (B, T)
        return self.tokenizer.batch_decode(tokens.masked_fill(~keep, self.tokenizer.pad_token_id), skip_special_tokens=True)

    def sample_batch(self, prompt_ids: Tensor, prompt_mask: Tensor, group_ids: Tensor, samples: list[dict], *,
                     greedy: bool = False, hint_ids: Tensor | None = None, hint_mask: Tensor | None = None) -> RolloutBatch:
        """Sample one completion per (already repeated) prompt row, with optional frozen hints (IGPO)."""
        out = sample(self.model, prompt_ids, prompt_mask, gen_length=self.gen_length, block_length=self.block_length,
                     steps=self.steps, temperature=0.0 if greedy else self.temperature, mask_id=self.mask_id,
                     hint_ids=hint_ids, hint_mask=hint_mask)
        mask, truncated = self.completion_layout(out.tokens)
        seeds = torch.randint(0, 2**62, (out.tokens.shape[0],), device=self.device)  # (B,) the estimator's masks
        return RolloutBatch(completion_ids=out.tokens, completion_mask=mask, group_ids=group_ids, prompt_ids=prompt_ids,
                            prompt_mask=prompt_mask, seeds=seeds, truncated=truncated, samples=samples,
                            completions=self.decode(out.tokens))

    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        ids, mask = self.encode(prompts)  # (P, L)
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(n)  # (B,)
        return self.sample_batch(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), group_ids,
                                 [dict(s) for s in prompts for _ in range(n)], greedy=greedy)

    # ------------------------------------------------------------------ log-probs
    def enable_reference(self) -> None:
        if self.reference is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def prompt_mask_draw(self, batch: RolloutBatch, epoch: int) -> Tensor:
        """The prompt tokens masked in inner epoch ``epoch``: Bernoulli(p_mask) from (row seed, epoch, distance from
        the prompt's end), real tokens only. Shapes: -> (B, P) bool."""
        P = batch.prompt_ids.shape[1]
        u = seeded_uniform(batch.seeds, epoch, (P,)).flip(1)  # (B, P): column j <-> distance P − 1 − j from the end
        return (u < self.p_mask) & batch.prompt_mask

    def masked_input(self, batch: RolloutBatch, epoch: int) -> tuple[Tensor, Tensor]:
        """(q̃, MASK^T) and its attention mask. Shapes: -> (B, P + T) long, (B, P + T) bool."""
        batch.require(type(self).__name__, "seeds", "prompt_ids")
        q = batch.prompt_ids.masked_fill(self.prompt_mask_draw(batch, epoch), self.mask_id)  # (B, P)
        B, T = batch.completion_ids.shape
        ids = torch.cat([q, torch.full((B, T), self.mask_id, dtype=q.dtype, device=q.device)], 1)
        attn = torch.cat([batch.prompt_mask, torch.ones(B, T, dtype=torch.bool, device=q.device)], 1)
        return ids, attn

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """d1's one-step estimate of every completion token's log-prob, and the entropies (module docstring).
        Shapes: -> (B, T), (B, T), 0 off the mask; hidden (B, T, H) if asked for."""
        if reference and self.reference is None:
            raise RuntimeError("MaskedDiffusionPolicy: reference log-probs asked for before enable_reference()")
        model = self.reference if reference else self.model
        ids, attn = self.masked_input(batch, epoch)
        T = batch.completion_ids.shape[1]
        h = model.hidden(ids, attn)[:, -T:]  # (B, T, H)
        m = batch.completion_mask  # (B, T)
        head = model.head
        bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)  # (V,)
        bias[self.mask_id] = MASK_LOGIT * self.logprob_temperature  # MASK removed, as in the sampler
        if head.bias is not None:
            bias = bias + head.bias
        lp, ent = token_logprobs(h[m], head.weight, batch.completion_ids[m], bias=bias,
                                 temperature=self.logprob_temperature, chunk_size=self.logprob_chunk_size)  # (N,), (N,)
        logprobs = torch.zeros(m.shape, device=lp.device, dtype=lp.dtype).masked_scatter(m, lp)
        entropy = torch.zeros(m.shape, device=ent.device, dtype=ent.dtype).masked_scatter(m, ent)
        return PolicyOutput(logprobs, entropy, h if hidden else None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_repr(self) -> str:
        return (f"T={self.gen_length}, block={self.block_length}, steps={self.steps}, temperature={self.temperature}, "
                f"p_mask={self.p_mask}, shift={getattr(self.model, 'shift', False)}")


__all__ = ["MaskedDiffusionPolicy"]
