"""POAD's critic: a token-level value head, its values for BAD GAE, and the clipped value loss.

"Reinforcing LLM Agents via Policy Optimization with Action Decomposition" (Wen et al., NeurIPS 2024,
arXiv 2405.15821; ADRL ``mappo/trainers/llm_trainer_tppo.py``); shared/methods/agentic.md §5. Each step:

    values      V_j^t = ValueHead(h)          h: the hidden state that predicts token j of action t (common/critic.py)
    advantages  Â = BAD-GAE(r, V; γ, λ)        the loop's estimator, ``common.advantages.poad.POAD``
    value loss  c_v · ½ Σ m · max((V − V̂)², (V_old + clip(V − V_old, ±ε_v) − V̂)²) / N,   V̂ = Â_raw + V_old

(PPO's clipped value loss, ADRL's default with ε_v = 0.2, c_v = 0.5). Only action tokens (``loss_mask``) count;
environment tokens are context for the critic too. The targets are recomputed per micro-batch from the
un-whitened BAD advantages of its rows (each row is a whole episode, so a row's targets do not depend on the
others). ``detach_critic`` (default) keeps the value loss off the shared backbone, as ADRL's separate critic
(the value head run with the LoRA adapter disabled) would; the head has its own parameter group (``value_lr``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.advantages.poad import POAD
from common.batch import RolloutBatch
from common.critic import ValueHead
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.methods.base import Method
from common.policies.base import PolicyOutput

if TYPE_CHECKING:
    from common.loop import Loop


def clipped_value_loss(values: Tensor, old_values: Tensor, targets: Tensor, mask: Tensor, num_tokens: Tensor,
                       clip: float | None) -> Tensor:
    """½ Σ m·max((V − V̂)², (V_old + clip(V − V_old, ±clip) − V̂)²) / N (PPO's clipped value loss; clip None: plain
    MSE). Shapes: (B, T) x4, () -> ()."""
    err = (values - targets) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - targets) ** 2)
    return 0.5 * torch.where(mask, err, torch.zeros_like(err)).sum() / num_tokens


class POADCritic(Method):
    """The token-level critic of POAD (module docstring). The loop's ``advantage`` must be
    ``common.advantages.poad.POAD``; the policy must return hidden states (a causal LM, or the multi-turn agent).

    Args:
        value_hidden: width of the value head's hidden layer (0 = linear).
        value_coef: c_v (ADRL 0.5).
        value_clip: ε_v of the clipped value loss (ADRL 0.2; None = plain MSE).
        value_lr: learning rate of the head (None = the module's lr; ADRL's critic lr 5e-5).
        detach_critic: the value loss trains the head only, not the shared backbone.
    """

    provides = ("values",)
    needs_hidden = True

    def __init__(self, value_hidden: int = 0, value_coef: float = 0.5, value_clip: float | None = 0.2,
                 value_lr: float | None = None, detach_critic: bool = True):
        super().__init__()
        if value_hidden < 0 or value_coef < 0 or (value_clip is not None and value_clip <= 0) or \
                (value_lr is not None and value_lr <= 0):
            raise ValueError(f"POADCritic: value_hidden must be >= 0, value_coef >= 0, value_clip > 0 or None, value_lr "
                             f"> 0 or None; got {value_hidden}, {value_coef}, {value_clip}, {value_lr}")
        self.value_hidden, self.value_coef, self.value_clip, self.value_lr = value_hidden, value_coef, value_clip, value_lr
        self.detach_critic = detach_critic
        self.critic: ValueHead | None = None  # built in setup, once the policy's hidden width is known
        self.estimator: POAD | None = None

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.advantage, POAD):
            raise ValueError("POADCritic: the advantage must be common.advantages.poad.POAD (it reads the critic's "
                             f"values), got {type(loop.advantage).__name__}")
        self.estimator = loop.advantage
        if self.critic is None:
            lm = getattr(loop.policy, "lm", loop.policy)
            self.critic = ValueHead(lm.model.config.hidden_size, self.value_hidden)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.critic.parameters()), "lr": self.value_lr or lr}]

    @torch.no_grad()
    def values(self, loop: "Loop", batch: RolloutBatch) -> Tensor:
        """V for every completion position under the current critic, 0 off the loss mask. -> (B, T)."""
        out = []
        for micro in batch.split(loop.micro_batch_size or batch.batch_size):
            hidden = loop.policy(micro, hidden=True).hidden  # (b, T, H)
            out.append(self.critic(hidden).float().masked_fill(~micro.loss_mask, 0.0))
        return torch.cat(out)

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        return batch.replace(values=self.values(loop, batch))

    def extra_loss(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput:
        h = out.hidden.detach() if self.detach_critic else out.hidden  # (B, T, H)
        v = self.critic(h).float()  # (B, T)
        with torch.no_grad():
            targets = self.estimator.raw(micro) + micro.values  # (B, T) V̂ = Â_raw + V_old
        vloss = clipped_value_loss(v, micro.values, targets, micro.loss_mask, normaliser.num_tokens, self.value_clip)
        return LossOutput(loss=self.value_coef * vloss, metrics={"value_loss": vloss.detach()})

    def extra_repr(self) -> str:
        return (f"value_hidden={self.value_hidden}, value_coef={self.value_coef}, value_clip={self.value_clip}, "
                f"value_lr={self.value_lr}, detach_critic={self.detach_critic}")


__all__ = ["POADCritic", "clipped_value_loss"]
