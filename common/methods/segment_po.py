"""Segment Policy Optimization (SPO; "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL
for Large Language Models", AIFrameResearch, arXiv 2505.23564; code github.com/AIFrameResearch/SPO): the generation
the SPO estimators need, as method parts of the loop, for any language-model policy (``CausalLMPolicy``).

SPO-chain (``SegmentChain``, with ``advantage: common.advantages.segment.SPOChain``), after scoring:

    ℓ^old_t = log π_old(y_t | x, y_<t)                     (the current weights: the loop's ``logprobs``)
    S = C[::interval],  C = {t : m_t, exp(ℓ^old_t) < τ}    segment starts (``SPOChain.starts``)
    V̂(s) = (1/N) Σ_n R(y_<s ⊕ y'_n),  y'_n ~ π_old(·| x, y_<s),  |y_<s ⊕ y'_n| ≤ T_max

Every start of the whole batch becomes one prefix ``prompt ⊕ y_<s``; all prefixes are continued in one ``generate``
call (N samples each, each within the completion budget ``T_max − s``) and scored by the domain's rewards on the full
text ``y_<s ⊕ continuation``. The batch leaves with ``old_logprobs``, ``segment_starts`` and ``prefix_values``, from
which ``SPOChain`` computes A_t = V̂(s_{k+1}) − V̂(s_k) (the equations are in common/advantages/segment.py).

SPO-tree (``SegmentTree``, with ``advantage: common.advantages.segment.SPOTree``) replaces the rollout: a tree of
``branching = (b_1, ..., b_D)`` children per node, grown level by level (one ``generate`` call per level for all
nodes) with ``segment_tokens`` tokens per inner segment; the last level runs to EOS within the remaining budget and a
child that ends early is a leaf. Leaves are scored, V(node) = mean of its children, and the training rows are the
tree's edges (prompt = the parent's full text, completion = the child's segment, reward = V(child), group = the
parent, ``old_logprobs`` = π_old of the segment), so ``SPOTree`` computes V(child) − V(parent).

Components wired: ``common.advantages.segment`` (SPOChain / SPOTree), ``common.losses.prob_mask.ProbabilityMaskLoss``
(the probability-masked token mean) and, for the tree, the authors' on-policy edge replay buffer
``common.sampling.segment_buffer.SegmentEdgeBuffer`` (≤ 8 iterations, ≤ 32 edges per question per iteration).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.advantages.segment import SPOChain, SPOTree
from common.batch import RolloutBatch
from common.methods.base import Method
from common.policies.causal_lm import CausalLMPolicy

if TYPE_CHECKING:
    from common.loop import Loop


def left_pack(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's valid tokens to the right end, keeping their order (left padding). Shapes: (N, W) -> (N, W)."""
    order = torch.sort(mask.long(), dim=1, stable=True).indices  # (N, W) invalid first, valid after, order kept
    m = mask.gather(1, order)
    return ids.gather(1, order).masked_fill(~m, pad_id), m


