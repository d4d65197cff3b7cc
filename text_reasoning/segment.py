"""Segment Policy Optimization (arXiv 2505.23564) for text reasoning: the generation the SPO estimators need.

- ``SegmentPOModule`` (SPO-chain): samples G completions per prompt as usual; the estimator
  (``common.advantages.segment.SPOChain``) asks it for π_old log-probs and for Monte-Carlo values of prefixes:
  every cut point of the whole batch becomes one prefix ``prompt ⊕ y_<s`` and all prefixes are continued in one
  ``generate`` call (N samples each, each within the completion budget ``T_max − s``), scored by the module's
  rewards on the full text ``y_<s ⊕ continuation``.
- ``SegmentTreeModule`` (SPO-tree): grows, level by level (one ``generate`` call per level for all nodes), a tree
  of ``branching = (b_1, ..., b_D)`` children with ``segment_tokens`` tokens per inner segment; the last level runs
  to EOS within the remaining budget, and a child that ends early is a leaf. Leaves are scored, V(node) is the mean
  of its children, and the training rows are the tree's edges (prompt = the parent's full text, completion = the
  child's segment, reward = V(child), group = the parent), so ``SPOTree`` computes V(child) − V(parent).

The authors' on-policy edge replay buffer (≤ 8 iterations, ≤ 32 edges per question per iteration) is the selector
``common.sampling.segment_buffer.SegmentEdgeBuffer``; without it every step trains on all its tree's edges with A ≠ 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from common.advantages.segment import SPOChain, SPOTree
from common.batch import RolloutBatch
from text_reasoning.module import TextReasoningModule


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


class _SegmentGeneration(TextReasoningModule):
    """Shared by the chain and tree modules: continuation from prefixes, π_old log-probs, scoring of full texts."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if hasattr(self.advantage, "sampler"):
            self.advantage.sampler = self  # the estimator's SegmentSampler (a plain attribute, not a submodule)

    @torch.no_grad()
    def old_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log π_old of the sampled tokens at the sampling temperature (the current weights). Shapes: -> (B, T)."""
        return self._micro_logprobs(batch, reference=False)

    @torch.no_grad()
    def continue_from(self, prompt_ids: Tensor, prompt_mask: Tensor, prefix_ids: Tensor, prefix_mask: Tensor,
                      num_samples: int, max_new_tokens: int) -> RolloutBatch:
        """``num_samples`` continuations of every ``prompt ⊕ prefix`` (one generate call for all rows).

        Shapes: prompt_ids, prompt_mask (N, P) left-padded; prefix_ids, prefix_mask (N, S) right-padded
        -> a RolloutBatch of N·num_samples rows (row n·num_samples + j continues row n), its completions the
        continuations only.
        """
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pack(torch.cat([prompt_ids, prefix_ids], 1), torch.cat([prompt_mask, prefix_mask], 1), pad)
        sampling = dataclasses.replace(self.sampling, max_new_tokens=max_new_tokens)
        return self.backend.generate(self.policy, self.tokenizer, ids, mask, num_samples, sampling)

    def score_texts(self, completion_ids: Tensor, completion_mask: Tensor, samples: list[dict],
                    template: RolloutBatch) -> RolloutBatch:
        """Rewards of full completions (the module's reward functions and verifier on their decoded text)."""
        pad = self.tokenizer.pad_token_id
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(~completion_mask, pad), skip_special_tokens=True)
        batch = template.replace(completion_ids=completion_ids, completion_mask=completion_mask, completions=texts,
                                 samples=samples, behaviour_logprobs=None, truncated=None, rewards=None)
        return self.score(batch)


