"""Length rewards: a dense, task-free signal (and the usual shaping term for overlong answers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from common.rewards.base import RewardFunction


class LengthReward(RewardFunction):
    """``r = −|len(completion) − target| / target`` in characters: 0 at the target length, negative away
    from it. Dense and task-free, so any policy gets a learning signal (smoke runs, resume tests).

    Args:
        target: the preferred completion length in characters (> 0).
    """

    name = "length"

    def __init__(self, target: int = 20):
        if target <= 0:
            raise ValueError(f"target must be a positive number of characters, got {target}")
        self.target = target

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)  # (B,)
        return -(lengths - self.target).abs() / self.target
