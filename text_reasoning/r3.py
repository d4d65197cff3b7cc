"""R³ (arXiv 2601.19620) for text reasoning: the Structural Entropy Ranking Reward needs the policy's token entropies
at scoring time, so this module computes them (one no-grad forward, only when some all-wrong group has truncated
responses) and lets ``common.rewards.entropy_rank.SERR`` re-score those rows. Cross-Context Replay is the selector
``common.sampling.replay.CrossContextReplay``. shared/methods/text.md §17.
"""

from __future__ import annotations

from typing import Any

import torch

from common.batch import RolloutBatch
from common.rewards.entropy_rank import SERR
from text_reasoning.module import TextReasoningModule


class R3Module(TextReasoningModule):
    """:class:`text_reasoning.module.TextReasoningModule` with R³'s SERR reward for truncated responses of all-wrong
    groups (logged as ``train/serr_frac``, the share of rows it re-scored).

    Args:
        serr: the ranking reward (None = off).
        *args, **kwargs: as :class:`text_reasoning.module.TextReasoningModule`.
    """

    def __init__(self, *args: Any, serr: SERR | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.serr = serr

    @torch.no_grad()
    def token_entropy(self, rollouts: RolloutBatch) -> torch.Tensor:
        """Entropy of the policy's next-token distribution at every completion position. Shapes: -> (B, T)."""
        return torch.cat([self.sequence_logprobs(micro)[1] for micro in rollouts.split(self.micro_batch_size or rollouts.batch_size)])

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        rollouts = super().score(rollouts)
        if self.serr is None or rollouts.truncated is None:
            return rollouts
        ranked = self.serr.applies(rollouts.correct, rollouts.truncated, rollouts.group_ids)  # (B,)
        self.serr_frac = ranked.float().mean()
        if not bool(ranked.any()):  # ok: one sync per step; skips the entropy forward
            return rollouts
        rewards = self.serr(rollouts.rewards, rollouts.correct, rollouts.truncated, rollouts.group_ids,
                            self.token_entropy(rollouts), rollouts.completion_mask)
        return rollouts.replace(rewards=rewards)

    def update(self, rollouts: RolloutBatch):
        metrics = super().update(rollouts)
        if getattr(self, "serr_frac", None) is not None:
            metrics["serr_frac"] = self.serr_frac
        return metrics