def right_pack(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's valid tokens to the left end, keeping their order (right padding). Shapes: (N, W) -> (N, W)."""
    order = torch.sort((~mask).long(), dim=1, stable=True).indices  # (N, W) valid first
    m = mask.gather(1, order)
    return ids.gather(1, order).masked_fill(~m, pad_id), m


@torch.no_grad()
def continue_from(policy: CausalLMPolicy, prompt_ids: Tensor, prompt_mask: Tensor, prefix_ids: Tensor,
                  prefix_mask: Tensor, num_samples: int, max_new_tokens: int) -> RolloutBatch:
    """``num_samples`` continuations of every ``prompt ⊕ prefix`` (one generate call for all rows).

    Shapes: prompt_ids, prompt_mask (N, P) left-padded; prefix_ids, prefix_mask (N, S) right-padded -> a
    RolloutBatch of N·num_samples rows (row n·num_samples + j continues row n), its completions the continuations only.
    """
    ids, mask = left_pack(torch.cat([prompt_ids, prefix_ids], 1), torch.cat([prompt_mask, prefix_mask], 1),
                          policy.tokenizer.pad_token_id)
    return policy.generate(ids, mask, num_samples, max_new_tokens=max_new_tokens)


def score_texts(loop: "Loop", completion_ids: Tensor, completion_mask: Tensor, samples: list[dict],
                template: RolloutBatch) -> RolloutBatch:
    """Rewards of full completions: the domain's score on their decoded text (``template`` gives the other rows' fields)."""
    batch = template.replace(completion_ids=completion_ids, completion_mask=completion_mask,
                             completions=loop.policy.decode(completion_ids, completion_mask), samples=samples,
                             behaviour_logprobs=None, truncated=None, rewards=None)
    return loop.score(batch)


def _check_policy(owner: str, loop: "Loop") -> list[str]:
    if not isinstance(loop.policy, CausalLMPolicy):
        return [f"{owner} continues text prefixes and needs a common.policies.causal_lm.CausalLMPolicy, "
                f"got {type(loop.policy).__name__}"]
    return []


class SegmentChain(Method):
    """SPO-chain's Monte-Carlo prefix values (module docstring). Use with ``advantage:
    common.advantages.segment.SPOChain`` (whose ``threshold``, ``interval`` and ``num_samples`` it follows) and,
    for the probability-masked token mean, ``loss: common.losses.prob_mask.ProbabilityMaskLoss``."""

    provides = ("old_logprobs", "segment_starts", "prefix_values")

    def setup(self, loop: "Loop") -> None:
        problems = _check_policy("SegmentChain", loop)
        if not isinstance(loop.advantage, SPOChain):
            problems.append(f"SegmentChain needs advantage common.advantages.segment.SPOChain, got {type(loop.advantage).__name__}")
        if problems:
            raise ValueError("; ".join(problems))

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        old = loop.logprobs(batch)  # (B, T) log π_old: the weights before this step's update
        starts = loop.advantage.starts(old, batch.completion_mask)  # (B, T)
        values = self.prefix_values(loop, batch, starts, loop.advantage.num_samples)  # (B, T)
        return batch.replace(old_logprobs=old, segment_starts=starts, prefix_values=values)

    @torch.no_grad()
    def prefix_values(self, loop: "Loop", batch: RolloutBatch, starts: Tensor, num_samples: int) -> Tensor:
        """V̂(s) = mean reward of ``num_samples`` continuations of ``prompt ⊕ y_<s`` for every start s, within the
        budget ``T_max − s``. Shapes: starts (B, T) bool -> values (B, T) (0 where no start)."""
        policy = loop.policy
        values = torch.zeros(starts.shape, device=starts.device)  # (B, T)
        rows, cols = starts.nonzero(as_tuple=True)  # (M,), (M,): the one host sync, generation is host-driven
        M, T = rows.numel(), policy.sampling.max_new_tokens
        if M == 0:
            return values
        pos = torch.arange(batch.completion_ids.shape[1], device=starts.device)  # (T',)
        prefix_mask = pos[None, :] < cols[:, None]  # (M, T') y_<s
        cont = continue_from(policy, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                             prefix_mask, num_samples, T - int(cols.min()))
        s = cols.repeat_interleave(num_samples)  # (M·N,)
        cpos = torch.arange(cont.completion_ids.shape[1], device=starts.device)  # (Tc,): may exceed T' (short batch)
        budget = cpos[None, :] < (T - s)[:, None]  # (M·N, Tc) within T_max − s
        full_ids, full_mask = right_pack(
            torch.cat([batch.completion_ids[rows].repeat_interleave(num_samples, 0), cont.completion_ids], 1),
            torch.cat([prefix_mask.repeat_interleave(num_samples, 0), cont.completion_mask & budget], 1),
            policy.tokenizer.pad_token_id)
        samples = [batch.samples[r] for r in rows.repeat_interleave(num_samples).tolist()]
        scored = score_texts(loop, full_ids, full_mask, samples, cont)
        values[rows, cols] = scored.rewards.view(M, num_samples).mean(1).to(values.dtype)
        return values


class SegmentTree(Method):
    """SPO-tree's rollout (module docstring): training rows are the edges of a segment tree per prompt, with rewards
    V(child) and π_old log-probs set, so the loop does not score them again. Use with ``advantage:
    common.advantages.segment.SPOTree``; the module's ``group_size`` is not used for training rollouts, and
    validation decodes ordinary single completions.

    Args:
        branching: children per node at each depth (paper 6-6-6).
        segment_tokens: M, tokens of an inner segment (paper 30 on GSM8K, 600 on MATH); the last level gets the
            rest of ``sampling.max_new_tokens``.
    """

    provides = ("old_logprobs",)

    def __init__(self, branching: Sequence[int] = (6, 6, 6), segment_tokens: int = 30):
        super().__init__()
        branching = tuple(int(b) for b in branching)
        problems = []
        if not branching or min(branching) < 1:
            problems.append(f"branching must be a non-empty list of positive integers, got {branching}")
        if segment_tokens < 1:
            problems.append(f"segment_tokens must be a positive integer, got {segment_tokens}")
        if problems:
            raise ValueError("SegmentTree: " + "; ".join(problems))
        self.branching, self.segment_tokens = branching, segment_tokens

    def setup(self, loop: "Loop") -> None:
        problems = _check_policy("SegmentTree", loop)
        if not problems and loop.policy.sampling.max_new_tokens <= (len(self.branching) - 1) * self.segment_tokens:
            problems.append(f"sampling.max_new_tokens ({loop.policy.sampling.max_new_tokens}) must exceed (depth − 1) x "
                            f"segment_tokens = {(len(self.branching) - 1) * self.segment_tokens} to leave the last level a budget")
        if not isinstance(loop.advantage, SPOTree):
            problems.append(f"advantage must be common.advantages.segment.SPOTree, got {type(loop.advantage).__name__}")
        if problems:
            raise ValueError("SegmentTree: " + "; ".join(problems))

    def rollout(self, loop: "Loop", prompts: Sequence[dict], n: int) -> RolloutBatch:
        edges = self.grow(loop, prompts)
        return edges.replace(old_logprobs=loop.logprobs(edges))  # (E, S) log π_old of every edge's segment

    @torch.no_grad()
    def grow(self, loop: "Loop", prompts: Sequence[dict]) -> RolloutBatch:
        """One tree per prompt; returns its edges (E rows) with rewards V(child) and group ids = parent node."""
        policy = loop.policy
        prompt_ids, prompt_mask = policy.encode(prompts)  # (P, L)
        device = prompt_ids.device
        pad, D, T = policy.tokenizer.pad_token_id, len(self.branching), policy.sampling.max_new_tokens
        # frontier: nodes to expand; each has a root prompt row and its path tokens (right-padded)
        root = torch.arange(len(prompts), device=device)  # (F,)
        path_ids = torch.zeros(len(prompts), 0, dtype=torch.long, device=device)  # (F, 0)
        path_mask = torch.zeros(len(prompts), 0, dtype=torch.bool, device=device)
        levels = []  # per depth: the children's edges
        parent_offset = 0  # node ids of the frontier: parent_offset + arange(F)
        for d, b in enumerate(self.branching):
            budget = self.segment_tokens if d < D - 1 else T - (D - 1) * self.segment_tokens
            kids = continue_from(policy, prompt_ids[root], prompt_mask[root], path_ids, path_mask, b, budget)
            F = root.numel()
            parent = parent_offset + torch.arange(F, device=device).repeat_interleave(b)  # (F·b,)
            seg_ids, seg_mask = kids.completion_ids, kids.completion_mask  # (F·b, S)
            child_root = root.repeat_interleave(b)
            child_path, child_path_mask = right_pack(torch.cat([path_ids.repeat_interleave(b, 0), seg_ids], 1),
                                                     torch.cat([path_mask.repeat_interleave(b, 0), seg_mask], 1), pad)
            leaf = ~kids.truncated if d < D - 1 else torch.ones_like(kids.truncated)  # (F·b,) ended or last level
            levels.append(dict(parent=parent, offset=parent_offset, root=child_root, seg_ids=seg_ids, seg_mask=seg_mask, leaf=leaf,
                               path_ids=child_path, path_mask=child_path_mask,
                               prompt_ids=kids.prompt_ids, prompt_mask=kids.prompt_mask, template=kids))
            parent_offset += F
            expand = ~leaf
            root, path_ids, path_mask = child_root[expand], child_path[expand], child_path_mask[expand]
            if root.numel() == 0:
                break
        return self.edges(loop, levels, prompts)

    def edges(self, loop: "Loop", levels: list[dict], prompts: Sequence[dict]) -> RolloutBatch:
        """Score the leaves, back up V(node) = mean of children, and lay the edges out as a RolloutBatch."""
        pad = loop.policy.tokenizer.pad_token_id
        device = levels[0]["parent"].device
        for lvl in levels:  # leaves: reward of the full path text
            lvl["value"] = torch.zeros(lvl["leaf"].shape, device=device)
            idx = lvl["leaf"].nonzero()[:, 0]
            if idx.numel():
                samples = [dict(prompts[r]) for r in lvl["root"][idx].tolist()]
                scored = score_texts(loop, lvl["path_ids"][idx], lvl["path_mask"][idx], samples, lvl["template"].select(idx))
                lvl["value"][idx] = scored.rewards.float()
        for d in range(len(levels) - 2, -1, -1):  # inner nodes, bottom-up: V = mean over children
            lvl, below = levels[d], levels[d + 1]
            inner = (~lvl["leaf"]).nonzero()[:, 0]  # (F',) level d's expanded nodes = level d+1's frontier, in order
            local = below["parent"] - below["offset"]  # (F'·b,) index of each child's parent in ``inner``
            sums = torch.zeros(inner.numel(), device=device).index_add_(0, local, below["value"])
            counts = torch.zeros(inner.numel(), device=device).index_add_(0, local, torch.ones_like(below["value"]))
            lvl["value"][inner] = sums / counts
        P = max(lvl["prompt_ids"].shape[1] for lvl in levels)
        S = max(lvl["seg_ids"].shape[1] for lvl in levels)
        widen = torch.nn.functional.pad
        return RolloutBatch(
            prompt_ids=torch.cat([widen(lv["prompt_ids"], (P - lv["prompt_ids"].shape[1], 0), value=pad) for lv in levels]),
            prompt_mask=torch.cat([widen(lv["prompt_mask"], (P - lv["prompt_mask"].shape[1], 0)) for lv in levels]),
            completion_ids=torch.cat([widen(lv["seg_ids"], (0, S - lv["seg_ids"].shape[1]), value=pad) for lv in levels]),
            completion_mask=torch.cat([widen(lv["seg_mask"], (0, S - lv["seg_mask"].shape[1])) for lv in levels]),
            group_ids=torch.unique(torch.cat([lv["parent"] for lv in levels]), return_inverse=True)[1],  # siblings
            rewards=torch.cat([lv["value"] for lv in levels]),
            samples=[dict(prompts[r]) for lv in levels for r in lv["root"].tolist()],
            completions=[t for lv in levels for t in lv["template"].completions],
        )


__all__ = ["SegmentChain", "SegmentTree", "continue_from", "left_pack", "right_pack", "score_texts"]
