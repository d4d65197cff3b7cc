"""Matched controls that the reproductions' ``advlab`` subprocesses name by import path (``support.controls.<Class>``,
with ``reproductions/`` on ``PYTHONPATH``).

- :class:`ShuffledRewardModelReward`: the reward model's scores permuted among the completions of each prompt. Used by
  ``reproductions/reward_model.py`` as the control of "GRPO on a reward model's scores raises accuracy" (InstructGPT,
  arXiv 2203.02155 §3.5; GRPO, arXiv 2402.03300 eq. 3): the same rollouts, the same RM forward passes and, within
  every group, exactly the same multiset of rewards (so the same advantage magnitudes after GRPO's group
  normalisation), but no information about which completion the RM preferred. What the RM arm gains over this arm is
  what the RM's ranking contributes; what both gain is what any GRPO update of that size does to the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from common.rewards.model import RewardModelReward


class ShuffledRewardModelReward(RewardModelReward):
    """``RewardModelReward`` whose scores are permuted uniformly at random among the rows that share a prompt.

    Args: those of :class:`common.rewards.model.RewardModelReward`, plus ``seed`` (the permutations' generator).
    Shapes: B completions -> (B,) float32; ``sorted(out[rows of prompt p]) == sorted(scores[rows of prompt p])``.
    """

    def __init__(self, path: str, batch_size: int = 32, seed: int = 0, name: str = "reward_model_shuffled", **kwargs: Any):
        super().__init__(path, batch_size=batch_size, name=name, **kwargs)
        if not isinstance(seed, int):
            raise ValueError(f"ShuffledRewardModelReward: seed must be an integer, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        scores = super().__call__(completions, samples)  # (B,)
        return permute_within_groups(scores, [str(s.get("prompt", "")) for s in samples], self.generator)


def permute_within_groups(values: Tensor, keys: Sequence[str], generator: torch.Generator) -> Tensor:
    """``values`` (B,) permuted uniformly at random among the rows with the same key.

    Rows sorted by (group, uniform noise) list each group's rows in a random order; rows sorted by group alone (stable)
    list them in their original order; the i-th of the second receives the value of the i-th of the first."""
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = torch.tensor([index[k] for k in keys], dtype=torch.float64)  # (B,)
    noise = torch.rand(group.shape, generator=generator, dtype=torch.float64)  # (B,) in [0, 1)
    shuffled = torch.argsort(group + noise)  # (B,) group-contiguous, random within a group
    original = torch.argsort(group, stable=True)  # (B,) group-contiguous, original order within a group
    out = torch.empty_like(values)
    out[original] = values[shuffled]
    return out
