"""Vectorised primitives of the agentic estimators (shared/methods/agentic.md §2), over flat *turn tables*.

A turn table is a set of 1-D tensors of length ``U`` (one entry per turn, i.e. per policy decision), sorted by
(episode, t): ``episode (U,)`` dense episode index, ``t (U,)`` turn index in the episode, ``group (U,)`` the
episode's group (same task, same start), and per-turn values (rewards, state keys, ...). Tokens map to turns with
``tok_turn (B, L)``: the flat turn index of every trained token, −1 elsewhere (§1.4). Every estimator is a few
calls below: no Python loop over samples; the only loops run over the *time* axis (≤ max turns) or over the
``K + 1`` history levels of HGPO.

    dense_ids(k1, ..., km)                 (M,) keys -> (ids in [0, n) or −1, n); a key of −1 excludes the row
    seg_stats(x, ids, n, weights)          per-segment count, mean, population and unbiased variance
    gnorm(x, ids, n, mode, std, ...)       group normalisation with an explicit singleton policy (§2.3)
    rloo(x, ids, n)                        leave-one-out baseline (§2.4)
    disc_return(r, episode, t, γ, cont)    G_t = r_t + γ c_t G_{t+1}, a backward loop over time (§2.5)
    hist_keys(key, episode, t, K)          (U, K+1) hashes of the windows (s_{t−k}, ..., s_t) (§2.6)
    turn_to_token(A_turn, tok_turn)        turn -> token broadcast (§1.5)
    turn_sum(tok_values, tok_turn, U)      token -> turn sums (§2.7)
    text_key(text)                         the 64-bit state key of an observation text (host side, rollout time)
    turn_table(batch)                      the flat turn table of a RolloutBatch (both storage layouts)

Conventions: ids of −1 mean "in no group": such rows get advantage 0 and never enter a statistic. An all-equal
group gives exactly 0 (values are shifted by a member of their segment before any sum), never NaN.
"""

from __future__ import annotations

import hashlib
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from common.ops import _splitmix

__all__ = [
    "dense_ids", "SegStats", "seg_stats", "gnorm", "rloo", "disc_return", "hist_keys", "mix_keys", "turn_to_token",
    "turn_sum", "text_key", "TurnTable", "turn_table", "episode_first",
]

Mode = Literal["mean", "mean_std"]
StdKind = Literal["unbiased", "population"]
Singleton = Literal["zero", "raw", "drop"]


def _check_1d(name: str, x: Tensor, M: int | None = None, integer: bool = False) -> None:
    if not torch.is_tensor(x) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (M,), got shape {tuple(getattr(x, 'shape', ()))}")
    if M is not None and x.shape[0] != M:
        raise ValueError(f"{name} must have M={M} entries, got {x.shape[0]}")
    if integer and x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def dense_ids(*keys: Tensor) -> tuple[Tensor, int]:
    """Dense ids of the distinct key tuples (§2.1): stack the keys (M,) along dim 1, ``torch.unique(dim=0,
    return_inverse=True)``. Rows whose tuple contains −1 get id −1 (excluded). Returns (ids (M,) long, n)."""
    if not keys:
        raise ValueError("dense_ids needs at least one key tensor")
    M = keys[0].shape[0] if torch.is_tensor(keys[0]) else None
    for i, k in enumerate(keys):
        _check_1d(f"keys[{i}]", k, M, integer=True)
    stack = torch.stack([k.long() for k in keys], 1)  # (M, m)
    valid = (stack != -1).all(1)  # (M,)
    ids = torch.full((M,), -1, dtype=torch.long, device=stack.device)
    if M == 0:
        return ids, 0
    uniq, inverse = torch.unique(stack[valid], dim=0, return_inverse=True)  # (n, m), (M_valid,)
    ids[valid] = inverse
    return ids, int(uniq.shape[0])


class SegStats(NamedTuple):
    count: Tensor  # (n,) number of members (rows with that id)
    weight: Tensor  # (n,) Σ w over the members (= count without weights)
    mean: Tensor  # (n,) Σ w x / Σ w
    var_pop: Tensor  # (n,) Σ w (x − μ)² / Σ w
    var_unb: Tensor  # (n,) var_pop · W / (W − 1) for W > 1, else 0
    first: Tensor  # (n,) the value of the segment's first member (the shift that makes equal segments exact zeros)


