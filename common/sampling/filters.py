"""Row and group filters applied after advantages (DESIGN step 5): DAPO's dynamic sampling and truncation
masking, NGRPO's all-correct filter, and a chain to combine them.

Each selector keeps whole groups (or drops single rows) and renumbers the kept groups ``0 .. k−1`` in order
of their old ids, so later group statistics (default ``num_groups = B``) always see ids in range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.ops import group_max, group_mean, group_min
from common.sampling.base import Selector


def _renumbered(batch: RolloutBatch) -> RolloutBatch:
    """The batch with group ids mapped to ``0 .. k−1`` in increasing order of the old ids."""
    _, inverse = torch.unique(batch.group_ids, return_inverse=True)  # (B,)
    return batch.replace(group_ids=inverse.to(batch.group_ids.dtype))


def _keep_rows(batch: RolloutBatch, keep: Tensor) -> RolloutBatch:
    return _renumbered(batch.select(keep))


def mixed_groups(group_ids: Tensor, correct: Tensor | None = None, rewards: Tensor | None = None) -> Tensor:
    """DAPO's dynamic-sampling criterion per row: is the row's group neither all right nor all wrong?

        keep_i = 0 < mean_{g_i}(correct) < 1          when ``correct`` is given (DAPO's ``metric=acc``)
        keep_i = max_{g_i}(r) > min_{g_i}(r)          otherwise: the group's rewards are not all equal (σ > 0)

    Shapes: group_ids (B,), correct (B,) bool or rewards (B,) -> (B,) bool.
    """
    if correct is not None:
        acc = group_mean(correct.float(), group_ids)[group_ids]  # (B,)
        return (acc > 0) & (acc < 1)
    if rewards is None:
        raise ValueError("mixed_groups needs correct (B,) or rewards (B,); the batch has neither (score it first)")
    return group_max(rewards, group_ids)[group_ids] > group_min(rewards, group_ids)[group_ids]  # (B,)


class DynamicSampling(Selector):
    """DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476, §3.2, eq. 11 constraint 0 < |{o_i correct}| < G):
    keep the groups whose accuracy is strictly between 0 and 1 (by ``batch.correct``; by reward spread when the
    domain sets no ``correct``), and ask the loop to sample new prompts (the training data's next batches, as DAPO
    does) until ``max_groups`` groups are kept; then keep the first ``max_groups`` whole groups and discard the rest.

    If ``max_generation_rounds`` runs out first, the step trains on the groups it has rather than raising, so
    a run does not stop on a hard batch (verl's ``max_num_gen_batches`` raises; the paper keeps sampling new
    prompts). If it has none, ``when_empty`` decides:

    - ``"zero_update"``: train on the last round's rows with every advantage set to 0. The policy-gradient term is
      exactly 0, but the optimiser still steps (so the step counts; AdamW's momentum and weight decay, and a KL
      term if β > 0, still act). Never stalls, e.g. early in training when every answer is wrong.
    - ``"skip"``: return no rows; the module then takes an empty optimiser step (no parameter changes, no
      momentum applied; the step counts, logged as ``train/empty_steps``).

    Args:
        max_groups: groups to train on per step (DAPO's prompt batch size; paper 512 with 3x oversampling);
            None filters each round without refilling.
        when_empty: "zero_update" or "skip" (see above).
    """

    def __init__(self, max_groups: int | None = None, when_empty: Literal["zero_update", "skip"] = "skip"):
        if max_groups is not None and max_groups < 1:
            raise ValueError(f"max_groups must be a positive integer or None, got {max_groups}")
        if when_empty not in ("zero_update", "skip"):
            raise ValueError(f"when_empty must be 'zero_update' or 'skip', got {when_empty!r}")
        self.max_groups, self.when_empty = max_groups, when_empty
        self._last: RolloutBatch | None = None  # the last round before filtering (transient, within one step)

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        rollouts = _renumbered(rollouts)  # ids in [0, B) for the group statistics
        self._last = rollouts
        return _keep_rows(rollouts, mixed_groups(rollouts.group_ids, rollouts.correct, rollouts.rewards))

    def wants_more(self, kept: RolloutBatch) -> bool:
        return self.max_groups is not None and int(kept.num_groups) < self.max_groups  # ok: once per round

    def finalize(self, kept: RolloutBatch) -> RolloutBatch:
        last, self._last = self._last, None
        if kept.batch_size == 0:
            if self.when_empty == "skip" or last is None or last.advantages is None:
                return kept
            return last.replace(advantages=torch.zeros_like(last.advantages))
        if self.max_groups is None:
            return kept
        kept = _renumbered(kept)  # groups numbered in the order they were kept (earlier rounds first)
        return kept.select(kept.group_ids < self.max_groups)


class DropTruncated(Selector):
    """DAPO's overlong filtering (arXiv 2503.14476, §3.4): rows that hit the token budget without finishing are
    left out of the loss. Their rewards still entered the group statistics (advantages come first), as in DAPO.
    Raises if the rollout backend did not set ``batch.truncated``.
    """

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if rollouts.truncated is None:
            raise ValueError("DropTruncated needs RolloutBatch.truncated (B,) bool; this rollout backend does not set it")
        return _keep_rows(rollouts, ~rollouts.truncated.bool())


class DropAllCorrect(Selector):
    """NGRPO's group filter (arXiv 2509.18851; authors' code ``filter_groups.strategy=all_correct``): drop
    groups in which every row is correct. (With NGRPO's calibration such groups have A = 0 anyway; all-wrong
    groups are kept, since they are what NGRPO learns from.)

    Args:
        max_reward: None uses ``batch.correct``; a number counts a row as correct when its reward is >= it
            (the authors' criterion, reward == r_max).
    """

    def __init__(self, max_reward: float | None = None):
        self.max_reward = max_reward

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if self.max_reward is not None:
            correct = rollouts.rewards >= self.max_reward  # (B,)
        elif rollouts.correct is not None:
            correct = rollouts.correct.bool()
        else:
            raise ValueError("DropAllCorrect needs batch.correct (set by the domain's score) or max_reward")
        rollouts = _renumbered(rollouts)  # ids in [0, B) for the group statistics
        all_correct = group_min(correct.float(), rollouts.group_ids)[rollouts.group_ids] > 0  # (B,)
        return _keep_rows(rollouts, ~all_correct)


class Chain(Selector):
    """Several selectors in order: ``s_n(... s_1(rollouts))``; more rows are wanted while any member wants
    them, and every member's ``finalize`` runs in order.

    Args:
        selectors: the selectors, applied first to last.
    """

    def __init__(self, selectors: Sequence[Selector]):
        if not selectors:
            raise ValueError("selectors must name at least one selector")
        self.selectors = list(selectors)

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        for s in self.selectors:
            rollouts = s(rollouts)
        return rollouts

    def wants_more(self, kept: RolloutBatch) -> bool:
        return any(s.wants_more(kept) for s in self.selectors)

    def finalize(self, kept: RolloutBatch) -> RolloutBatch:
        for s in self.selectors:
            kept = s.finalize(kept)
        return kept
