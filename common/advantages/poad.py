"""POAD: token-level advantages by the Bellman backup with Action Decomposition (BAD), from a token-level critic.

"Reinforcing LLM Agents via Policy Optimization with Action Decomposition" (Wen et al., NeurIPS 2024,
arXiv 2405.15821, §4, eqs. 5-7; authors' code morning9393/ADRL ``mappo/utils/language_buffer.py``,
``batch_process_tppo``); shared/methods/agentic.md §5.

A language action a_t is a token sequence w_t^1..w_t^{|a_t|}. V_j^t := V(s_t, w_t^{1:j−1}) is the critic's value
*before* token j (read from the hidden state that predicts token j, as ``common.critic.ValueHead`` on the policy's
hidden states gives it). BAD puts no reward and no discount between the tokens of one action, and the environment's
reward r_t and discount γ only at the action boundary (m_{t+1} = 0 when the episode ended at t):

    intra-action (j < |a_t|):   δ_{t,j}   = V_{j+1}^t − V_j^t                          Â_{t,j}   = δ_{t,j} + λ·Â_{t,j+1}
    boundary     (j = |a_t|):   δ_{t,|a|} = r_t + γ·m_{t+1}·V_1^{t+1} − V_{|a|}^t      Â_{t,|a|} = δ_{t,|a|} + γλ·m_{t+1}·Â_{t+1,1}
    value target                V̂ = Â + V

With λ = 1 the intra-action δ's telescope, so the first token's advantage is the action-level one,
r_t + γ V(s_{t+1}) − V(s_t) (+ the γλ tail), and the action's tokens share it out. NTPO (token-level PPO with the
per-token discount, the paper's baseline, ``mode="ntpo"``) instead uses δ = γ·V_{j+1} − V_j and decays by γλ at
every token: longer actions are discounted more (agentic.md §5 (e): NTPO prefers a worse, shorter action).

Vectorised form (agentic.md §5 (b)): each row's action tokens (``loss_mask``; environment tokens skipped) are packed
to the left in order, so that along the packed axis k the arrays are

    ρ_k = r_{t(k)} at the last token of a turn, else 0;      g_k = γ·m at the last token of a turn, else 1 (NTPO: γ)
    V_next_k = V_{k+1} (the next turn's first token across a boundary, 0 after the episode's last token)
    δ_k = ρ_k + g_k·V_next_k − V_k,        Â_k = δ_k + λ·g_k·Â_{k+1}

and one backward loop runs over the packed token axis (≤ T steps, vectorised over rows), never over samples.

Rewards r_t: ``turn_rewards (B, K)`` (column k = turn ``turn_ids + k``) when the batch carries them, plus whatever of
the row's reward they leave out (R − Σ_t r_t, e.g. an end-reason reward) on the last action token; otherwise the
outcome reward ``rewards (B,)`` on the episode's last action token (r_t = 0 before). Each row must hold a whole
episode (layout B of agentic.md §1, one sequence per episode, or single-turn rows): a row's last action token ends
its episode (m = 0; a truncated episode is not bootstrapped).

POAD's code whitens the advantages by the mean/std over the **non-zero** entries of the batch (``whiten=True``);
its policy step is then PPO-clip per token, and its critic's loss the clipped value loss (``common.methods.poad``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards


def turn_boundaries(mask: Tensor, token_turn: Tensor | None) -> Tensor:
    """The last action token of every turn: a masked token whose next masked token (in the row) belongs to another
    turn, or that has none. Without ``token_turn`` the whole row is one action. Shapes: (B, T) -> (B, T) bool."""
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device).expand(B, T)  # (B, T)
    big = torch.full_like(pos, T)
    nxt = torch.where(mask, pos, big).flip(1).cummin(1).values.flip(1)  # (B, T) first masked position >= t
    following = torch.cat([nxt[:, 1:], big[:, :1]], 1)  # (B, T) first masked position > t (T if none)
    has_next = following < T
    if token_turn is None:
        return mask & ~has_next
    next_turn = token_turn.gather(1, following.clamp(max=T - 1))  # (B, T)
    return mask & (~has_next | (next_turn != token_turn))


def bad_gae(values: Tensor, mask: Tensor, token_rewards: Tensor, last: Tensor, *, gamma: float = 0.95,
            lam: float = 0.95, mode: Literal["bad", "ntpo"] = "bad") -> Tensor:
    """Token advantages by BAD (or NTPO) GAE over each row's action tokens (module docstring).

    Shapes: values (B, T) V_j^t at every action token; mask (B, T) bool, the action tokens (environment tokens
    False: they are skipped, not counted as steps); token_rewards (B, T) r_t at the turn's last token (0
    elsewhere); last (B, T) bool, the last token of each turn (:func:`turn_boundaries`). Returns (B, T), 0 off the
    mask. A row's final action token ends its episode (m = 0). A row without action tokens gives zeros.
    """
    if mode not in ("bad", "ntpo"):
        raise ValueError(f"mode must be 'bad' or 'ntpo', got {mode!r}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    if values.dim() != 2 or not (values.shape == mask.shape == token_rewards.shape == last.shape):
        raise ValueError(f"values {tuple(values.shape)}, mask {tuple(mask.shape)}, token_rewards "
                         f"{tuple(token_rewards.shape)} and last {tuple(last.shape)} must all be (B, T)")
    if mask.dtype != torch.bool or last.dtype != torch.bool:
        raise ValueError(f"mask and last must be bool tensors, got {mask.dtype} and {last.dtype}")
    B, T = mask.shape
    if T == 0:
        return values.new_zeros(B, 0)
    order = torch.argsort((~mask).long(), dim=1, stable=True)  # (B, T) action tokens first, in order
    m = mask.gather(1, order)  # (B, T) packed validity (a prefix)
    v = values.gather(1, order).float().masked_fill(~m, 0.0)  # (B, T)
    r = token_rewards.gather(1, order).float().masked_fill(~m, 0.0)
    lst = last.gather(1, order) & m
    v_next = torch.cat([v[:, 1:], v.new_zeros(B, 1)], 1)  # (B, T) 0 after the row's last action token
    has_next = torch.cat([m[:, 1:], m.new_zeros(B, 1)], 1)  # (B, T) another action token follows (m_{t+1} = 1)
    if mode == "bad":
        g = torch.where(lst, gamma * has_next.float(), torch.ones_like(v))  # (B, T) γ·m at boundaries, 1 inside
    else:
        g = gamma * has_next.float()  # (B, T) γ at every token (0 after the episode's last)
    delta = (r + g * v_next - v).masked_fill(~m, 0.0)  # (B, T)
    decay = lam * g  # (B, T)
    adv = torch.zeros_like(v)
    running = v.new_zeros(B)
    for k in range(T - 1, -1, -1):  # ok: backward loop over the token axis (vectorised over rows)
        running = delta[:, k] + decay[:, k] * running
        adv[:, k] = running
    adv = adv.masked_fill(~m, 0.0)
    return torch.zeros_like(adv).scatter(1, order, adv)  # (B, T) back to the rows' positions


def whiten_nonzero(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − μ)/(σ + eps) over the non-zero entries of ``x`` (POAD's code, σ unbiased); zeros stay 0; fewer than two
    non-zero entries give all zeros, never NaN. Shapes: any -> same."""
    nz = x != 0
    n = nz.sum()
    mean = torch.where(nz, x, torch.zeros_like(x)).sum() / n.clamp(min=1)
    var = torch.where(nz, (x - mean) ** 2, torch.zeros_like(x)).sum() / (n - 1).clamp(min=1)
    out = torch.where(nz, (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))
    return torch.where(n > 1, out, torch.zeros_like(x))


