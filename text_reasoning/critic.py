"""T-PPO on reasoning tasks: PPO with a critic (a value head on the policy's hidden states) and Extended GAE.

"Truncated Proximal Policy Optimization" (ByteDance Seed, arXiv 2506.15050). Each step:

    values     V(s_t) = ValueHead(h_t)                         h_t: the hidden state that predicts token t
    advantages Â = EGAE(R, V, m, truncated; γ, λ)               (common/advantages/gae.py)
    loss       = PPO-clip(Â) over every generated token          complete and truncated responses
               + c_v · ½ Σ m_c (V − G)² / N                      value loss on complete responses only (m_c)

A response that reaches the token budget without EOS is "truncated": T-PPO's in-flight response. Its tokens
train the policy with EGAE advantages (V(s_l) := V(s_{l−1})) and never the value head ("token filtering"), so
the policy and the critic are optimised independently. With ``detach_critic`` (default) the value loss does
not reach the shared backbone, which is what a separate critic model gives; the head has its own parameter
group (``value_lr``) in the one AdamW optimiser, so its weights and moments are in the checkpoint.

Simplified here (see the T-PPO report): an unfinished response is not carried into the next step's window
(successive batching); it is trained on once, with EGAE, and dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from common.advantages.gae import EGAE, value_targets
from common.batch import RolloutBatch
from common.critic import ValueHead, value_loss
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from text_reasoning.module import TextReasoningModule


class TruncatedPPOModule(TextReasoningModule):
    """Reasoning tasks trained by T-PPO (critic + EGAE). ``advantage`` must be ``common.advantages.gae.EGAE``.

    Args:
        value_hidden: width of the value head's hidden layer (0 = linear head on the hidden states).
        value_coef: c_v, weight of the value loss.
        value_lr: learning rate of the value head (None = ``lr``).
        detach_critic: the value loss trains only the head, not the shared backbone (a separate critic's
            independence); False lets it shape the policy's features too.
        **kwargs: everything of :class:`text_reasoning.module.TextReasoningModule`.
    """

    def __init__(self, *args: Any, value_hidden: int = 0, value_coef: float = 1.0, value_lr: float | None = None,
                 detach_critic: bool = True, **kwargs: Any):
        kwargs.setdefault("advantage", EGAE())
        super().__init__(*args, **kwargs)
        if not isinstance(self.advantage, EGAE):
            raise ValueError(f"advantage must be common.advantages.gae.EGAE for the critic module, got {type(self.advantage).__name__}")
        if value_coef < 0 or (value_lr is not None and value_lr <= 0):
            raise ValueError(f"value_coef must be >= 0 and value_lr > 0 or None, got {value_coef}, {value_lr}")
        self.critic = ValueHead(self.policy.config.hidden_size, value_hidden)
        self.value_coef, self.value_lr, self.detach_critic = value_coef, value_lr, detach_critic
        self._hidden: Tensor | None = None  # (B, T, H) of the latest policy forward, read by auxiliary_loss

    def completion_hidden(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        self._hidden = super().completion_hidden(model, batch)  # (B, T, H)
        return self._hidden

    @torch.no_grad()
    def values(self, rollouts: RolloutBatch) -> Tensor:
        """V(s_t) for every completion position, under the current critic. Shapes: -> (B, T), 0 off the mask."""
        out = []
        for micro in rollouts.split(self.micro_batch_size or rollouts.batch_size):
            out.append(self.critic(self.completion_hidden(self.policy, micro)).masked_fill(~micro.completion_mask, 0.0))
        return torch.cat(out)

    def estimate_advantages(self, rollouts: RolloutBatch) -> Tensor:
        return self.advantage(rollouts, self.values(rollouts))  # (B, T)

    def auxiliary_loss(self, micro: RolloutBatch, out: LossOutput, normaliser: Normaliser) -> LossOutput:
        """Adds c_v · ½ Σ m_c (V − G)² / N: complete rows only, N = the minibatch's token count."""
        h = self._hidden.detach() if self.detach_critic else self._hidden  # (B, T, H)
        v = self.critic(h)  # (B, T)
        truncated = micro.truncated if micro.truncated is not None else torch.zeros_like(micro.group_ids, dtype=torch.bool)
        targets, value_mask = value_targets(micro.rewards, micro.completion_mask, truncated, gamma=self.advantage.gamma)
        vloss = value_loss(v, targets, value_mask, normaliser.num_tokens)
        metrics = {**out.metrics, "value_loss": vloss.detach(),
                   "value_tokens": value_mask.sum().float() / normaliser.num_tokens}
        return LossOutput(loss=out.loss + self.value_coef * vloss, metrics=metrics)

    def configure_optimizers(self):
        policy = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": policy}, {"params": list(self.critic.parameters()), "lr": self.value_lr or self.lr}],
                                 lr=self.lr, weight_decay=self.weight_decay)
