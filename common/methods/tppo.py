"""T-PPO: PPO with a critic (a value head on the policy's hidden states), Extended GAE and successive batching.

"Truncated Proximal Policy Optimization" (ByteDance Seed, arXiv 2506.15050). Each step:

    values     V(s_t) = ValueHead(h_t)                         h_t: the hidden state that predicts token t
    advantages Â = EGAE(R, V, m, truncated; γ, λ)               (common/advantages/gae.py)
    loss       = PPO-clip(Â) over every generated token          complete and truncated responses
               + c_v · ½ Σ m_c (V − G)² / N                      value loss on complete responses only (m_c)

A response that reaches the token budget without EOS is "truncated": T-PPO's in-flight response. Its tokens
train the policy with EGAE advantages (V(s_l) := V(s_{l−1})) and never the value head ("token filtering"), so
the policy and the critic are optimised independently. With ``detach_critic`` (default) the value loss does
not reach the shared backbone, which is what a separate critic model gives; the head has its own parameter
group (``value_lr``) in the one optimiser, so its weights and moments are in the checkpoint.

Successive batching (``max_windows > 1``): a response still unfinished after a window of ``max_new_tokens``
tokens stays in flight; the next training step continues it for another window (its prompt is then the problem
plus everything generated so far, its completion the new window) next to the step's fresh prompts, until it ends
or has used ``max_windows`` windows (then it is final: scored and trained on like a complete response). The
in-flight responses are extra state, so they are in the checkpoint and a resumed run continues them exactly.
Only training rollouts reach ``after_rollout``; validation samples from the policy directly and never touches
them. Simplified (see the T-PPO report): fresh prompts are not reduced to keep the batch size constant, and the
value loss of a response that ends in a later window covers that window's tokens only.

Components it wires (one method, one ``methods:`` entry):
    estimator   ``common.advantages.gae.EGAE`` (the loop's ``advantage``, checked in ``setup``), reads ``values``
    critic      ``common.critic.ValueHead`` on the policy's hidden states; loss ``common.critic.value_loss``
    targets     ``common.advantages.gae.value_targets`` (λ_critic = 1 returns on complete rows)
    policy      a ``CausalLMPolicy`` (hidden states; ``generate`` continues in-flight responses)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from common.advantages.gae import EGAE, value_targets
from common.batch import RolloutBatch
from common.critic import ValueHead, value_loss
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.methods.base import Method
from common.policies.base import PolicyOutput
from common.policies.causal_lm import CausalLMPolicy

if TYPE_CHECKING:
    from common.loop import Loop


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


class TruncatedPPO(Method):
    """T-PPO's critic, value loss and in-flight responses (module docstring). The loop's ``advantage`` must be
    ``common.advantages.gae.EGAE`` and the policy a ``CausalLMPolicy``.

    Args:
        value_hidden: width of the value head's hidden layer (0 = linear head on the hidden states).
        value_coef: c_v, weight of the value loss.
        value_lr: learning rate of the value head (None = the module's ``lr``).
        detach_critic: the value loss trains only the head, not the shared backbone (a separate critic's
            independence); False lets it shape the policy's features too.
        max_windows: windows of ``sampling.max_new_tokens`` tokens a response may use (1 = an unfinished
            response is trained on once with EGAE and dropped; > 1 = successive batching).
    """

    requires = ("truncated",)
    provides = ("values", "window")
    needs_hidden = True

    def __init__(self, value_hidden: int = 0, value_coef: float = 1.0, value_lr: float | None = None,
                 detach_critic: bool = True, max_windows: int = 1):
        super().__init__()
        if value_hidden < 0 or value_coef < 0 or (value_lr is not None and value_lr <= 0) or max_windows < 1:
            raise ValueError(f"TruncatedPPO: value_hidden must be >= 0, value_coef >= 0, value_lr > 0 or None, "
                             f"max_windows >= 1; got {value_hidden}, {value_coef}, {value_lr}, {max_windows}")
        self.value_hidden, self.value_coef, self.value_lr = value_hidden, value_coef, value_lr
        self.detach_critic, self.max_windows = detach_critic, max_windows
        self.critic: ValueHead | None = None  # built in setup, once the policy's hidden width is known
        self.in_flight = InFlight()

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.advantage, EGAE):
            raise ValueError("TruncatedPPO: the advantage must be common.advantages.gae.EGAE (it reads the critic's "
                             f"values), got {type(loop.advantage).__name__}")
        if not isinstance(loop.policy, CausalLMPolicy):
            raise ValueError(f"TruncatedPPO: the policy must be a CausalLMPolicy, got {type(loop.policy).__name__}")
        if self.critic is None:
            self.critic = ValueHead(loop.policy.model.config.hidden_size, self.value_hidden)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.critic.parameters()), "lr": self.value_lr or lr}]

    # ------------------------------------------------------------------ step 1 -> 2: successive batching
    def after_rollout(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        """Fresh rows (``window`` 1) plus, with ``max_windows > 1``, one more window of every in-flight response.
        Unfinished responses with windows left go (back) in flight; the others are final (``truncated`` False)."""
        batch = batch.replace(window=torch.ones_like(batch.group_ids))  # (B,) fresh responses
        if self.max_windows == 1:
            return batch
        carried = self.in_flight.pop_all()
        if carried:
            policy, device = loop.policy, batch.group_ids.device
            width = max(len(r["context"]) for r in carried)
            pad = policy.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(r["context"])) + r["context"] for r in carried], device=device)
            mask = torch.arange(width, device=device)[None, :] >= torch.tensor(
                [width - len(r["context"]) for r in carried], device=device)[:, None]  # (N, width) left padding
            more = policy.generate(ids, mask, 1)
            more = more.replace(samples=[dict(r["sample"]) for r in carried],
                                completions=[r["text"] + c for r, c in zip(carried, more.completions)],
                                window=torch.tensor([r["window"] + 1 for r in carried], device=device))
            batch = RolloutBatch.cat([batch, more])
        still = batch.truncated & (batch.window < self.max_windows)  # (B,) goes (back) in flight
        for i in still.nonzero().flatten().tolist():  # ok: host-side bookkeeping of the in-flight rows
            context = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i]], batch.completion_ids[i][batch.completion_mask[i]]])
            self.in_flight.rows.append({"context": context.tolist(), "text": batch.completions[i],
                                        "sample": dict(batch.samples[i]), "window": int(batch.window[i])})
        return batch.replace(truncated=still)  # out of windows: final, scored and fitted like a complete response

    # ------------------------------------------------------------------ step 2 -> 4: the critic's values
    @torch.no_grad()
    def values(self, loop: "Loop", batch: RolloutBatch) -> Tensor:
        """V(s_t) for every completion position, under the current critic. Shapes: -> (B, T), 0 off the mask."""
        out = []
        for micro in batch.split(loop.micro_batch_size or batch.batch_size):
            hidden = loop.policy(micro, hidden=True).hidden  # (b, T, H)
            out.append(self.critic(hidden).masked_fill(~micro.completion_mask, 0.0))
        return torch.cat(out)

    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        return batch.replace(values=self.values(loop, batch))  # EGAE reads batch.values

    # ------------------------------------------------------------------ step 6: the value loss
    def extra_loss(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput:
        """c_v · ½ Σ m_c (V − G)² / N: complete rows only, N = the minibatch's token count."""
        h = out.hidden.detach() if self.detach_critic else out.hidden  # (B, T, H)
        v = self.critic(h)  # (B, T)
        targets, value_mask = value_targets(micro.rewards, micro.completion_mask, micro.truncated, gamma=loop.advantage.gamma)
        vloss = value_loss(v, targets, value_mask, normaliser.num_tokens)
        return LossOutput(loss=self.value_coef * vloss, metrics={
            "value_loss": vloss.detach(), "value_tokens": value_mask.sum().float() / normaliser.num_tokens})

    def extra_repr(self) -> str:
        return (f"value_hidden={self.value_hidden}, value_coef={self.value_coef}, value_lr={self.value_lr}, "
                f"detach_critic={self.detach_critic}, max_windows={self.max_windows}")
