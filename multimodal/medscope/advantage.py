"""GA-GRPO: group advantages modulated by an evidence (grounding) score — MedScope, arXiv 2602.13332.

The paper's framework figure feeds the evidence reward into a "modulator" combined with the group advantage; its
exact formula is not public. This is the design of shared/methods/domains.md §5 (b) [UNVERIFIED]:

    Â_i = GRPO(r)_i = (r_i − mean_g r) / (std_g r + eps)
    e_i = r_ground,i                           (the "grounding" reward component: best tool-window tIoU)
    multiplicative (default):  w_i = clip(1 + γ·sign(Â_i)·(e_i − mean_g e), w_min, w_max),   A_i = w_i·Â_i
    additive (``mode="additive"``):  A_i = Â_i + γ·z_g(e)_i,   z_g(e) = (e − mean_g e) / (std_g e + eps)

with γ = 0.5 and bounds [0.5, 1.5]: among successes the better-grounded get more credit, among failures the
ungrounded get a larger penalty. A group whose rewards are all equal keeps advantage exactly 0 in both forms (the
multiplicative form by construction, Â = 0; the additive term is switched off there, so a group with no reward
signal is not trained on its evidence alone), as is a group of one.

Named by import path in YAML: ``model.advantage: {class_path: multimodal.medscope.advantage.GAGRPO}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.ops import check_groups, group_max, group_min


def ga_grpo(rewards: Tensor, evidence: Tensor, group_ids: Tensor, *, gamma: float = 0.5, low: float = 0.5,
            high: float = 1.5, mode: Literal["multiplicative", "additive"] = "multiplicative", eps: float = 1e-6,
            num_groups: int | None = None) -> Tensor:
    """Evidence-weighted group advantages (module docstring). Shapes: rewards (B,), evidence (B,), group_ids (B,)
    -> (B,). All-equal groups and groups of one give exactly 0."""
    if mode not in ("multiplicative", "additive"):
        raise ValueError(f"mode must be 'multiplicative' or 'additive', got {mode!r}")
    if not 0 <= low <= 1 <= high:
        raise ValueError(f"the weight bounds must satisfy 0 <= low <= 1 <= high, got low={low}, high={high}")
    G = check_groups(rewards, group_ids, num_groups)
    if evidence.shape != rewards.shape or not bool(torch.isfinite(evidence).all()):
        raise ValueError(f"evidence must be finite and shaped like rewards {tuple(rewards.shape)}, got {tuple(evidence.shape)}")
    a_hat = grpo(rewards, group_ids, scale="group", eps=eps, num_groups=G)  # (B,)
    centred_e = grpo(evidence.to(rewards.dtype), group_ids, scale="none", num_groups=G)  # (B,) e − mean_g e
    if mode == "multiplicative":
        w = (1 + gamma * torch.sign(a_hat) * centred_e).clamp(low, high)  # (B,)
        return w * a_hat
    z = grpo(evidence.to(rewards.dtype), group_ids, scale="group", eps=eps, num_groups=G)  # (B,)
    varied = (group_max(rewards, group_ids, G) > group_min(rewards, group_ids, G))[group_ids]  # (B,)
    return a_hat + gamma * torch.where(varied, z, torch.zeros_like(z))


class GAGRPO(AdvantageEstimator):
    """GA-GRPO advantages from a RolloutBatch (see :func:`ga_grpo`); the evidence is the reward component named
    ``evidence`` (``batch.reward_components[:, batch.reward_names.index(evidence)]``, unweighted).

    Args:
        gamma: strength of the modulation γ.
        low, high: bounds of the multiplicative weight w.
        mode: "multiplicative" (the default design) or "additive" (the alternative).
        evidence: name of the reward component holding the evidence score.
        eps: added to the group std.
    """

    min_group_size = 2

    def __init__(self, gamma: float = 0.5, low: float = 0.5, high: float = 1.5,
                 mode: Literal["multiplicative", "additive"] = "multiplicative", evidence: str = "grounding",
                 eps: float = 1e-6):
        if mode not in ("multiplicative", "additive"):
            raise ValueError(f"mode must be 'multiplicative' or 'additive', got {mode!r}")
        if not 0 <= low <= 1 <= high:
            raise ValueError(f"low and high must satisfy 0 <= low <= 1 <= high, got low={low}, high={high}")
        if gamma < 0 or eps < 0:
            raise ValueError(f"gamma and eps must be >= 0, got gamma={gamma}, eps={eps}")
        self.gamma, self.low, self.high, self.mode, self.evidence, self.eps = gamma, low, high, mode, evidence, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B,)
        names = tuple(batch.reward_names)
        if self.evidence not in names or batch.reward_components is None:
            raise ValueError(f"GAGRPO: evidence={self.evidence!r} is not a reward component of this run (components: "
                             f"{list(names)}); add the grounding reward (multimodal.medscope.env.MedScopeReward "
                             "part=grounding, weight 0.3)")
        e = batch.reward_components[:, names.index(self.evidence)]  # (B,)
        return ga_grpo(batch.rewards, e, batch.group_ids, gamma=self.gamma, low=self.low, high=self.high,
                       mode=self.mode, eps=self.eps)


__all__ = ["GAGRPO", "ga_grpo"]
