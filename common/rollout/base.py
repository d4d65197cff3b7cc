"""The protocol every generation backend implements (HF ``generate`` here, vLLM in ``vllm.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch


@dataclass
class Sampling:
    """Sampling options shared by every backend.

    Args:
        max_new_tokens: generation budget T_max per completion.
        temperature: softmax temperature; log-probs are computed at the same temperature.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        stop_strings: end a completion when its text contains one of these (the stop string is kept).
        logprobs: also return the sampler's log-probs of the sampled tokens (``behaviour_logprobs``).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_strings = tuple(self.stop_strings)


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(
        self,
        policy: nn.Module,
        tokenizer,
        prompt_ids: Tensor,  # (P, L) left-padded
        prompt_mask: Tensor,  # (P, L) bool
        num_samples: int,
        sampling: Sampling,
        *,
        greedy: bool = False,
    ) -> RolloutBatch:
        """``num_samples`` completions per prompt; row ``p·num_samples + j`` is sample j of prompt p and
        ``group_ids`` is ``p``. Token ids in, token ids out (text is decoded for rewards, never re-encoded)."""
        ...

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the backend sample from ``policy``'s current weights (a no-op when it shares them)."""
        ...

    def score(self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
              completion_mask: Tensor) -> Tensor:
        """Teacher-forced log-probs (temperature 1) of given completions under the weights the backend samples
        from. Shapes: prompt (B, L) left-padded, completion (B, T) right-padded -> (B, T), 0 off the mask. The
        loop's conformance test compares them with the trainer's after an optimiser step (a sync that binds
        nothing fails)."""
        ...


def stop_string_lengths(tokenizer, completion_ids: Tensor, mask: Tensor, stops: tuple[str, ...]) -> Tensor:
    """Smallest prefix length whose text contains a stop string (binary search over prefixes; O(log T)
    decodes per completion that contains one); shared by every backend. Shapes: (B, T), (B, T) -> (B,) long,
    T+1 where none."""
    lengths = torch.full((completion_ids.shape[0],), completion_ids.shape[1] + 1, dtype=torch.long)
    rows = completion_ids.tolist()
    valid = mask.sum(1).tolist()
    for i, (ids, n) in enumerate(zip(rows, valid)):  # ok: host-side text search, only with stop strings
        def hit(k: int) -> bool:
            text = tokenizer.decode(ids[:k], skip_special_tokens=False)
            return any(s in text for s in stops)

        if not hit(n):
            continue
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        lengths[i] = lo
    return lengths