class SegmentPOModule(_SegmentGeneration):
    """SPO-chain (arXiv 2505.23564): use with ``advantage: common.advantages.segment.SPOChain`` and, for the
    probability-masked token mean, ``loss: common.losses.prob_mask.ProbabilityMaskLoss``.

    Args: those of :class:`text_reasoning.module.TextReasoningModule`.
    """

    @torch.no_grad()
    def prefix_values(self, batch: RolloutBatch, starts: Tensor, num_samples: int) -> Tensor:
        """V̂(s) = mean reward of ``num_samples`` continuations of ``prompt ⊕ y_<s`` for every start s, within the
        budget ``T_max − s``. Shapes: starts (B, T) bool -> values (B, T) (0 where no start)."""
        values = torch.zeros(starts.shape, device=starts.device)  # (B, T)
        rows, cols = starts.nonzero(as_tuple=True)  # (M,), (M,): the one host sync, generation is host-driven
        M, T = rows.numel(), self.sampling.max_new_tokens
        if M == 0:
            return values
        pos = torch.arange(batch.completion_ids.shape[1], device=starts.device)  # (T',)
        prefix_mask = pos[None, :] < cols[:, None]  # (M, T') y_<s
        cont = self.continue_from(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                                  prefix_mask, num_samples, T - int(cols.min()))
        s = cols.repeat_interleave(num_samples)  # (M·N,)
        budget = pos[: cont.completion_ids.shape[1]][None, :] < (T - s)[:, None]  # (M·N, Tc) within T_max − s
        full_ids, full_mask = right_pack(
            torch.cat([batch.completion_ids[rows].repeat_interleave(num_samples, 0), cont.completion_ids], 1),
            torch.cat([prefix_mask.repeat_interleave(num_samples, 0), cont.completion_mask & budget], 1),
            self.tokenizer.pad_token_id)
        samples = [batch.samples[r] for r in rows.repeat_interleave(num_samples).tolist()]
        scored = self.score_texts(full_ids, full_mask, samples, cont)
        values[rows, cols] = scored.rewards.view(M, num_samples).mean(1).to(values.dtype)
        return values