def poad_token_rewards(rewards: Tensor, mask: Tensor, last: Tensor, token_turn: Tensor | None,
                       turn_rewards: Tensor | None = None, turn_ids: Tensor | None = None) -> Tensor:
    """r_t placed on each turn's last action token: ``turn_rewards[b, token_turn − turn_ids]`` when given, else the
    outcome ``rewards[b]`` on the row's final action token. With turn rewards, the part of ``rewards[b]`` they do not
    account for (R_b − Σ_t r_t: a format or end-reason reward the reward functions add) goes on the final action
    token, so the rewards BAD backs up always sum to the row's reward. Shapes: (B,), (B, T), (B, T), (B, T), (B, K),
    (B,) -> (B, T)."""
    pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
    final = mask & (pos == torch.where(mask, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values)  # (B, T)
    if turn_rewards is None or token_turn is None:
        return torch.where(final, rewards[:, None].to(torch.float32), torch.zeros(mask.shape, device=mask.device))
    first = turn_ids[:, None] if turn_ids is not None else 0
    col = (token_turn - first).clamp(min=0, max=turn_rewards.shape[1] - 1)  # (B, T)
    tr = turn_rewards.to(torch.float32)
    r = torch.where(last, tr.gather(1, col), torch.zeros(mask.shape, device=mask.device))  # (B, T)
    residual = rewards.to(torch.float32) - r.sum(1)  # (B,) what the turn rewards of the row's tokens leave out
    return r + torch.where(final, residual[:, None], torch.zeros_like(r))


def check_whole_episodes(episode_ids: Tensor | None) -> None:
    if episode_ids is not None and torch.unique(episode_ids).numel() != episode_ids.numel():
        raise ValueError("POAD needs each row to hold a whole episode (layout B: one sequence per episode); "
                         "episode_ids repeats across rows")


class POAD(AdvantageEstimator):
    """Token-level (B, T) advantages by BAD GAE (module docstring) from the critic's ``batch.values``, which
    ``common.methods.poad.POADCritic`` (listed in ``methods``) provides.

    Args:
        gamma: γ between actions (ADRL: 0.95; 0.99 on Overcooked).
        lam: GAE λ (0.95).
        mode: "bad" (POAD) or "ntpo" (token-level discount at every token, the paper's baseline).
        whiten: normalise the advantages by the mean/std of the batch's non-zero entries (ADRL's code).
    """

    requires = ("values",)

    def __init__(self, gamma: float = 0.95, lam: float = 0.95, mode: Literal["bad", "ntpo"] = "bad", whiten: bool = True):
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        if mode not in ("bad", "ntpo"):
            raise ValueError(f"mode must be 'bad' or 'ntpo', got {mode!r}")
        self.gamma, self.lam, self.mode, self.whiten = gamma, lam, mode, whiten

    def raw(self, batch) -> Tensor:
        """Un-whitened BAD advantages (B, T) (the critic's targets are these + V)."""
        batch.require("POAD (list common.methods.poad.POADCritic in methods)", "values", "rewards")
        check_rewards(batch.rewards)
        check_whole_episodes(batch.episode_ids)
        mask = batch.loss_mask
        last = turn_boundaries(mask, batch.token_turn)
        r = poad_token_rewards(batch.rewards, mask, last, batch.token_turn, batch.turn_rewards, batch.turn_ids)
        return bad_gae(batch.values, mask, r, last, gamma=self.gamma, lam=self.lam, mode=self.mode)

    def __call__(self, batch) -> Tensor:  # (B, T)
        adv = self.raw(batch)
        return whiten_nonzero(adv) if self.whiten else adv


__all__ = ["POAD", "bad_gae", "poad_token_rewards", "turn_boundaries", "whiten_nonzero"]
