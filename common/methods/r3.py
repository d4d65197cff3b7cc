"""R³: the Structural Entropy Ranking Reward (SERR) at scoring time; Cross-Context Replay is the selector.

"R³: Replay, Reflection, and Ranking Rewards for LLM Reinforcement Learning" (arXiv 2601.19620), shared/methods/
text.md §17. A group whose every response is wrong gives GRPO no signal; among its truncated responses R³ prefers
the ones whose token entropy is concentrated on a few peak tokens over the ones that are uncertain throughout:

    ranked_i   = truncated_i ∧ no response of group(i) is correct
    e_peak_i   = mean entropy of the top-p share of i's tokens,  e_global_i = mean entropy of all its tokens
    r_i        = SERR rank reward in [0, R_max] of (e_peak, e_global) within the group   (common/rewards/entropy_rank.py)
    Â          = Eq. 3 on groups mixed with replayed opposite-outcome responses           (common/sampling/replay.py)

This method re-scores the ranked rows with SERR after the task's rewards: it needs the policy's token entropies
(one no-grad forward, micro-batched, only when some row is ranked). ``serr_frac``, the share of the trained
rows SERR ranks, is logged after the update. Not implemented: In-Context Self-Reflection and the length bonus.

Components it wires:
    reward      ``common.rewards.entropy_rank.SERR`` (this method's ``serr``)
    selector    ``common.sampling.replay.CrossContextReplay`` (the loop's ``selector``, set in YAML; Eq. 3 advantages)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.rewards.entropy_rank import SERR

if TYPE_CHECKING:
    from common.loop import Loop


class R3(Method):
    """R³'s SERR reward for truncated responses of all-wrong groups (module docstring).

    Args:
        serr: the ranking reward (default ``SERR()``).
    """

    requires = ("correct", "truncated")

    def __init__(self, serr: SERR | None = None):
        super().__init__()
        self.serr = serr if serr is not None else SERR()

    @torch.no_grad()
    def token_entropy(self, loop: "Loop", batch: RolloutBatch) -> Tensor:
        """Entropy of the policy's next-token distribution at every completion position. Shapes: -> (B, T)."""
        return torch.cat([loop.policy(micro).entropy for micro in batch.split(loop.micro_batch_size or batch.batch_size)])

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        ranked = self.serr.applies(batch.correct, batch.truncated, batch.group_ids)  # (B,)
        if not bool(ranked.any()):  # ok: one sync per step; skips the entropy forward
            return batch
        rewards = self.serr(batch.rewards, batch.correct, batch.truncated, batch.group_ids,
                            self.token_entropy(loop, batch), batch.completion_mask)
        return batch.replace(rewards=rewards)

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        """``serr_frac``: the share of the trained rows in SERR's ranked set (truncated rows of all-wrong groups)."""
        return {"serr_frac": self.serr.applies(batch.correct, batch.truncated, batch.group_ids).float().mean()}

    def extra_repr(self) -> str:
        return f"p={self.serr.p}, r_max={self.serr.r_max}"
