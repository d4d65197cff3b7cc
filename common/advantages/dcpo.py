"""Memory-as-Action with DCPO, Dynamic Context Policy Optimization (Zhang et al., arXiv 2510.12635; agentic.md §11).

Memory-edit tool calls (delete / summarise spans of the working memory) break the append-only prefix, so an episode
is no longer one causal sequence: DCPO cuts it at the memory actions into *segments*, each a stored row with its own
(edited) prompt and its own generated tokens, and gives every segment its trajectory's group-relative advantage,
with the statistics over *unique trajectories* (one value per episode, however many segments it has):

    A_e = (R_e − μ_g) / (σ_g^unb + ε),   μ_g, σ_g over the episodes of group g     (norm_by_std=True)
    A_e =  R_e − μ_g                                                              (norm_by_std=False, Dr.GRPO)
    a group of one episode: μ = 0, σ = 1 (A_e = R_e)

Rows are segments: ``episode_ids`` (B,) names each row's trajectory and ``rewards`` (B,) carries its outcome R_e
(every segment of a trajectory the same). Returns (B,): the row's A_e on all its trained tokens.
:func:`sample_segments` is the authors' per-prompt segment sampler (``common.methods.dcpo.DCPOSegmentSampler``
applies it to a rollout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.batch import RolloutBatch
from common.segment_ops import dense_ids, episode_first, gnorm


def dcpo(rewards: Tensor, group_ids: Tensor, episode_ids: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """DCPO's deduplicated trajectory advantage per row. Shapes: (B,), (B,), (B,) -> (B,)."""
    check_rewards(rewards)
    ep, E = dense_ids(episode_ids.long())  # (B,) in [0, E)
    R = episode_first(rewards, ep, E)  # (E,) one outcome per trajectory
    g, n = dense_ids(episode_first(group_ids, ep, E))  # (E,)
    a = gnorm(R, g, n, mode="mean_std" if norm_by_std else "mean", std="unbiased", eps=eps, singleton="raw")  # (E,)
    return a[ep]


def sample_segments(episode: Tensor, group: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Per group, ``n`` segment rows (agentic.md §11 (b)): with at most n trajectories, every trajectory at least once,
    the rest round-robin over unused segments (rank 1 of every trajectory, then rank 2, ...; repeating from the
    start once every segment is used); with more than n trajectories, n distinct trajectories, one segment each.
    Order inside each rank is random. Vectorised (sorts, no loop over samples). Shapes: episode, group (S,) long ->
    (num_groups · n,) row indices, group by group."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    S = episode.shape[0]
    if S == 0:
        return torch.zeros(0, dtype=torch.long, device=episode.device)
    ep, E = dense_ids(episode.long())
    gid, G = dense_ids(group.long())
    u_seg = torch.rand(S, generator=generator).to(episode.device)  # (S,) random order of an episode's segments
    u_ep = torch.rand(E, generator=generator).to(episode.device)  # (E,) random order of the episodes
    o = torch.argsort(u_seg)
    o = o[torch.argsort(ep[o], stable=True)]  # by (episode, u_seg)
    ep_start = torch.cumsum(torch.bincount(ep, minlength=E), 0) - torch.bincount(ep, minlength=E)  # (E,)
    rank = torch.empty(S, dtype=torch.long, device=episode.device)
    rank[o] = torch.arange(S, device=episode.device) - ep_start[ep[o]]  # (S,) rank of the segment in its episode
    order = torch.argsort(u_ep[ep])
    order = order[torch.argsort(rank[order], stable=True)]
    order = order[torch.argsort(gid[order], stable=True)]  # by (group, rank, u_ep)
    count = torch.bincount(gid, minlength=G)  # (G,)
    start = torch.cumsum(count, 0) - count  # (G,)
    slots = torch.arange(n, device=episode.device)  # (n,)
    pos = start[:, None] + slots[None, :] % count[:, None]  # (G, n)
    return order[pos].reshape(-1)


class DCPO(AdvantageEstimator):
    """DCPO's segment advantage (see the module docstring).

    Args:
        norm_by_std: divide by the group's unbiased std over unique trajectories (False: Dr.GRPO-style).
        eps: added to σ (1e-6).
    """

    min_group_size = 2
    requires = ("episode_ids",)

    def __init__(self, norm_by_std: bool = True, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.norm_by_std, self.eps = norm_by_std, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        batch.require("DCPO", "episode_ids")
        return dcpo(batch.rewards, batch.group_ids, batch.episode_ids, norm_by_std=self.norm_by_std, eps=self.eps)
