"""Generalised advantage estimation for token-level critics, with T-PPO's extension to truncated responses.

T-PPO: "Truncated Proximal Policy Optimization" (ByteDance Seed, arXiv 2506.15050). A response that has not
finished inside the generation window has no reward yet; Extended GAE (EGAE) still gives its tokens an
advantage by bootstrapping the unknown value of the next state with the last known one:

    complete response (L tokens, outcome reward R on its last token, V(s_L) = 0):
        r_t = R·[t = L−1],   δ_t = r_t + γ V(s_{t+1}) − V(s_t),   Â_t = Σ_{k=0}^{L−1−t} (γλ)^k δ_{t+k}     (GAE)
    truncated response with l generated tokens (EGAE):
        V(s_l) := V(s_{l−1}),  r_t = 0,   δ_{l−1} = (γ − 1) V(s_{l−1})   (= 0 for γ = 1)

The state s_t is the prompt and the first t completion tokens; V(s_t) is read from the hidden state that
predicts token t. If V is exact every δ has conditional mean zero, so the truncated sum has the same mean as
the full one: truncation loses variance reduction, never adds bias.

Value targets are λ_critic = 1 returns (VC-PPO, arXiv 2503.01491, which T-PPO builds on), taken on complete
responses only ("token filtering"): G_t = γ^{L−1−t} R, the discounted Monte-Carlo return, which needs no
stored values.

Both sums are a discounted reverse cumulative sum along T, computed as one product with the (T, T) matrix
W[t, k] = c^{k−t}·[k ≥ t] (no loop over tokens; O(T²) memory, 64 MB at T = 4096 in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards


def discounted_cumsum(x: Tensor, discount: float) -> Tensor:
    """y_t = Σ_{k ≥ t} discount^{k−t} x_k along the last dim. Shapes: (B, T) -> (B, T)."""
    T = x.shape[-1]
    pos = torch.arange(T, device=x.device)
    gap = pos[None, :] - pos[:, None]  # (T, T) k − t
    weights = torch.where(gap >= 0, torch.tensor(discount, dtype=x.dtype, device=x.device).pow(gap.clamp(min=0)),
                          torch.zeros((), dtype=x.dtype, device=x.device))  # (T, T); 0^0 = 1 on the diagonal
    return x @ weights.T  # (B, T)


def _check(rewards: Tensor, values: Tensor, mask: Tensor, truncated: Tensor, gamma: float, lam: float) -> None:
    check_rewards(rewards)
    B = rewards.shape[0]
    if values.dim() != 2 or values.shape[0] != B or mask.shape != values.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be (B, T) with "
                         f"B = {B} rows like rewards")
    if mask.dtype != torch.bool or truncated.dtype != torch.bool or truncated.shape != (B,):
        raise ValueError(f"mask must be a bool (B, T) and truncated a bool (B,) tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)} and {truncated.dtype} {tuple(truncated.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < mask.sum(1, keepdim=True)  # (B, T)
    if not bool((prefix == mask).all()):  # ok: input check, one sync per call
        raise ValueError("mask must mark a prefix of each row (right-padded completions), got gaps in some rows")


def egae(rewards: Tensor, values: Tensor, mask: Tensor, truncated: Tensor, *, gamma: float = 1.0,
         lam: float = 0.95) -> Tensor:
    """Token advantages by GAE for complete rows and EGAE for truncated rows (module docstring).

    Shapes: rewards (B,) outcome reward (ignored for truncated rows), values (B, T) V(s_t), mask (B, T) bool
    prefix of valid tokens, truncated (B,) bool -> advantages (B, T), 0 off the mask (an empty row is all 0).
    """
    _check(rewards, values, mask, truncated, gamma, lam)
    values = values.masked_fill(~mask, 0.0)  # (B, T)
    L = mask.sum(1)  # (B,)
    pos = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = pos[None, :] == (L - 1)[:, None]  # (B, T) the final valid token
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T) V(s_{t+1}), 0 past T
    bootstrap = torch.where(truncated[:, None], values, torch.zeros_like(values))  # V(s_l) := V(s_{l−1}) or 0
    next_values = torch.where(last, bootstrap, next_values)  # (B, T)
    token_rewards = torch.where(last & ~truncated[:, None], rewards[:, None].to(values.dtype), torch.zeros_like(values))
    delta = (token_rewards + gamma * next_values - values).masked_fill(~mask, 0.0)  # (B, T) δ_t
    return discounted_cumsum(delta, gamma * lam).masked_fill(~mask, 0.0)


def value_targets(rewards: Tensor, mask: Tensor, truncated: Tensor, *, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """λ_critic = 1 value targets G_t = γ^{L−1−t} R on complete rows, and the mask of tokens the value loss may
    use (complete rows only: truncated rows have no return yet). Shapes: (B,), (B, T), (B,) -> (B, T), (B, T)."""
    _check(rewards, torch.zeros(mask.shape, device=mask.device), mask, truncated, gamma, 0.0)
    L = mask.sum(1)  # (B,)
    last = torch.arange(mask.shape[1], device=mask.device)[None, :] == (L - 1)[:, None]  # (B, T)
    token_rewards = torch.where(last, rewards[:, None].float(), torch.zeros(mask.shape, device=mask.device))  # (B, T)
    value_mask = mask & ~truncated[:, None]  # (B, T)
    return discounted_cumsum(token_rewards, gamma).masked_fill(~value_mask, 0.0), value_mask


class EGAE(AdvantageEstimator):
    """Token-level (B, T) advantages from a critic's values: GAE on complete rows, EGAE on truncated ones.

    Unlike the group estimators it reads the critic's ``batch.values (B, T)``, which a method provides (T-PPO's
    ``common.methods.tppo.TruncatedPPO``, listed in ``methods``); a run without one fails at start-up.

    Args:
        gamma: discount γ (T-PPO, like VC-PPO, uses 1 for outcome rewards).
        lam: GAE λ of the policy's advantages (VC-PPO's λ_actor ≈ 0.95; T-PPO's value not verified).
    """

    requires = ("values", "truncated")

    def __init__(self, gamma: float = 1.0, lam: float = 0.95):
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma, self.lam = gamma, lam

    def __call__(self, batch) -> Tensor:
        batch.require("EGAE (list common.methods.tppo.TruncatedPPO in methods)", "values", "truncated")
        return egae(batch.rewards, batch.values, batch.completion_mask, batch.truncated, gamma=self.gamma, lam=self.lam)
