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

Successive batching (``max_windows > 1``): a response still unfinished after a window of ``max_new_tokens``
tokens stays in flight; the next step continues it for another window (its prompt is then the problem plus
everything generated so far, its completion the new window) next to the step's fresh prompts, until it ends or
has used ``max_windows`` windows (then it is final: scored and trained on like a complete response). The
in-flight responses are an ``nn.Module``'s extra state, so they are in the checkpoint and a resumed run
continues them exactly. Simplified (see the T-PPO report): fresh prompts are not reduced to keep the batch size
constant, and the value loss of a response that ends in a later window covers that window's tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.advantages.gae import EGAE, value_targets
from common.batch import RolloutBatch
from common.critic import ValueHead, value_loss
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from text_reasoning.module import TextReasoningModule


class InFlight(nn.Module):
    """Responses carried to the next generation window (T-PPO's in-flight sequences), checkpointed as extra state.

    Each row: ``context`` (token ids of prompt + everything generated, unpadded), ``text`` (the completion text so
    far), ``sample`` (the problem's dict) and ``window`` (windows used)."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    def get_extra_state(self) -> dict:
        return {"rows": self.rows}  # plain lists, dicts, ints and strings: loadable with weights_only=True

    def set_extra_state(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]

    def pop_all(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


class TruncatedPPOModule(TextReasoningModule):
    """Reasoning tasks trained by T-PPO (critic + EGAE). ``advantage`` must be ``common.advantages.gae.EGAE``.

    Args:
        value_hidden: width of the value head's hidden layer (0 = linear head on the hidden states).
        value_coef: c_v, weight of the value loss.
        value_lr: learning rate of the value head (None = ``lr``).
        detach_critic: the value loss trains only the head, not the shared backbone (a separate critic's
            independence); False lets it shape the policy's features too.
        max_windows: windows of ``sampling.max_new_tokens`` tokens a response may use (1 = an unfinished
            response is trained on once with EGAE and dropped; > 1 = successive batching).
        **kwargs: everything of :class:`text_reasoning.module.TextReasoningModule`.
    """

    def __init__(self, *args: Any, value_hidden: int = 0, value_coef: float = 1.0, value_lr: float | None = None,
                 detach_critic: bool = True, max_windows: int = 1, **kwargs: Any):
        kwargs.setdefault("advantage", EGAE())
        super().__init__(*args, **kwargs)
        if not isinstance(self.advantage, EGAE):
            raise ValueError(f"advantage must be common.advantages.gae.EGAE for the critic module, got {type(self.advantage).__name__}")
        if value_coef < 0 or (value_lr is not None and value_lr <= 0) or max_windows < 1:
            raise ValueError(f"value_coef must be >= 0, value_lr > 0 or None, max_windows >= 1; got {value_coef}, "
                             f"{value_lr}, {max_windows}")
        self.critic = ValueHead(self.policy.config.hidden_size, value_hidden)
        self.value_coef, self.value_lr, self.detach_critic = value_coef, value_lr, detach_critic
        self.max_windows, self.in_flight = max_windows, InFlight()
        self._hidden: Tensor | None = None  # (B, T, H) of the latest policy forward, read by auxiliary_loss
        self._collecting = False  # training rollouts continue in-flight responses; validation ones do not

    def collect(self, prompts: Any) -> tuple[RolloutBatch, RolloutBatch, float]:
        self._collecting = True
        try:
            return super().collect(prompts)
        finally:
            self._collecting = False

    def rollout(self, prompts: Sequence[dict], *, greedy: bool = False, num_samples: int | None = None) -> RolloutBatch:
        """Fresh prompts (G samples each) plus, in training with ``max_windows > 1``, one more window of every
        in-flight response. Unfinished responses with windows left go (back) in flight; the others are final."""
        batch = super().rollout(prompts, greedy=greedy, num_samples=num_samples)
        if not self._collecting or self.max_windows == 1:
            return batch
        carried = self.in_flight.pop_all()
        if carried:
            pad = self.tokenizer.pad_token_id
            width = max(len(r["context"]) for r in carried)
            ids = torch.tensor([[pad] * (width - len(r["context"])) + r["context"] for r in carried], device=self.device)
            mask = torch.arange(width, device=self.device)[None, :] >= torch.tensor(
                [width - len(r["context"]) for r in carried], device=self.device)[:, None]  # (N, width) left padding
            more = self.backend.generate(self.policy, self.tokenizer, ids, mask, 1, self.sampling)
            more = more.replace(samples=[{**r["sample"], "window": r["window"] + 1} for r in carried],
                                completions=[r["text"] + c for r, c in zip(carried, more.completions)])
            fresh = batch.replace(samples=[{**s, "window": 1} for s in batch.samples])
            batch = RolloutBatch.cat([fresh, more])
        windows = torch.tensor([s.get("window", 1) for s in batch.samples], device=self.device)  # (B,)
        still = batch.truncated & (windows < self.max_windows)  # (B,) goes (back) in flight
        for i in still.nonzero().flatten().tolist():  # ok: host-side bookkeeping of the in-flight rows
            context = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i]], batch.completion_ids[i][batch.completion_mask[i]]])
            self.in_flight.rows.append({"context": context.tolist(), "text": batch.completions[i],
                                        "sample": {k: v for k, v in batch.samples[i].items() if k != "window"},
                                        "window": int(windows[i])})
        return batch.replace(truncated=still)  # out of windows: final, scored and fitted like a complete response

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
