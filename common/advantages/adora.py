"""ADORA: Advantage Dynamics via Online Rollout Adaptation (arXiv 2602.10019; authors' code ShadeCloak/ADORA).

A prompt's group is *temporarily advantageous* (TAS) when its longest correct completion is longer than its
average wrong one; other groups (TDS) have their advantages attenuated by λ. This tilts updates toward long,
reflective correct reasoning. The rule is the authors' LLM code
(``ADORA/verl/trainer/ppo/core_algos.py::compute_grpo_outcome_advantage_ADORA``); the paper's "Difficulty
Advantage" criterion and its amplification factor for strong models could not be verified and are not
implemented (``tas_weight`` ≠ 1 gives amplification, with a value of your choosing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.ops import check_groups, group_max, group_sum


def adora_weights(
    correct: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    *,
    truncated: Tensor | None = None,
    lam: float = 0.1,
    tas_weight: float = 1.0,
    num_groups: int | None = None,
) -> Tensor:
    """Per-row weight of ADORA's length rule (authors' LLM code).

        P_g = {i : correct_i},   N_g = {i : not correct_i and not truncated_i}      truncated wrongs are ignored
        ℓ⁺_g = max_{i∈P_g} L_i   (−∞ if P_g = ∅),     ℓ⁻_g = mean_{i∈N_g} L_i   (−∞ if N_g = ∅)
        w_i = tas_weight if ℓ⁺_{g_i} > ℓ⁻_{g_i} (TAS) else lam (TDS)

    So a group with no correct answer is TDS (λ) and a group with correct answers and no counted wrong one is
    TAS (LLM code; the VLM code instead treats P_g = ∅ as TAS). Shapes: correct (B,) bool, lengths (B,),
    group_ids (B,), truncated (B,) bool or None -> (B,) float.
    """
    num_groups = check_groups(lengths, group_ids, num_groups, "lengths")
    check_groups(correct, group_ids, num_groups, "correct")
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor (B,), got {correct.dtype}")
    if truncated is not None:
        check_groups(truncated, group_ids, num_groups, "truncated")
    if lam < 0 or tas_weight < 0:
        raise ValueError(f"lam and tas_weight must be >= 0, got lam={lam}, tas_weight={tas_weight}")
    L = lengths.to(torch.float32)  # (B,)
    neg_inf = torch.full_like(L, -torch.inf)
    longest_right = group_max(torch.where(correct, L, neg_inf), group_ids, num_groups)  # (N,) -inf if none
    has_right = group_sum(correct.float(), group_ids, num_groups) > 0  # (N,)
    counted = ~correct if truncated is None else ~correct & ~truncated  # (B,) N_g members
    n_wrong = group_sum(counted.float(), group_ids, num_groups)  # (N,)
    mean_wrong = group_sum(torch.where(counted, L, torch.zeros_like(L)), group_ids, num_groups) / n_wrong.clamp(min=1)
    mean_wrong = torch.where(n_wrong > 0, mean_wrong, torch.full_like(mean_wrong, -torch.inf))  # (N,)
    tas = has_right & (longest_right > mean_wrong)  # (N,)
    return torch.where(tas, L.new_tensor(tas_weight), L.new_tensor(lam))[group_ids]  # (B,)


class ADORA(AdvantageEstimator):
    """ADORA: a base estimator's advantages times :func:`adora_weights` (per group, broadcast over tokens).

    Args:
        base: the estimator whose advantages are re-weighted (default GRPO, as in the authors' LLM code). A base
            that returns ``(advantages, keep)`` keeps its ``keep``.
        lam: weight λ of temporarily disadvantageous groups (authors' code 0.1).
        tas_weight: weight of advantageous groups (1 = authors' code; > 1 is the paper's amplification mode,
            whose value is unverified).
        correct_threshold: a row is correct when its reward exceeds this (authors' code 0.5 for 0/1 rewards,
            1.01 on Logic-RL's [-3, 3] scale); None uses the verifier's ``batch.correct``.
    """

    def __init__(self, base: AdvantageEstimator | None = None, lam: float = 0.1, tas_weight: float = 1.0,
                 correct_threshold: float | None = 0.5):
        if lam < 0 or tas_weight < 0:
            raise ValueError(f"lam and tas_weight must be >= 0, got lam={lam}, tas_weight={tas_weight}")
        self.base = base if base is not None else GRPO()
        self.min_group_size = self.base.min_group_size  # a re-weighting: zero stays zero
        self.lam, self.tas_weight, self.correct_threshold = lam, tas_weight, correct_threshold

    def __call__(self, batch: RolloutBatch) -> Tensor | tuple[Tensor, Tensor]:
        out = self.base(batch)
        advantages, keep = out if isinstance(out, tuple) else (out, None)
        if self.correct_threshold is None:
            if batch.correct is None:
                raise ValueError("ADORA(correct_threshold=None) needs batch.correct (set by the domain's score); "
                                 "set correct_threshold to classify rows by reward instead")
            correct = batch.correct.bool()
        else:
            check_rewards(batch.rewards)
            correct = batch.rewards > self.correct_threshold  # (B,)
        w = adora_weights(correct, batch.lengths, batch.group_ids, truncated=batch.truncated, lam=self.lam,
                          tas_weight=self.tas_weight)  # (B,)
        advantages = advantages * (w if advantages.dim() == 1 else w[:, None]).to(advantages.dtype)
        return advantages if keep is None else (advantages, keep)
