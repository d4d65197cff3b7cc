"""R³'s Structural Entropy Ranking Reward (SERR): a relative reward for the truncated responses of all-wrong groups.

Paper: "R³: Replay, Reflection, and Ranking Rewards for LLM Reinforcement Learning" (arXiv 2601.19620, §3.2).
shared/methods/text.md §17. In a group where every response is wrong, truncated responses are ranked by their
entropy structure: high peak entropy (exploration at forking tokens) and low global entropy (stable step completion).

    E_peak^(i)   = (1/|K_i|) Σ_{t∈K_i} H_{i,t},   K_i = the top-k_i entropy positions, k_i = max(1, ⌊p·L_i⌋)
    E_global^(i) = (1/L_i) Σ_t H_{i,t}
    i ≻ j  ⟺  E_peak^(i) > E_peak^(j)  and  E_global^(i) < E_global^(j)
    S_i = Σ_{j≠i} 1[i ≻ j];  sort by S_i descending (rank k = 0..N−1);  R_(k) = R_max · (1 − k/(N−1))

N counts the ranked responses of one group; N = 1 gives R_max. Ties in S keep row order (stable) [UNVERIFIED].
p and R_max are not in the sections of the paper we could read [UNVERIFIED; proposals p = 0.2, R_max = 0.1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.ops import masked_mean


def entropy_structure(entropy: Tensor, mask: Tensor, *, p: float) -> tuple[Tensor, Tensor]:
    """(E_peak, E_global) per row. Shapes: entropy (B, T), mask (B, T) bool -> (B,), (B,); 0 for empty rows."""
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must have the same shape (B, T)")
    L = mask.sum(1)  # (B,)
    k = torch.clamp((p * L.double()).floor().long(), min=1)  # (B,) k_i = max(1, floor(p L_i))
    ranked = entropy.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values  # (B, T)
    ranked = torch.where(torch.isinf(ranked), torch.zeros_like(ranked), ranked)  # invalid positions count 0
    top_sum = ranked.cumsum(1).gather(1, (k - 1).clamp(max=entropy.shape[1] - 1)[:, None]).squeeze(1)  # (B,)
    peak = torch.where(L > 0, top_sum / k.to(entropy.dtype), torch.zeros_like(top_sum))  # (B,)
    return peak, masked_mean(entropy, mask, 1)


def serr_rewards(e_peak: Tensor, e_global: Tensor, group_ids: Tensor, ranked: Tensor, *, r_max: float) -> Tensor:
    """SERR reward for the ``ranked`` rows (B,) bool, ranked within their group; other rows get 0.

    Shapes: e_peak (B,), e_global (B,), group_ids (B,), ranked (B,) -> (B,).
    """
    same = (group_ids[:, None] == group_ids[None, :]) & ranked[:, None] & ranked[None, :]  # (B, B) comparable pairs
    dominates = (e_peak[:, None] > e_peak[None, :]) & (e_global[:, None] < e_global[None, :]) & same  # (B, B) i ≻ j
    S = dominates.sum(1)  # (B,)
    idx = torch.arange(S.numel(), device=S.device)
    ahead = (S[None, :] > S[:, None]) | ((S[None, :] == S[:, None]) & (idx[None, :] < idx[:, None]))  # (B, B) j before i
    rank = (ahead & same).sum(1).to(e_peak.dtype)  # (B,) 0 = best
    n = same.sum(1).to(e_peak.dtype)  # (B,) ranked rows in the group
    reward = r_max * (1 - rank / (n - 1).clamp(min=1))  # (B,)
    reward = torch.where(n <= 1, torch.full_like(reward, r_max), reward)  # N = 1 -> R_max
    return torch.where(ranked, reward, torch.zeros_like(reward))


class SERR:
    """Replace the rewards of truncated responses in all-wrong groups by their SERR rank reward (R³, arXiv 2601.19620).

    Args:
        p: fraction of a response's tokens that form its peak set K_i [UNVERIFIED].
        r_max: reward of the best-ranked truncated response; below a correct answer's reward [UNVERIFIED].
    """

    def __init__(self, p: float = 0.2, r_max: float = 0.1):
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if r_max < 0:
            raise ValueError(f"r_max must be >= 0, got {r_max}")
        self.p, self.r_max = p, r_max

    @staticmethod
    def applies(correct: Tensor, truncated: Tensor, group_ids: Tensor) -> Tensor:
        """Rows to rank: truncated rows of groups with no correct row. Shapes: (B,) bool each -> (B,) bool."""
        any_correct = torch.zeros(int(group_ids.max()) + 1, dtype=torch.bool, device=group_ids.device)
        any_correct = any_correct.index_put((group_ids,), correct.bool(), accumulate=True)  # (num_groups,)
        return truncated.bool() & ~any_correct[group_ids]

    def __call__(self, rewards: Tensor, correct: Tensor, truncated: Tensor, group_ids: Tensor, entropy: Tensor,
                 mask: Tensor) -> Tensor:
        """New rewards (B,): SERR for truncated rows of all-wrong groups, unchanged elsewhere."""
        ranked = self.applies(correct, truncated, group_ids)  # (B,)
        peak, glob = entropy_structure(entropy, mask, p=self.p)  # (B,), (B,)
        serr = serr_rewards(peak, glob, group_ids, ranked, r_max=self.r_max).to(rewards.dtype)  # (B,)
        return torch.where(ranked, serr, rewards)
