"""One multi-scope normalise-and-add combiner for turn-level advantages (agentic.md §12-13, §14):

    A_u = Σ_k w_k · norm_k(x_k(u); scope_k(u))

Each :class:`Scope` picks a signal x (the episode outcome R_e, the turn reward r_t, the discounted return G_t, the
process reward, or the mixed reward λ·R_e + (1 − λ)·r_t), the keys whose distinct values form its groups (``group``
= the task's rollouts, ``t`` = turn index, ``kind`` = decision type (``turn_kinds``; 0 when the batch has none), ``episode``, ``state`` = the observation key; no
keys = the whole batch), a normalisation (``mean``, ``mean_std`` or ``none`` = the raw signal), a std convention
and a singleton policy (``common.segment_ops.gnorm``). ``per_episode=True`` takes the statistics over one value per
episode (a scope over episode-level keys: the dedup of paper GRPO / DCPO).

Two methods without public code are *configurations* of it, not code (both reconstructions, marked [U] in the
spec; configs/agentic/tompo.yaml and hrpo.yaml):

- ToMPO (Zhang et al., arXiv 2509.21134): mixed reward r = λ·r^global + (1 − λ)·r^partial; a graph-level
  advantage over rollouts sharing (task, round, decision kind) plus a sample-level one over the task's group:
  scopes ``[{signal: mixed, keys: [group, t, kind]}, {signal: mixed, keys: [group]}]``.
- MasHost HRPO (Yang et al., arXiv 2506.08507): group-relative outcome advantage plus per-step action rewards,
  A_{i,t} = gnorm(R_i, group) + λ_a·r^act_{i,t}: scopes ``[{signal: outcome, keys: [group], per_episode: true},
  {signal: reward, keys: [], mode: none, weight: λ_a}]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from common.advantages.turns import TurnAdvantage, need
from common.segment_ops import TurnTable, dense_ids, disc_return, gnorm


def check_args(owner: str, *checks: tuple[bool, str]) -> None:
    """Argument validation of the turn-level estimators (GiGPO, UISemiOnline, MAPO, Scope, MultiScope): every failed
    check's message, in order, in one ``ValueError("<owner>: <message>; <message>")``; nothing when all pass."""
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems))


def in_unit(name: str, value: float) -> tuple[bool, str]:
    """``value`` in [0, 1]."""
    return 0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}"


def non_negative(name: str, value: float) -> tuple[bool, str]:
    """``value`` >= 0."""
    return value >= 0, f"{name} must be >= 0, got {value}"


def one_of(name: str, value: object, options: tuple[str, ...]) -> tuple[bool, str]:
    """``value`` among ``options`` (the message lists them: 'a', 'b' or 'c')."""
    quoted = [repr(o) for o in options]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return value in options, f"{name} must be {listed}, got {value!r}"

KEYS = ("group", "t", "kind", "episode", "state")
SIGNALS = ("outcome", "reward", "return", "process", "mixed")


@dataclass
class Scope:
    """One term of the combiner (see the module docstring).

    Args:
        signal: "outcome" (R_e), "reward" (r_t), "return" (G_t, discounted by the combiner's gamma), "process"
            (process reward) or "mixed" (λ·R_e + (1 − λ)·r_t, λ = the combiner's mix).
        keys: the group keys, a subset of group, t, kind, episode, state; [] = the whole batch is one group.
        weight: w_k.
        mode: "mean_std", "mean" or "none" (the raw signal, no normalisation).
        std: "unbiased" or "population".
        singleton: "zero", "raw" or "drop" (a group of one).
        per_episode: statistics over one value per episode (keys must be episode-level: group, episode).
    """

    signal: Literal["outcome", "reward", "return", "process", "mixed"] = "outcome"
    keys: tuple[str, ...] = ("group",)
    weight: float = 1.0
    mode: Literal["mean", "mean_std", "none"] = "mean_std"
    std: Literal["unbiased", "population"] = "unbiased"
    singleton: Literal["zero", "raw", "drop"] = "zero"
    per_episode: bool = False

    def __post_init__(self):
        self.keys = tuple(self.keys)
        bad = [k for k in self.keys if k not in KEYS]
        check_args("Scope",
                   (self.signal in SIGNALS, f"signal must be one of {SIGNALS}, got {self.signal!r}"),
                   (not bad, f"keys must be among {KEYS}, got {bad}"),
                   one_of("mode", self.mode, ("mean", "mean_std", "none")),
                   one_of("std", self.std, ("unbiased", "population")),
                   one_of("singleton", self.singleton, ("zero", "raw", "drop")),
                   (not (self.per_episode and (set(self.keys) - {"group", "episode"} or self.signal != "outcome")),
                    "per_episode needs signal 'outcome' and episode-level keys (group, episode)"))


