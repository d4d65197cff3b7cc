"""R³'s Cross-Context Replay (CCR): past responses of the same prompt with the opposite outcome are injected into
uniform groups (all wrong or all right), so they have reward variance again; advantages on the mixed groups by Eq. 3.

Paper: "R³: Replay, Reflection, and Ranking Rewards for LLM Reinforcement Learning" (arXiv 2601.19620, §3.2, Eq. 3).
shared/methods/text.md §17.

    buffer S[uid] = past (response, reward) of prompt uid (the last ``per_prompt`` rows of each prompt)
    if every response of group G is wrong:  G_C = k correct responses from S[uid]
    if every response of group G is right:  G_C = k wrong responses from S[uid];        G_mix = G ∪ G_C
    Â_i = (R_i − mean(R_{G_mix})) / (α · std(R_{G_mix}) + λ)                              (Eq. 3, every group)

Eq. 3 applies α to the std of the whole mixed group although the text says α "adjusts the contribution of the
off-policy samples"; implemented as written. The k replayed rows are the most recent ones with the opposite outcome
[UNVERIFIED choice]. Replayed rows are off-policy: the update loop recomputes their old log-probs under the current
policy (ratio 1 on the first pass) [UNVERIFIED how the paper does it]. This selector *replaces* the advantages of the
configured estimator with Eq. 3 on the mixed groups. In-Context Self-Reflection (ISR) is not implemented.

State (checkpointed via ``get_extra_state``): the buffered rows (tensors padded to the widest row; samples and
completions as plain data) and their prompt keys.
"""

from __future__ import annotations


import torch
from torch import Tensor

from common.advantages.base import check_rewards
from common.batch import RolloutBatch
from common.ops import check_groups, group_count, group_first, group_max, group_mean, group_min, group_std
from common.sampling.base import Selector


def r3_advantage(rewards: Tensor, group_ids: Tensor, *, alpha: float, lam: float, num_groups: int | None = None) -> Tensor:
    """R³ Eq. 3: ``Â_i = (R_i − μ_g) / (α σ_g + λ)`` over the (mixed) group, σ the unbiased std.

    Shapes: rewards (B,), group_ids (B,) -> (B,). All-equal groups and groups of one give exactly 0.
    """
    num_groups = check_groups(rewards, group_ids, num_groups)
    check_rewards(rewards)
    r = rewards - group_first(rewards, group_ids, num_groups, validate=False)[group_ids]  # (B,) exact 0 if all equal
    centred = r - group_mean(r, group_ids, num_groups, validate=False)[group_ids]  # (B,)
    return centred / (alpha * group_std(r, group_ids, num_groups, validate=False)[group_ids] + lam)


