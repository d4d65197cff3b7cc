"""Segment Policy Optimization (SPO; "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL
for Large Language Models", AIFrameResearch, arXiv 2505.23564; code github.com/AIFrameResearch/SPO).

Credit at segment granularity, with Monte-Carlo values instead of a critic.

SPO-chain (short chains of thought), cut points at low-probability tokens:

    p_t = exp(ℓ^old_t)                                    probability of each sampled token under π_old
    C   = {t : m_t, p_t < τ}   (τ = 0.9)                  candidate decision tokens, in order
    S   = C[::interval]        (interval 5)               segment starts; the cut point is κ = s − 1 (state y_<s)
    V̂(s) = (1/N) Σ_n R(y_<s ⊕ y'_n),  y'_n ~ π_old(·| x, y_<s)   (N = 9 continuations from each cut point)
    V(L) = r                                              the sampled response's own reward
    A_t = V̂(s_{k+1}) − V̂(s_k)   for s_k ≤ t < s_{k+1}    (s_{n+1} = L, so the last segment ends at r)
    A_t = 0                     for t < s_1               (only tokens with p ≥ τ live there)
    m'_t = m_t · 1[p_t < τ]                               the probability mask: only these tokens are trained
    A ← (A − mean_{m'} A) / sqrt(var_{m'} A + 1e-8)       whitening over the batch's m' tokens (unbiased var;
                                                          under DDP every rank's, gathered)

Telescoping: Σ over segments of A = r − V̂(s_1) (= r − V̂(prompt) when s_1 = 0). No cut point → A = 0.

SPO-tree (long chains of thought): a tree of fixed-length segments; one set of rollouts values every node:

    V(leaf) = r,   V(node) = mean_{children} V(child)
    A(parent → child) = V(child) − V(parent)                              mode "rloo" (default)
    A(parent → child) = (V(child) − V(parent)) / (std_children + 1e-8)    mode "grpo" (population std)

Each edge is one training row (prompt = the parent's full text, response = the child's segment); only edges with
A ≠ 0 are kept; probability mask and whitening as in the chain. Since V(parent) is the mean over its children,
Σ_children A = 0 at every node, and the edge advantage is the Dr.GRPO / GRPO advantage of the sibling group.

The estimators are pure functions of the batch. The generation they need (MC continuations from prefixes, the
tree) is done by the method parts of ``common.methods.segment_po``: ``SegmentChain`` fills ``old_logprobs``,
``segment_starts`` and ``prefix_values`` after scoring; ``SegmentTree`` grows the tree and returns its edges with
rewards V(child) and ``old_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.ops import check_groups, group_std


def cut_starts(probs: Tensor, mask: Tensor, *, threshold: float = 0.9, interval: int = 5) -> Tensor:
    """SPO-chain segment starts: every ``interval``-th valid token with ``p < threshold`` (the first one first).

    A start at token s is the cut point κ = s − 1 of the paper (its state is the prefix y_<s; s = 0 is the prompt).
    Shapes: probs, mask (B, T) -> (B, T) bool.
    """
    if probs.shape != mask.shape or mask.dim() != 2:
        raise ValueError(f"probs {tuple(probs.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, T), got {mask.dtype}")
    if interval < 1:
        raise ValueError(f"interval must be a positive integer, got {interval}")
    candidate = mask & (probs < threshold)  # (B, T)
    rank = candidate.long().cumsum(1) - 1  # (B, T) index among the row's candidates
    return candidate & (rank % interval == 0)


def segment_advantages(rewards: Tensor, starts: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Raw SPO-chain token advantages ``A_t = V(next start) − V(current start)`` (``r`` after the last start; 0
    before the first). ``values`` holds V̂ at the start positions (other entries are ignored).

    Shapes: rewards (B,), starts, values, mask (B, T) -> (B, T), 0 off the mask.
    """
    check_rewards(rewards)
    B, T = mask.shape
    if starts.shape != mask.shape or values.shape != mask.shape or rewards.shape[0] != B:
        raise ValueError(f"starts {tuple(starts.shape)}, values {tuple(values.shape)} must be (B, T) = {(B, T)} and "
                         f"rewards (B,), got rewards {tuple(rewards.shape)}")
    if bool((starts & ~mask).any()):
        raise ValueError("starts must lie on valid tokens (starts & ~mask is not empty)")
    pos = torch.arange(T, device=mask.device).expand(B, T)  # (B, T)
    at_start = torch.where(starts, pos, torch.full_like(pos, -1))  # (B, T)
    current = at_start.cummax(1).values  # (B, T) the start at or before t (−1: none)
    after = torch.where(starts, pos, torch.full_like(pos, T))  # (B, T)
    nxt = after.flip(1).cummin(1).values.flip(1)  # (B, T) the start at or after t
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], T)], 1)  # (B, T) strictly after t (T: none)
    ext = torch.cat([values, rewards[:, None].to(values.dtype)], 1)  # (B, T + 1): index T is V(L) = r
    v_next = ext.gather(1, nxt)  # (B, T)
    v_cur = values.gather(1, current.clamp(min=0))  # (B, T)
    return torch.where((current >= 0) & mask, v_next - v_cur, torch.zeros_like(v_cur))