def _num(ids: Tensor, n: int | None) -> int:
    if n is not None:
        return int(n)
    return int(ids.max()) + 1 if ids.numel() else 0  # ok: one sync when the caller does not know n


def seg_stats(x: Tensor, ids: Tensor, n: int | None = None, weights: Tensor | None = None) -> SegStats:
    """Per-segment statistics (§2.2) of ``x (M,)`` over ``ids (M,)`` in [0, n) (−1: excluded), with optional
    non-negative ``weights (M,)``: count, weight W = Σ w, mean, population variance, unbiased variance
    var_pop·W/(W − 1) (0 for W ≤ 1). Values are shifted by the segment's first member before summing, so an
    all-equal segment has variance exactly 0 and ``x − mean`` exactly 0 on it. Every statistic has max(n, 1)
    entries (n = 0: one empty slot of count 0)."""
    _check_1d("x", x)
    _check_1d("ids", ids, x.shape[0], integer=True)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if weights is not None:
        _check_1d("weights", weights, x.shape[0])
    n = max(_num(ids, n), 1)  # one empty slot when no row has a group, so ids.clamp(min=0) can always index
    M = x.shape[0]
    inside = ids >= 0  # (M,)
    safe = ids.clamp(min=0)  # (M,)
    rows = torch.arange(M, device=x.device)
    first_row = torch.full((n,), M, dtype=torch.long, device=x.device).scatter_reduce_(
        0, safe, torch.where(inside, rows, torch.full_like(rows, M)), reduce="amin")  # (n,)
    present = first_row < M
    first = torch.where(present, x[first_row.clamp(max=max(M - 1, 0))] if M else x.new_zeros(n), x.new_zeros(n))  # (n,)
    w = torch.ones_like(x) if weights is None else weights.to(x.dtype)
    w = torch.where(inside, w, torch.zeros_like(w))  # (M,)
    xs = torch.where(inside, x - first[safe], torch.zeros_like(x))  # (M,) shifted
    count = x.new_zeros(n).index_add_(0, safe, inside.to(x.dtype))  # (n,)
    W = x.new_zeros(n).index_add_(0, safe, w)  # (n,)
    mean_s = x.new_zeros(n).index_add_(0, safe, w * xs) / W.clamp(min=1e-30)  # (n,)
    mean_s = torch.where(W > 0, mean_s, torch.zeros_like(mean_s))
    dev = torch.where(inside, xs - mean_s[safe], torch.zeros_like(xs))  # (M,)
    sq = x.new_zeros(n).index_add_(0, safe, w * dev * dev)  # (n,)
    var_pop = torch.where(W > 0, sq / W.clamp(min=1e-30), torch.zeros_like(sq))
    var_unb = torch.where(W > 1, sq / (W - 1).clamp(min=1e-30), torch.zeros_like(sq))
    return SegStats(count, W, first + mean_s, var_pop, var_unb, first)


