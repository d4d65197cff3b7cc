"""LLaDA's "low-confidence remasking" sampler for a masked-diffusion LM, with frozen hint positions (inpainting).

LLaDA (Nie et al. 2025, arXiv 2502.09992, Alg. 5 / ``generate.py``); IGPO's inpainting variant (Zhao et al. 2025,
arXiv 2509.10396, §3: z^hint, hint positions fixed). domains.md §0.5:

- the completion (T positions) starts all-MASK, except hint positions, which hold their hint token from the start
  and are never candidates;
- it is split into T / block_length blocks, decoded left to right; ``steps`` are split equally over the blocks;
- at each step the model predicts every position; at each still-masked position a token is proposed by Gumbel-max
  at temperature τ in float64, ``argmax_v (logit_v − τ·log(−log u_v))`` (= a draw from softmax(logit / τ); τ = 0 is
  argmax); its confidence is the softmax probability (temperature 1) of the proposed token;
- among the still-masked positions *of the current block*, the ``n_s`` most confident are committed, where the
  step counts split the block's masked count as evenly as possible, earlier steps taking the remainder
  (``get_num_transfer_tokens``);
- committed tokens are never re-masked. The MASK token itself is never proposed (its logit is removed), so a
  committed position never holds MASK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


MASK_LOGIT = -1e9  # the MASK token's logit offset: probability exactly 0 in float32/64, softmax and entropy finite


def without_mask_token(logits: Tensor, mask_id: int) -> Tensor:
    """Logits with the MASK token removed (``MASK_LOGIT`` added to it). Shapes: (..., V) -> (..., V)."""
    return logits.index_add(-1, torch.tensor([mask_id], device=logits.device),
                            torch.full((*logits.shape[:-1], 1), MASK_LOGIT, dtype=logits.dtype, device=logits.device))


def num_transfer_tokens(masked: Tensor, steps: int) -> Tensor:
    """Tokens to commit at each of ``steps`` steps: the masked count split evenly, earlier steps taking the
    remainder. Shapes: masked (B, L) bool -> (B, steps) long."""
    count = masked.sum(1, keepdim=True)  # (B, 1)
    base, rem = count // steps, count % steps  # (B, 1)
    return base + (torch.arange(steps, device=masked.device)[None, :] < rem).long()  # (B, steps)


def propose(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gumbel-max proposals and their confidences, in float64. Shapes: (B, L, V) -> tokens (B, L) long,
    confidence (B, L) float64 (softmax probability of the proposed token at temperature 1)."""
    logits = logits.double()
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)  # (B, L, V)
        tokens = (logits - temperature * torch.log(-torch.log(u))).argmax(-1)  # (B, L)
    else:
        tokens = logits.argmax(-1)
    confidence = logits.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, L)
    return tokens, confidence


def most_confident(confidence: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """The ``k[b]`` most confident candidate positions of each row (ties: the leftmost first).
    Shapes: confidence (B, L), candidates (B, L) bool, k (B,) long -> (B, L) bool."""
    conf = confidence.masked_fill(~candidates, float("-inf"))  # (B, L)
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return (rank < k[:, None]) & candidates


@dataclass
class Sample:
    tokens: Tensor  # (B, T) long: the completion, no MASK left
    step: Tensor  # (B, T) long: the global step at which each position was committed (−1: a hint)
    hint_mask: Tensor  # (B, T) bool: positions fixed by a hint


@torch.no_grad()
def sample(model: Callable[[Tensor, Tensor], Tensor], prompt_ids: Tensor, prompt_mask: Tensor, *, gen_length: int,
           block_length: int, steps: int, temperature: float, mask_id: int, hint_ids: Tensor | None = None,
           hint_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Sample:
    """Sample completions of ``gen_length`` tokens (module docstring).

    Args:
        model: ``(ids (B, L), attention_mask (B, L) bool) -> logits (B, L, V)``, bidirectional.
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        gen_length: T; a multiple of ``block_length``.
        block_length: positions per block.
        steps: denoising steps in all; a multiple of the number of blocks.
        temperature: τ of the Gumbel-max proposals (0 = greedy).
        mask_id: the MASK token.
        hint_ids, hint_mask: (B, T) tokens fixed at the ``hint_mask`` positions (IGPO's inpainting); None = none.
        generator: the proposals' random numbers (default the global generator).
    """
    if gen_length < 1 or block_length < 1 or gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
    blocks = gen_length // block_length
    if steps < blocks or steps % blocks:
        raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({blocks})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, P = prompt_ids.shape
    device = prompt_ids.device
    if (hint_ids is None) != (hint_mask is None):
        raise ValueError("hint_ids and hint_mask must be given together")
    if hint_mask is None:
        hint_ids = torch.zeros(B, gen_length, dtype=torch.long, device=device)
        hint_mask = torch.zeros(B, gen_length, dtype=torch.bool, device=device)
    if hint_mask.shape != (B, gen_length) or hint_ids.shape != (B, gen_length):
        raise ValueError(f"hint_ids and hint_mask must have shape {(B, gen_length)}, got "
                         f"{tuple(hint_ids.shape)} and {tuple(hint_mask.shape)}")
    hint_mask = hint_mask.bool()
    x = torch.cat([prompt_ids, torch.where(hint_mask, hint_ids, torch.full_like(hint_ids, mask_id))], 1)  # (B, P + T)
    attn = torch.cat([prompt_mask.bool(), torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1)  # (B, P + T)
    step_of = torch.full((B, gen_length), -1, dtype=torch.long, device=device)  # (B, T)
    per_block = steps // blocks
    pos = torch.arange(gen_length, device=device)  # (T,)
    for blk in range(blocks):  # ok: denoising is sequential in blocks and steps, vectorised over the batch
        in_block = (pos >= blk * block_length) & (pos < (blk + 1) * block_length)  # (T,)
        k = num_transfer_tokens((x[:, P:] == mask_id) & in_block, per_block)  # (B, per_block)
        for s in range(per_block):
            masked = (x[:, P:] == mask_id) & ~hint_mask  # (B, T)
            logits = without_mask_token(model(x, attn)[:, P:], mask_id)  # (B, T, V)
            tokens, confidence = propose(logits, temperature, generator)  # (B, T), (B, T)
            commit = most_confident(confidence, masked & in_block, k[:, s])  # (B, T)
            x[:, P:] = torch.where(commit, tokens, x[:, P:])
            step_of = torch.where(commit, blk * per_block + s, step_of)
    return Sample(x[:, P:], step_of, hint_mask)


__all__ = ["MASK_LOGIT", "Sample", "most_confident", "num_transfer_tokens", "propose", "sample", "without_mask_token"]