def mix_rewards(global_reward: Tensor, partial_reward: Tensor, lam: float) -> Tensor:
    """r = λ·r^global + (1 − λ)·r^partial (ToMPO's balance of collective and individual rewards; also the
    justifiable-decision mix of agentic.md §15). Shapes: broadcastable."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * global_reward + (1.0 - lam) * partial_reward


def multi_scope_gnorm(values: list[Tensor], ids: list[tuple[Tensor, int]], scopes: list[Scope], eps: float = 1e-6) -> Tensor:
    """Σ_k w_k · gnorm(values[k], ids[k]) with each scope's mode, std and singleton policy. Shapes: values[k] (M,),
    ids[k] ((M,), n) -> (M,)."""
    out = torch.zeros_like(values[0])
    for x, (gid, n), s in zip(values, ids, scopes):  # ok: loop over the few scopes
        a = x if s.mode == "none" else gnorm(x, gid, n, mode=s.mode, std=s.std, eps=eps, singleton=s.singleton)
        out = out + s.weight * a
    return out


def _signal(tt: TurnTable, s: Scope, gamma: float, mix: float) -> Tensor:
    if s.signal == "outcome":
        return tt.outcome
    if s.signal == "process":
        need(tt, "MultiScope", "process_reward")
        return tt.process_reward
    need(tt, "MultiScope", "reward")
    if s.signal == "reward":
        return tt.reward
    if s.signal == "return":
        return disc_return(tt.reward, tt.episode, tt.t, gamma, num_episodes=tt.num_episodes)
    return mix_rewards(tt.outcome, tt.reward, mix)


def _key(tt: TurnTable, name: str) -> Tensor:
    if name == "kind":
        return tt.kind.long() if tt.kind is not None else torch.zeros_like(tt.t)
    if name == "state":
        need(tt, "MultiScope", "state_key")
        return tt.state_key.long()
    return getattr(tt, name).long()


def multi_scope(tt: TurnTable, scopes: list[Scope], *, gamma: float = 1.0, mix: float = 1.0, eps: float = 1e-6) -> Tensor:
    """The combiner's per-turn advantage (module docstring). Shapes: -> (U,)."""
    out = torch.zeros_like(tt.outcome)
    for s in scopes:  # ok: loop over the few scopes
        x = _signal(tt, s, gamma, mix)  # (U,)
        if s.per_episode:
            ep_keys = [tt.ep_group if k == "group" else torch.arange(tt.num_episodes, device=x.device) for k in s.keys]
            ids = dense_ids(*ep_keys) if ep_keys else (torch.zeros(tt.num_episodes, dtype=torch.long, device=x.device), 1)
            a = multi_scope_gnorm([tt.ep_outcome], [ids], [s], eps)[tt.episode]
        else:
            ids = dense_ids(*[_key(tt, k) for k in s.keys]) if s.keys else (torch.zeros_like(tt.t), 1)
            a = multi_scope_gnorm([x], [ids], [s], eps)
        out = out + a
    return out


class MultiScope(TurnAdvantage):
    """The multi-scope normalise-and-add combiner (see the module docstring).

    Args:
        scopes: the terms, each a :class:`Scope`.
        gamma: discount of the "return" signal.
        mix: λ of the "mixed" signal, λ·R_e + (1 − λ)·r_t.
        eps: added to σ.
    """

    def __init__(self, scopes: list[Scope], gamma: float = 1.0, mix: float = 1.0, eps: float = 1e-6):
        scopes = [s if isinstance(s, Scope) else Scope(**s) for s in scopes]
        check_args("MultiScope", (bool(scopes), "scopes must hold at least one Scope"), in_unit("gamma", gamma),
                   in_unit("mix", mix), non_negative("eps", eps))
        self.scopes, self.gamma, self.mix, self.eps = scopes, gamma, mix, eps
        fields = {"reward": "turn_rewards", "return": "turn_rewards", "mixed": "turn_rewards", "process": "process_rewards"}
        extra = {fields[s.signal] for s in scopes if s.signal in fields}
        extra |= {"turn_keys" for s in scopes if "state" in s.keys}
        self.requires = ("episode_ids", "token_turn", "turn_mask", *sorted(extra))
        self.batch_scoped = any(not s.keys and s.mode != "none" for s in scopes)

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        return multi_scope(tt, self.scopes, gamma=self.gamma, mix=self.mix, eps=self.eps)
