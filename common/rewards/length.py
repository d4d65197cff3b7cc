"""Length rewards: a dense, task-free signal (and the usual shaping term for overlong answers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

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


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, §3.4, eq. 13):

        R_len(|y|) = 0                                      |y| ≤ L_max − L_cache
                   = ((L_max − L_cache) − |y|) / L_cache    L_max − L_cache < |y| ≤ L_max
                   = −1                                     L_max < |y|
    times ``factor`` (verl's ``penalty_factor``). Shapes: lengths (B,) -> (B,) float32, in [−factor, 0].
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}], got {cache_len}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0 (it scales a penalty), got {factor}")
    over = (lengths.to(torch.float32) - (max_len - cache_len)) / cache_len  # (B,) > 1 beyond L_max
    return 0.0 - factor * over.clamp(min=0.0, max=1.0)  # 0.0 − …: no −0.0 below the buffer


class OverlongPenalty(RewardFunction):
    """DAPO's overlong reward shaping (see :func:`overlong_penalty`), added to the task reward in YAML.

    Reward functions see the decoded text only, so the length is measured in characters (``unit="chars"``) or
    whitespace-separated words (``unit="words"``), not tokens as in the paper: set ``max_len``/``cache_len`` in
    that unit (SmolLM2 averages about 3-4 characters per token on arithmetic text; the char-level TinyLlama
    has exactly one). Paper: L_max = 20480 tokens, L_cache = 4096.

    Args:
        max_len: L_max, the length from which the penalty is −factor.
        cache_len: L_cache, the soft-penalty buffer below L_max (0 < cache_len <= max_len).
        factor: the penalty's magnitude at and beyond L_max (verl's ``penalty_factor``, 1.0).
        unit: "chars" or "words".
    """

    name = "overlong"

    def __init__(self, max_len: int, cache_len: int, factor: float = 1.0, unit: Literal["chars", "words"] = "chars"):
        if unit not in ("chars", "words"):
            raise ValueError(f"unit must be 'chars' or 'words', got {unit!r}")
        overlong_penalty(torch.zeros(0), max_len, cache_len, factor)  # validates max_len, cache_len, factor
        self.max_len, self.cache_len, self.factor, self.unit = max_len, cache_len, factor, unit

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        count = len if self.unit == "chars" else (lambda c: len(c.split()))
        lengths = torch.tensor([count(c) for c in completions], dtype=torch.float32)  # (B,)
        return overlong_penalty(lengths, self.max_len, self.cache_len, self.factor)