class CrossContextReplay(Selector, torch.nn.Module):
    """R³ CCR (arXiv 2601.19620): a prompt-keyed buffer of past responses; uniform groups get ``k`` past responses of
    the same prompt with the opposite outcome; then Eq. 3 advantages on every (mixed) group. Needs ``batch.correct``.

    Args:
        k: responses injected into a uniform group [UNVERIFIED].
        alpha: α of Eq. 3 [UNVERIFIED].
        lam: λ of Eq. 3 [UNVERIFIED].
        per_prompt: responses kept per prompt (the most recent).
        capacity: rows kept in all (oldest dropped first).
        key: the sample field that identifies a prompt.
    """

    def __init__(self, k: int = 2, alpha: float = 1.0, lam: float = 1e-6, per_prompt: int = 8, capacity: int = 4096,
                 key: str = "prompt"):
        torch.nn.Module.__init__(self)
        problems = []
        for name, v in (("k", k), ("per_prompt", per_prompt), ("capacity", capacity)):
            if v < 1:
                problems.append(f"{name} must be >= 1, got {v}")
        if alpha <= 0:
            problems.append(f"alpha must be > 0, got {alpha}")
        if lam <= 0:
            problems.append(f"lam must be > 0 (it keeps Eq. 3 finite), got {lam}")
        if problems:
            raise ValueError("CrossContextReplay: " + "; ".join(problems))
        self.k, self.alpha, self.lam, self.per_prompt, self.capacity, self.key = k, alpha, lam, per_prompt, capacity, key
        self.rows: RolloutBatch | None = None  # buffered rows
        self.keys: list[str] = []  # prompt key of each buffered row
        self.last_replayed = 0

    def __len__(self) -> int:
        return len(self.keys)

    def _prompt_keys(self, batch: RolloutBatch) -> list[str]:
        try:
            return [str(s[self.key]) for s in batch.samples]
        except (KeyError, TypeError) as e:
            raise ValueError(f"CrossContextReplay needs samples[i][{self.key!r}] to identify each row's prompt") from e

    def _keep(self, keep: Tensor) -> None:
        self.keys = [k for k, m in zip(self.keys, keep.tolist()) if m]
        self.rows = self.rows.select(keep) if self.keys else None

    def store(self, rows: RolloutBatch, keys: list[str]) -> None:
        """Append rows; keep each prompt's last ``per_prompt`` rows and the last ``capacity`` rows overall."""
        if rows.batch_size == 0:
            return
        rows = rows.replace(group_ids=torch.arange(rows.batch_size, device=rows.group_ids.device), advantages=None)
        self.rows = rows if self.rows is None else RolloutBatch.cat([self.rows, rows])
        self.keys = self.keys + keys
        seen: dict[str, int] = {}
        newest_first = []
        for key in reversed(self.keys):  # per-prompt rank from the newest row (string keys: a Python pass)
            seen[key] = seen.get(key, 0) + 1
            newest_first.append(seen[key] <= self.per_prompt)
        keep = torch.tensor(newest_first[::-1])
        keep &= torch.arange(len(self.keys)) >= len(self.keys) - self.capacity
        self._keep(keep)

    def lookup(self, key: str, want_correct: bool) -> list[int]:
        """Buffer rows of prompt ``key`` whose outcome is ``want_correct``, the ``k`` most recent."""
        correct = self.rows.correct.tolist()
        found = [i for i, (kk, c) in enumerate(zip(self.keys, correct)) if kk == key and bool(c) == want_correct]
        return found[-self.k:]

    @torch.no_grad()
    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if rollouts.correct is None or rollouts.rewards is None:
            raise ValueError("CrossContextReplay needs rollouts.correct (B,) bool and rollouts.rewards (score first)")
        keys = self._prompt_keys(rollouts)
        gids = rollouts.group_ids
        num_groups = int(gids.max()) + 1 if rollouts.batch_size else 0
        correct = rollouts.correct.float()  # (B,)
        present = group_count(gids, num_groups) > 0  # (num_groups,) ids may have gaps after other selectors
        uniform = present & (group_min(correct, gids, num_groups) == group_max(correct, gids, num_groups))  # (num_groups,)
        first = group_first(torch.arange(rollouts.batch_size, device=gids.device, dtype=torch.float32), gids, num_groups).long()
        picks, targets = [], []
        if len(self):
            all_right = group_min(correct, gids, num_groups) > 0  # (num_groups,)
            for g in uniform.nonzero().flatten().tolist():  # uniform groups only (a Python pass over string keys)
                found = self.lookup(keys[int(first[g])], want_correct=not bool(all_right[g]))
                picks += found
                targets += [g] * len(found)
        out = rollouts
        if picks:
            replayed = self.rows.select(torch.tensor(picks)).to(rollouts.completion_ids.device)
            if rollouts.advantages is not None:  # placeholders (Eq. 3 below replaces every advantage)
                shape = replayed.completion_ids.shape if rollouts.advantages.dim() == 2 else (len(picks),)
                replayed = replayed.replace(advantages=rollouts.advantages.new_zeros(shape))
            out = RolloutBatch.cat([rollouts, replayed])
            out = out.replace(group_ids=torch.cat([gids, torch.tensor(targets, dtype=gids.dtype, device=gids.device)]))
        self.last_replayed = len(picks)
        advantages = r3_advantage(out.rewards, out.group_ids, alpha=self.alpha, lam=self.lam, num_groups=num_groups)  # (B',)
        if rollouts.advantages is not None and rollouts.advantages.dim() == 2:  # token-level estimator: broadcast
            advantages = advantages[:, None].expand(-1, out.completion_ids.shape[1]) * out.completion_mask
        self.store(rollouts, keys)
        return out.replace(advantages=advantages)

    # ------------------------------------------------------------------ checkpointed state
    def get_extra_state(self) -> dict:
        return {"rows": self.rows.state_dict() if self.rows is not None else {}, "keys": list(self.keys)}

    def set_extra_state(self, state: dict) -> None:
        self.rows = RolloutBatch.from_state(state["rows"])
        self.keys = list(state["keys"])