def gnorm(
    x: Tensor,
    ids: Tensor,
    n: int | None = None,
    *,
    mode: Mode = "mean_std",
    std: StdKind = "unbiased",
    eps: float = 1e-6,
    singleton: Singleton = "zero",
    weights: Tensor | None = None,
) -> Tensor:
    """Group normalisation (§2.3). Shapes: x (M,), ids (M,) in [0, n) or −1 -> (M,).

        mode="mean":      A = x − μ_id
        mode="mean_std":  A = (x − μ_id) / (σ_id + eps),  σ unbiased (torch default: GiGPO, UI-S1, DCPO) or
                          population (HGPO), from ``seg_stats`` (optionally weighted)

    Singleton policy (a group with one member): "zero" -> 0 (GiGPO/UI-S1 step level); "raw" -> μ := 0, σ := 1,
    so A = x (GiGPO/UI-S1/iStar episode level, DCPO); "drop" -> 0, and the caller excludes the row from its
    aggregate (HGPO; see ``seg_stats(...).count``). Rows with id −1 get 0. All-equal groups give exactly 0."""
    if mode not in ("mean", "mean_std"):
        raise ValueError(f"mode must be 'mean' or 'mean_std', got {mode!r}")
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    if singleton not in ("zero", "raw", "drop"):
        raise ValueError(f"singleton must be 'zero', 'raw' or 'drop', got {singleton!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s = seg_stats(x, ids, n, weights)
    safe = ids.clamp(min=0)
    centred = (x - s.first[safe]) - (s.mean - s.first)[safe]  # (M,) exact 0 in all-equal groups
    if mode == "mean_std":
        sigma = (s.var_unb if std == "unbiased" else s.var_pop).sqrt()  # (n,)
        centred = centred / (sigma[safe] + eps)
    single = s.count[safe] == 1  # (M,)
    out = torch.where(single, x if singleton == "raw" else torch.zeros_like(x), centred)
    return torch.where(ids >= 0, out, torch.zeros_like(out))


def rloo(x: Tensor, ids: Tensor, n: int | None = None) -> Tensor:
    """Leave-one-out (§2.4): A_i = x_i − (S_id − x_i)/(n_id − 1) = n/(n − 1)·(x_i − μ_id) for n_id > 1; A = x for a
    group of one (iStar keeps the raw score); 0 for id −1. Shapes: (M,), (M,) -> (M,)."""
    s = seg_stats(x, ids, n)
    safe = ids.clamp(min=0)
    c = s.count[safe]  # (M,)
    centred = (x - s.first[safe]) - (s.mean - s.first)[safe]  # (M,)
    out = torch.where(c > 1, centred * c / (c - 1).clamp(min=1), x)
    return torch.where(ids >= 0, out, torch.zeros_like(out))


def _padded(episode: Tensor, t: Tensor, num_episodes: int | None) -> tuple[int, int]:
    _check_1d("episode", episode, integer=True)
    _check_1d("t", t, episode.shape[0], integer=True)
    if episode.numel() and bool(((episode < 0) | (t < 0)).any()):  # ok: one sync, input check
        raise ValueError("episode and t must be >= 0 for every turn")
    E = _num(episode, num_episodes)
    T = int(t.max()) + 1 if t.numel() else 0  # ok: one sync, the time axis length
    return E, T


def disc_return(
    r: Tensor,
    episode: Tensor,
    t: Tensor,
    gamma: float,
    cont: Tensor | None = None,
    num_episodes: int | None = None,
) -> Tensor:
    """Discounted return with resets (§2.5): ``G_t = r_t + γ · c_t · G_{t+1}`` (G past the last turn = 0), with
    ``cont`` c (U,) (default 1; UI-S1: matched_t ∧ matched_{t+1}). The turns are scattered into an [E, T_max]
    table and one backward loop runs over time only; no γ^t cumsum trick (γ^T underflows in fp32). A turn index
    missing inside an episode acts as a turn of reward 0 with c = 1. Shapes: r, episode, t, cont (U,) -> (U,)."""
    _check_1d("r", r)
    E, T = _padded(episode, t, num_episodes)
    if r.shape[0] != episode.shape[0]:
        raise ValueError(f"r must have U={episode.shape[0]} entries, got {r.shape[0]}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    R = r.new_zeros(E, T)  # (E, T)
    R[episode, t] = r
    C = r.new_ones(E, T)  # (E, T)
    if cont is not None:
        _check_1d("cont", cont, r.shape[0])
        C[episode, t] = cont.to(r.dtype)
    G = r.new_zeros(E, T + 1)  # (E, T + 1), G[:, T] = 0
    for k in range(T - 1, -1, -1):  # ok: loop over time only
        G[:, k] = R[:, k] + gamma * C[:, k] * G[:, k + 1]
    return G[episode, t]


def _rotl(x: Tensor, s: int) -> Tensor:
    return (x << s) | ((x >> (64 - s)) & ((1 << s) - 1))


def mix_keys(a: Tensor, b: Tensor) -> Tensor:
    """A 64-bit hash combiner: splitmix64(a ⊕ rotl(b, 17)), never −1 (the "none" key). Shapes: broadcastable int64."""
    h = _splitmix(a.long() ^ _rotl(b.long(), 17))
    return torch.where(h == -1, torch.full_like(h, -2), h)


def hist_keys(state_key: Tensor, episode: Tensor, t: Tensor, K: int, num_episodes: int | None = None) -> Tensor:
    """History keys for HGPO (§2.6): ``h[:, 0] = state_key``; ``h[:, k]`` at turn t hashes the window
    (s_{t−k}, ..., s_t) as mix(h_{k−1}[t], s[t−k]) for t ≥ k, and is −1 for t < k or when any state of the window is
    −1 (unknown). Shapes: state_key, episode, t (U,) long -> (U, K + 1) long."""
    _check_1d("state_key", state_key, episode.shape[0], integer=True)
    if not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an integer >= 0, got {K!r}")
    E, T = _padded(episode, t, num_episodes)
    S = torch.full((E, max(T, 1)), -1, dtype=torch.long, device=state_key.device)  # (E, T)
    S[episode, t] = state_key.long()
    h = S.clone()
    out = [h]
    for k in range(1, K + 1):  # ok: loop over history levels
        prev = torch.full_like(S, -1)
        prev[:, k:] = S[:, :-k] if k < S.shape[1] else prev[:, k:]
        nxt = mix_keys(h, prev)
        h = torch.where((h == -1) | (prev == -1), torch.full_like(h, -1), nxt)  # (E, T)
        out.append(h)
    return torch.stack(out, -1)[episode, t]  # (U, K + 1)


def turn_to_token(a_turn: Tensor, tok_turn: Tensor) -> Tensor:
    """Turn -> token broadcast (§1.5): ``where(tok_turn ≥ 0, a_turn[clamp(tok_turn, 0)], 0)``. Shapes: (U,), (B, L) -> (B, L)."""
    _check_1d("a_turn", a_turn)
    if a_turn.numel() == 0:
        return torch.zeros(tok_turn.shape, dtype=a_turn.dtype, device=tok_turn.device)
    if tok_turn.numel() and bool((tok_turn >= a_turn.shape[0]).any()):  # ok: one sync, input check
        raise ValueError(f"tok_turn holds turn ids >= U={a_turn.shape[0]}")
    return torch.where(tok_turn >= 0, a_turn[tok_turn.clamp(min=0)], torch.zeros((), dtype=a_turn.dtype, device=a_turn.device))


def turn_sum(tok_values: Tensor, tok_turn: Tensor, num_turns: int) -> Tensor:
    """Per-turn sums of token values (§2.7), ``index_add_`` over ``tok_turn`` ≥ 0. Shapes: (B, L), (B, L) -> (U,)."""
    if tok_values.shape != tok_turn.shape:
        raise ValueError(f"tok_values {tuple(tok_values.shape)} and tok_turn {tuple(tok_turn.shape)} must have one shape")
    keep = tok_turn >= 0
    return tok_values.new_zeros(num_turns).index_add_(0, tok_turn[keep], tok_values[keep])


def text_key(text: str) -> int:
    """The 64-bit state key of an observation (blake2b of its UTF-8 text as a signed int64; never −1). Host side,
    computed once per turn at rollout time; the text must be the *current* observation only (no history, no
    memory: agentic.md §14.4)."""
    v = int.from_bytes(hashlib.blake2b(str(text).encode("utf-8", "replace"), digest_size=8).digest(), "little", signed=True)
    return -2 if v == -1 else v


# --------------------------------------------------------------------------- the turn table of a RolloutBatch


class TurnTable(NamedTuple):
    """The flat turn table of a batch (§1.3), U turns sorted by (episode, t); None where the batch lacks a field."""
    episode: Tensor  # (U,) dense episode index in [0, E)
    group: Tensor  # (U,) group id of the episode
    t: Tensor  # (U,) turn index in the episode
    row: Tensor  # (U,) the batch row that holds the turn's tokens
    slot: Tensor  # (U,) the turn's column in the row's (B, K) turn fields
    reward: Tensor | None  # (U,) immediate reward r_t
    state_key: Tensor | None  # (U,) long, −1 = none
    valid: Tensor | None  # (U,) bool: the action parsed and was legal
    matched: Tensor | None  # (U,) bool: UI-S1's expert match
    kind: Tensor | None  # (U,) long: decision type (ToMPO / HRPO scopes)
    process_reward: Tensor | None  # (U,) float: judge / PRM process reward (MAPO, iStar)
    outcome: Tensor  # (U,) R_e of the turn's episode (the row's reward)
    tok_turn: Tensor  # (B, T) flat turn index of every trained token, −1 elsewhere
    num_episodes: int
    ep_group: Tensor  # (E,) group of each episode
    ep_outcome: Tensor  # (E,) R_e
    ep_len: Tensor  # (E,) turns of the episode in this batch


def episode_first(values: Tensor, episode: Tensor, num_episodes: int) -> Tensor:
    """The value of each episode's first entry (lowest index). Shapes: (M,), (M,) -> (E,)."""
    M = episode.shape[0]
    rows = torch.arange(M, device=episode.device)
    first = torch.full((num_episodes,), M, dtype=torch.long, device=episode.device).scatter_reduce_(
        0, episode, rows, reduce="amin")
    return values[first.clamp(max=max(M - 1, 0))]


def turn_table(batch) -> TurnTable:
    """The flat turn table of a RolloutBatch in either layout (one row per episode, one row per turn or segment).

    Reads ``episode_ids`` (B,), ``turn_ids`` (B,) (the row's first turn), ``token_turn`` (B, T) (turn index in the
    episode, −1 off the actions), ``turn_mask`` (B, K) (the row's k-th turn, t = turn_ids + k, exists), the optional
    per-turn fields ``turn_rewards``, ``turn_keys``, ``turn_valid``, ``turn_matched``, ``turn_kinds`` (B, K),
    and ``rewards`` (B,) as the outcome R_e of the row's episode (the rows of one episode carry one outcome; the
    first row's is used). A row without a ``turn_mask`` is one turn (K = 1). Tokens whose turn is not in the table
    get −1 in ``tok_turn`` (no advantage, no loss)."""
    batch.require("turn_table", "episode_ids", "rewards")
    B = batch.batch_size
    dev = batch.rewards.device
    if batch.turn_mask is not None:
        mask = batch.turn_mask.bool()  # (B, K)
    else:
        mask = torch.ones(B, 1, dtype=torch.bool, device=dev)
    K = mask.shape[1]
    first = batch.turn_ids if batch.turn_ids is not None else torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
    ep, E = dense_ids(batch.episode_ids.long())  # (B,) in [0, E)
    row_idx, slot = mask.nonzero(as_tuple=True)  # (U,), (U,)
    t = first[row_idx] + slot  # (U,)
    episode = ep[row_idx]  # (U,)
    order = torch.argsort(episode * (int(t.max()) + 1 if t.numel() else 1) + t, stable=True)  # (U,) sort by (episode, t)
    row_idx, slot, t, episode = row_idx[order], slot[order], t[order], episode[order]
    U = row_idx.shape[0]
    pair = episode * (int(t.max()) + 1 if U else 1) + t  # (U,) sorted keys
    if U > 1 and bool((pair[1:] == pair[:-1]).any()):  # ok: one sync, input check
        raise ValueError("turn_table: two rows claim the same (episode, turn); turn_ids/turn_mask overlap")

    def per_turn(name: str) -> Tensor | None:
        v = getattr(batch, name)
        if v is None:
            return None
        if v.shape[:2] != mask.shape:
            raise ValueError(f"RolloutBatch.{name} must have the shape of turn_mask {tuple(mask.shape)}, got {tuple(v.shape)}")
        return v[row_idx, slot]

    # the flat index of every token's turn: local slot = token_turn − turn_ids, looked up in a (B, K) index table
    index = torch.full((B, K), -1, dtype=torch.long, device=dev)
    index[row_idx, slot] = torch.arange(U, device=dev)
    if batch.token_turn is not None:
        local = batch.token_turn.long() - first[:, None]  # (B, T)
        ok = (batch.token_turn >= 0) & (local >= 0) & (local < K) & batch.loss_mask.bool()
        tok_turn = torch.where(ok, index.gather(1, local.clamp(0, K - 1)), torch.full_like(local, -1))  # (B, T)
    else:  # one turn per row: every trained token belongs to the row's first turn
        tok_turn = torch.where(batch.loss_mask.bool(), index[:, :1].expand_as(batch.loss_mask), -1)
    group = batch.group_ids[row_idx]
    ep_outcome = episode_first(batch.rewards.float(), ep, E)  # (E,) the first row's reward
    ep_group = episode_first(batch.group_ids, ep, E)  # (E,)
    ep_len = torch.zeros(E, dtype=torch.long, device=dev).index_add_(0, episode, torch.ones_like(episode))
    rewards = per_turn("turn_rewards")
    return TurnTable(
        episode=episode, group=group, t=t, row=row_idx, slot=slot,
        reward=None if rewards is None else rewards.float(), state_key=per_turn("turn_keys"),
        valid=per_turn("turn_valid"), matched=per_turn("turn_matched"), kind=per_turn("turn_kinds"),
        process_reward=None if batch.process_rewards is None else per_turn("process_rewards").float(),
        outcome=ep_outcome[episode], tok_turn=tok_turn, num_episodes=E, ep_group=ep_group, ep_outcome=ep_outcome,
        ep_len=ep_len,
    )
