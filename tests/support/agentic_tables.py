"""Hand-built trajectory tables as RolloutBatches, in layout B (a row per episode) or A (a row per turn), for the
agentic estimator tests. An episode is a dict:

    {"group": g, "outcome": R_e, "turns": [{"key": int, "reward": r_t, "valid": bool, "matched": bool, "kind": int,
                                            "process": p_t}, ...]}

Every turn owns ``tokens_per_turn`` action tokens; in layout B an environment token follows every turn but the last
(env_mask, token_turn −1). Layout A rows are shuffled (seeded), so estimators cannot rely on row order.
"""

from __future__ import annotations

import random

import torch

from common.batch import RolloutBatch


def _col(turns, name, default):
    return [t.get(name, default) for t in turns]


def make_batch(episodes: list[dict], layout: str = "B", tokens_per_turn: int = 2, seed: int = 0) -> RolloutBatch:
    if layout == "B":
        K = max(len(e["turns"]) for e in episodes)
        T = max(len(e["turns"]) * (tokens_per_turn + 1) for e in episodes)
        E = len(episodes)
        tok = torch.full((E, T), -1, dtype=torch.long)
        env = torch.zeros(E, T, dtype=torch.bool)
        cmask = torch.zeros(E, T, dtype=torch.bool)
        cols = {n: torch.zeros(E, K) for n in ("reward", "process")}
        keys = torch.full((E, K), -1, dtype=torch.long)
        tmask, valid, matched = (torch.zeros(E, K, dtype=torch.bool) for _ in range(3))
        kinds = torch.zeros(E, K, dtype=torch.long)
        for e, ep in enumerate(episodes):
            pos = 0
            for k, turn in enumerate(ep["turns"]):
                tok[e, pos:pos + tokens_per_turn] = k
                cmask[e, pos:pos + tokens_per_turn] = True
                pos += tokens_per_turn
                if k < len(ep["turns"]) - 1:
                    env[e, pos] = cmask[e, pos] = True
                    pos += 1
                tmask[e, k] = True
                cols["reward"][e, k] = turn.get("reward", 0.0)
                cols["process"][e, k] = turn.get("process", 0.0)
                keys[e, k] = turn.get("key", -1)
                valid[e, k] = turn.get("valid", True)
                matched[e, k] = turn.get("matched", True)
                kinds[e, k] = turn.get("kind", 0)
        return RolloutBatch(
            completion_ids=torch.zeros(E, T, dtype=torch.long), completion_mask=cmask,
            group_ids=torch.tensor([ep["group"] for ep in episodes]), rewards=torch.tensor([float(ep["outcome"]) for ep in episodes]),
            episode_ids=torch.arange(E), turn_ids=torch.zeros(E, dtype=torch.long), token_turn=tok, env_mask=env,
            turn_mask=tmask, turn_rewards=cols["reward"], turn_keys=keys, turn_valid=valid, turn_matched=matched,
            turn_kinds=kinds, process_rewards=cols["process"])
    rows = [(e, k, ep, turn) for e, ep in enumerate(episodes) for k, turn in enumerate(ep["turns"])]
    random.Random(seed).shuffle(rows)
    B = len(rows)
    one = lambda vals, dtype=None: torch.tensor(vals, dtype=dtype)[:, None]  # noqa: E731
    return RolloutBatch(
        completion_ids=torch.zeros(B, tokens_per_turn, dtype=torch.long),
        completion_mask=torch.ones(B, tokens_per_turn, dtype=torch.bool),
        group_ids=torch.tensor([ep["group"] for _, _, ep, _ in rows]),
        rewards=torch.tensor([float(ep["outcome"]) for _, _, ep, _ in rows]),
        episode_ids=torch.tensor([100 + e for e, _, _, _ in rows]), turn_ids=torch.tensor([k for _, k, _, _ in rows]),
        token_turn=torch.tensor([k for _, k, _, _ in rows])[:, None].expand(B, tokens_per_turn).clone(),
        turn_mask=torch.ones(B, 1, dtype=torch.bool),
        turn_rewards=one([float(t.get("reward", 0.0)) for *_, t in rows]),
        process_rewards=one([float(t.get("process", 0.0)) for *_, t in rows]),
        turn_keys=one([t.get("key", -1) for *_, t in rows], torch.long),
        turn_valid=one([t.get("valid", True) for *_, t in rows], torch.bool),
        turn_matched=one([t.get("matched", True) for *_, t in rows], torch.bool),
        turn_kinds=one([t.get("kind", 0) for *_, t in rows], torch.long))


def per_turn(batch: RolloutBatch, adv_tok: torch.Tensor, episodes: list[dict], layout: str, tokens_per_turn: int = 2) -> list[list[float]]:
    """Read back each episode's per-turn advantage from token advantages (B, T); asserts every token of a turn agrees
    and environment tokens carry 0."""
    out = [[None] * len(ep["turns"]) for ep in episodes]
    for b in range(batch.batch_size):
        for j in range(adv_tok.shape[1]):
            k = int(batch.token_turn[b, j])
            if k < 0:
                assert adv_tok[b, j] == 0
                continue
            e = int(batch.episode_ids[b]) - (100 if layout == "A" else 0)
            v = float(adv_tok[b, j])
            assert out[e][k] is None or abs(out[e][k] - v) < 1e-6
            out[e][k] = v
    return out