class SegmentTreeModule(_SegmentGeneration):
    """SPO-tree (arXiv 2505.23564): training rollouts are the edges of a segment tree per prompt. Use with
    ``advantage: common.advantages.segment.SPOTree``. Validation decodes ordinary single completions.

    Args:
        branching: children per node at each depth (paper 6-6-6); ``group_size`` is not used for training rollouts.
        segment_tokens: M, tokens of an inner segment (paper 30 on GSM8K, 600 on MATH); the last level gets the
            rest of ``sampling.max_new_tokens``.
        **kwargs: those of :class:`text_reasoning.module.TextReasoningModule`.
    """

    def __init__(self, *args: Any, branching: Sequence[int] = (6, 6, 6), segment_tokens: int = 30, **kwargs: Any):
        super().__init__(*args, **kwargs)
        branching = tuple(int(b) for b in branching)
        problems = []
        if not branching or min(branching) < 1:
            problems.append(f"branching must be a non-empty list of positive integers, got {branching}")
        if segment_tokens < 1:
            problems.append(f"segment_tokens must be a positive integer, got {segment_tokens}")
        elif self.sampling.max_new_tokens <= (len(branching) - 1) * segment_tokens:
            problems.append(f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must exceed (depth − 1) x "
                            f"segment_tokens = {(len(branching) - 1) * segment_tokens} to leave the last level a budget")
        if not isinstance(self.advantage, SPOTree):
            problems.append(f"advantage must be common.advantages.segment.SPOTree, got {type(self.advantage).__name__}")
        if problems:
            raise ValueError("SegmentTreeModule: " + "; ".join(problems))
        self.branching, self.segment_tokens = branching, segment_tokens

    def rollout(self, prompts: Sequence[dict], *, greedy: bool = False, num_samples: int | None = None) -> RolloutBatch:
        if greedy or num_samples is not None:
            return super().rollout(prompts, greedy=greedy, num_samples=num_samples)
        return self.grow_tree(prompts)

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        """Tree edges arrive scored (reward = V(child)); other batches are scored as usual."""
        return rollouts if rollouts.rewards is not None else super().score(rollouts)

    @torch.no_grad()
    def grow_tree(self, prompts: Sequence[dict]) -> RolloutBatch:
        """One tree per prompt; returns its edges (E rows) with rewards V(child) and group ids = parent node."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts)  # (P, L)
        pad, D, T = self.tokenizer.pad_token_id, len(self.branching), self.sampling.max_new_tokens
        # frontier: nodes to expand; each has a root prompt row and its path tokens (right-padded)
        root = torch.arange(len(prompts), device=self.device)  # (F,)
        path_ids = torch.zeros(len(prompts), 0, dtype=torch.long, device=self.device)  # (F, 0)
        path_mask = torch.zeros(len(prompts), 0, dtype=torch.bool, device=self.device)
        levels = []  # per depth: the children's edges
        parent_offset = 0  # node ids of the frontier: parent_offset + arange(F)
        for d, b in enumerate(self.branching):
            budget = self.segment_tokens if d < D - 1 else T - (D - 1) * self.segment_tokens
            kids = self.continue_from(prompt_ids[root], prompt_mask[root], path_ids, path_mask, b, budget)
            F = root.numel()
            parent = parent_offset + torch.arange(F, device=self.device).repeat_interleave(b)  # (F·b,)
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
        return self._edges(levels, prompts)

    def _edges(self, levels: list[dict], prompts: Sequence[dict]) -> RolloutBatch:
        """Score the leaves, back up V(node) = mean of children, and lay the edges out as a RolloutBatch."""
        pad = self.tokenizer.pad_token_id
        for lvl in levels:  # leaves: reward of the full path text
            lvl["value"] = torch.zeros(lvl["leaf"].shape, device=self.device)
            idx = lvl["leaf"].nonzero()[:, 0]
            if idx.numel():
                samples = [dict(prompts[r]) for r in lvl["root"][idx].tolist()]
                scored = self.score_texts(lvl["path_ids"][idx], lvl["path_mask"][idx], samples, lvl["template"].select(idx))
                lvl["value"][idx] = scored.rewards.float()
        for d in range(len(levels) - 2, -1, -1):  # inner nodes, bottom-up: V = mean over children
            lvl, below = levels[d], levels[d + 1]
            inner = (~lvl["leaf"]).nonzero()[:, 0]  # (F',) level d's expanded nodes = level d+1's frontier, in order
            local = below["parent"] - below["offset"]  # (F'·b,) index of each child's parent in ``inner``
            sums = torch.zeros(inner.numel(), device=self.device).index_add_(0, local, below["value"])
            counts = torch.zeros(inner.numel(), device=self.device).index_add_(0, local, torch.ones_like(below["value"]))
            lvl["value"][inner] = sums / counts
        P = max(lvl["prompt_ids"].shape[1] for lvl in levels)
        S = max(lvl["seg_ids"].shape[1] for lvl in levels)
        leaves = torch.cat([lvl["value"][lvl["leaf"]] for lvl in levels])
        if self._trainer is not None:
            self.log("train/leaf_reward", leaves.mean(), on_step=True, on_epoch=False, batch_size=leaves.numel())
        widen = torch.nn.functional.pad
        batch = RolloutBatch(
            prompt_ids=torch.cat([widen(lv["prompt_ids"], (P - lv["prompt_ids"].shape[1], 0), value=pad) for lv in levels]),
            prompt_mask=torch.cat([widen(lv["prompt_mask"], (P - lv["prompt_mask"].shape[1], 0)) for lv in levels]),
            completion_ids=torch.cat([widen(lv["seg_ids"], (0, S - lv["seg_ids"].shape[1]), value=pad) for lv in levels]),
            completion_mask=torch.cat([widen(lv["seg_mask"], (0, S - lv["seg_mask"].shape[1])) for lv in levels]),
            group_ids=torch.unique(torch.cat([lv["parent"] for lv in levels]), return_inverse=True)[1],  # siblings
            rewards=torch.cat([lv["value"] for lv in levels]),
            samples=[dict(prompts[r]) for lv in levels for r in lv["root"].tolist()],
            completions=[t for lv in levels for t in lv["template"].completions],
        )
        return batch