def whiten(advantages: Tensor, mask: Tensor, eps: float = 1e-8,
           all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> Tensor:
    """``(A − mean_m A) / sqrt(var_m A + eps)`` over the masked tokens of the whole batch (unbiased variance);
    0 off the mask. All-equal advantages give exactly 0. Shapes: (B, T), (B, T) -> (B, T).

    ``all_gather`` (every rank's rows in rank order and this rank's start, a collective; e.g.
    ``common.distributed.all_gather_rows``): the mean and variance are over the masked tokens of every
    data-parallel rank, computed on the gathered tokens as one process on the global batch; None: this batch."""
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if all_gather is not None:
        both, start = all_gather(torch.stack([advantages.flatten(), mask.flatten().to(advantages.dtype)], 1))  # (L, 2)
        every = whiten(both[None, :, 0], both[None, :, 1] > 0, eps)[0]  # (L,) every rank's tokens, row-major
        return every[start:start + advantages.numel()].view(advantages.shape)  # (B, T) this rank's
    n = mask.sum()  # ()
    first = advantages.flatten()[mask.flatten().long().argmax()]  # () a masked value: shift so equal values give 0
    a = torch.where(mask, advantages - first, torch.zeros_like(advantages))  # (B, T)
    mean = a.sum() / n.clamp(min=1)
    centred = torch.where(mask, a - mean, torch.zeros_like(a))
    var = (centred * centred).sum() / (n - 1).clamp(min=1)
    return centred / torch.sqrt(var + eps)


def spo_chain(rewards: Tensor, starts: Tensor, values: Tensor, mask: Tensor, probs: Tensor, *,
              threshold: float = 0.9, use_prob_mask: bool = True, whitening: bool = True, eps: float = 1e-8,
              all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> Tensor:
    """SPO-chain advantages (arXiv 2505.23564, §4; see the module docstring): segment differences of MC values,
    probability mask ``p < threshold``, whitening over the masked tokens (of every rank's rows with ``all_gather``,
    see :func:`whiten`). Shapes: rewards (B,); starts, values, mask, probs (B, T) -> (B, T), exactly 0 off the
    (probability) mask."""
    A = segment_advantages(rewards, starts, values, mask)  # (B, T)
    m = mask & (probs < threshold) if use_prob_mask else mask  # (B, T) m'
    A = torch.where(m, A, torch.zeros_like(A))
    return whiten(A, m, eps, all_gather) if whitening else A


def spo_tree(values: Tensor, parent_ids: Tensor, *, mode: Literal["rloo", "grpo"] = "rloo", eps: float = 1e-8,
             num_groups: int | None = None) -> Tensor:
    """SPO-tree edge advantages: ``V(child) − V(parent)`` with ``V(parent) = mean_siblings V`` ("rloo"), or that
    divided by the siblings' population std + eps ("grpo"). Shapes: values (E,), parent_ids (E,) -> (E,)."""
    if mode not in ("rloo", "grpo"):
        raise ValueError(f"mode must be 'rloo' or 'grpo', got {mode!r}")
    centred = grpo(values, parent_ids, scale="none", num_groups=num_groups)  # (E,) exactly 0 for equal siblings
    if mode == "rloo":
        return centred
    n = check_groups(values, parent_ids, num_groups, name="values")
    return centred / (group_std(centred, parent_ids, n, ddof=0, validate=False)[parent_ids] + eps)


class SPOChain(AdvantageEstimator):
    """SPO-chain (arXiv 2505.23564; authors' ``MathEpisodeGeneratorWithMCAdvantages``): token advantages (B, T)
    from the batch's π_old log-probs, segment starts and MC prefix values (filled by
    ``common.methods.segment_po.SegmentChain``, which reads ``interval`` and ``num_samples`` from here).

    Args:
        threshold: τ, tokens with π_old probability below it are cut candidates and the only trained tokens (0.9).
        interval: every ``interval``-th candidate is a cut point (authors' "int5": 5).
        num_samples: N, Monte-Carlo continuations per cut point (9).
        use_prob_mask: train only tokens with p < τ (the authors' default true).
        whitening: whiten over the masked tokens of the batch (on).
        eps: whitening epsilon (1e-8).
    """

    requires = ("old_logprobs", "segment_starts", "prefix_values")
    # every rank's rows, set by the Loop under data parallelism: the whitening is over the global batch's tokens
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    def __init__(self, threshold: float = 0.9, interval: int = 5, num_samples: int = 9, use_prob_mask: bool = True,
                 whitening: bool = True, eps: float = 1e-8):
        problems = []
        if not 0 < threshold <= 1:
            problems.append(f"threshold must be in (0, 1], got {threshold}")
        if interval < 1:
            problems.append(f"interval must be a positive integer, got {interval}")
        if num_samples < 1:
            problems.append(f"num_samples must be a positive integer, got {num_samples}")
        if problems:
            raise ValueError("SPOChain: " + "; ".join(problems))
        self.threshold, self.interval, self.num_samples = threshold, interval, num_samples
        self.use_prob_mask, self.whitening, self.eps = use_prob_mask, whitening, eps

    def starts(self, old_logprobs: Tensor, mask: Tensor) -> Tensor:
        """The segment starts of this estimator's cut rule. Shapes: old_logprobs, mask (B, T) -> (B, T) bool."""
        return cut_starts(old_logprobs.exp(), mask, threshold=self.threshold, interval=self.interval)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        batch.require(type(self).__name__, *self.requires)
        return spo_chain(batch.rewards, batch.segment_starts, batch.prefix_values, batch.completion_mask,
                         batch.old_logprobs.exp(), threshold=self.threshold, use_prob_mask=self.use_prob_mask,
                         whitening=self.whitening, eps=self.eps, all_gather=self.all_gather)


class SPOTree(AdvantageEstimator):
    """SPO-tree edge advantages (arXiv 2505.23564; authors' ``TreeEpisodeGenerator``). Rows are tree edges built
    by ``common.methods.segment_po.SegmentTree``: ``rewards`` hold V(child), ``group_ids`` the parent and
    ``old_logprobs`` π_old of the segment's tokens. Returns ``(A (B, T), keep)``
    with only the edges of A ≠ 0 kept, probability mask and whitening over the kept edges' masked tokens.

    Args:
        mode: "rloo" (V(child) − V(parent), the default) or "grpo" (divided by the siblings' std + eps).
        threshold, use_prob_mask, whitening, eps: as in SPOChain.
    """

    requires = ("old_logprobs",)
    # every rank's rows, set by the Loop under data parallelism: the whitening is over the global batch's tokens
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    def __init__(self, mode: Literal["rloo", "grpo"] = "rloo", threshold: float = 0.9, use_prob_mask: bool = True,
                 whitening: bool = True, eps: float = 1e-8):
        if mode not in ("rloo", "grpo"):
            raise ValueError(f"SPOTree: mode must be 'rloo' or 'grpo', got {mode!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"SPOTree: threshold must be in (0, 1], got {threshold}")
        self.mode, self.threshold, self.use_prob_mask, self.whitening, self.eps = mode, threshold, use_prob_mask, whitening, eps

    def __call__(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        edge = spo_tree(batch.rewards, batch.group_ids, mode=self.mode, eps=self.eps)  # (E,)
        keep = edge != 0  # (E,)
        mask = batch.completion_mask & keep[:, None]  # (E, T)
        if self.use_prob_mask:
            batch.require(type(self).__name__, "old_logprobs")
            mask = mask & (batch.old_logprobs.exp() < self.threshold)
        A = torch.where(mask, edge[:, None].expand_as(mask), torch.zeros_like(mask, dtype=edge.dtype))  # (E, T)
        return (whiten(A, mask, self.eps, self.all_gather) if self.whitening else A), keep
