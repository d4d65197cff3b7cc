"""RolloutBatch: the one data structure between rollout and update.

One row per sampled sequence (``B`` = prompts x G). Prompts are left-padded and completions right-padded, so
``cat([prompt_ids, completion_ids], 1)`` is the model input and the completion occupies the last ``T``
positions. Fields that later steps of the update loop fill (rewards, log-probs, advantages) start as None.

Multi-turn episodes (shared/methods/agentic.md §1) will add episode/turn tables; the sequence-level fields
below stay as they are, so sequence-level estimators keep working on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # (B, P) long, left-padded
    prompt_mask: Tensor  # (B, P) bool
    completion_ids: Tensor  # (B, T) long, right-padded
    completion_mask: Tensor  # (B, T) bool: valid tokens, up to and including EOS
    group_ids: Tensor  # (B,) long in [0, num_groups)
    behaviour_logprobs: Tensor | None = None  # (B, T) log-probs from the sampler (HF generate / vLLM)
    old_logprobs: Tensor | None = None  # (B, T) log π_old, the policy before this update
    ref_logprobs: Tensor | None = None  # (B, T) log π_ref
    rewards: Tensor | None = None  # (B,) float
    reward_components: Tensor | None = None  # (B, K) unweighted components
    reward_names: tuple[str, ...] = ()  # (K,)
    advantages: Tensor | None = None  # (B,) or (B, T)
    truncated: Tensor | None = None  # (B,) bool: hit the token budget without EOS
    correct: Tensor | None = None  # (B,) bool: the task's verifier accepted the answer (for accuracy)
    samples: list[dict[str, Any]] = field(default_factory=list)  # (B,) per-sample metadata (prompt, answer, ...)
    completions: list[str] = field(default_factory=list)  # (B,) decoded text, for rewards and logging

    def __post_init__(self) -> None:
        B = self.completion_ids.shape[0]
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group_ids"):
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.shape[0] != B:
                raise ValueError(f"RolloutBatch.{name} must be a tensor with B={B} rows, got {getattr(t, 'shape', t)}")
        if self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError(
                f"RolloutBatch.completion_mask {tuple(self.completion_mask.shape)} must match "
                f"completion_ids {tuple(self.completion_ids.shape)}"
            )
        if self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(
                f"RolloutBatch.prompt_mask {tuple(self.prompt_mask.shape)} must match prompt_ids {tuple(self.prompt_ids.shape)}"
            )
        for name in ("samples", "completions"):
            seq = getattr(self, name)
            if seq and len(seq) != B:
                raise ValueError(f"RolloutBatch.{name} must have B={B} entries, got {len(seq)}")

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> Tensor:  # (B,) completion lengths L_i
        return self.completion_mask.sum(1)

    def _map(self, fn_tensor, fn_list) -> "RolloutBatch":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                out[f.name] = fn_tensor(v)
            elif isinstance(v, list):
                out[f.name] = fn_list(v)
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def select(self, index: Tensor) -> "RolloutBatch":
        """Rows ``index`` (a LongTensor of row numbers or a BoolTensor (B,)). Group ids are kept as they are."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        rows = index.tolist()
        return self._map(lambda t: t[index.to(t.device)], lambda seq: [seq[i] for i in rows] if seq else seq)

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive minibatches of at most ``size`` rows."""
        if size <= 0:
            raise ValueError(f"split size must be a positive integer, got {size}")
        return [self.select(torch.arange(s, min(s + size, self.batch_size))) for s in range(0, self.batch_size, size)]

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return self._map(lambda t: t.to(device), lambda seq: seq)

    @property
    def num_groups(self) -> Tensor:  # () number of distinct group ids
        return torch.unique(self.group_ids).numel()

    @staticmethod
    def cat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Rows of several batches; group ids of each later batch are offset so groups never merge. Prompt and
        completion widths are padded (left and right respectively) to the widest batch."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.completion_ids.shape[1] for b in batches)
        out: dict[str, Any] = {}
        offset, gids = 0, []
        for b in batches:
            gids.append(b.group_ids + offset)
            offset += int(b.group_ids.max()) + 1 if b.batch_size else 0
        for f in dataclasses.fields(RolloutBatch):
            vals = [getattr(b, f.name) for b in batches]
            if f.name == "group_ids":
                out[f.name] = torch.cat(gids)
            elif all(torch.is_tensor(v) for v in vals):
                if f.name in ("prompt_ids", "prompt_mask"):
                    vals = [torch.nn.functional.pad(v, (P - v.shape[1], 0)) for v in vals]
                elif vals[0].dim() == 2 and vals[0].shape[1] == batches[0].completion_ids.shape[1] and f.name != "reward_components":
                    vals = [torch.nn.functional.pad(v, (0, T - v.shape[1])) for v in vals]
                out[f.name] = torch.cat(vals)
            elif all(v is None for v in vals) or f.name == "reward_names":
                out[f.name] = vals[0]
            elif all(isinstance(v, list) for v in vals):
                out[f.name] = [x for v in vals for x in v]
            else:
                raise ValueError(f"RolloutBatch.cat: field {f.name} is set in some batches and not in others")
        return RolloutBatch(**out)

    def state_dict(self) -> dict[str, Any]:
        """The rows as tensors and plain lists (what a checkpoint loaded with ``weights_only=True`` can hold), for
        buffers that keep rollouts across steps; :meth:`from_state` rebuilds them."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out

    @staticmethod
    def from_state(state: dict[str, Any]) -> "RolloutBatch | None":
        """Inverse of :meth:`state_dict` (None for an empty state)."""
        if not state:
            return None
        rows = dict(state)
        if "reward_names" in rows:
            rows["reward_names"] = tuple(rows["reward_names"])
        return RolloutBatch(**rows)

    def replace(self, **changes: Any) -> "RolloutBatch":
        return dataclasses.replace(self, **changes)
