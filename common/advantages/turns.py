"""The base of turn-level advantage estimators of multi-turn agents (shared/methods/agentic.md §1.5).

A :class:`TurnAdvantage` reads the batch's flat turn table (``common.segment_ops.turn_table``: episode, group, turn
index, per-turn reward / state key / validity, the episode's outcome) and computes one advantage per *turn*,
``A_turn (U,)``; the base broadcasts it to the turn's trained tokens, ``A_tok = where(tok_turn ≥ 0,
A_turn[tok_turn], 0)``, so one estimator serves both storage layouts (a row per episode, a row per turn or segment)
and environment tokens never carry an advantage. Subclasses implement :meth:`turn_advantages`; the estimator
itself is named in YAML by its import path like any other (``model.advantage.class_path``).
"""

from __future__ import annotations

from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.batch import RolloutBatch
from common.segment_ops import TurnTable, turn_table, turn_to_token


class TurnAdvantage(AdvantageEstimator):
    """``batch -> (B, T)`` token advantages from per-turn advantages (see the module docstring)."""

    min_group_size = 2  # group-relative: a task rolled out once gives 0 everywhere
    requires: tuple[str, ...] = ("episode_ids", "token_turn", "turn_mask")

    # statistics over the whole batch (MAPO's batch scope, a MultiScope scope without keys): under data parallelism
    # these would be one rank's, so such an estimator refuses to run with the Loop's all_reduce set (not supported yet)
    batch_scoped: bool = False

    def turn_advantages(self, tt: TurnTable) -> Tensor:  # (U,)
        raise NotImplementedError

    def __call__(self, batch: RolloutBatch) -> Tensor:  # (B, T)
        if self.all_reduce is not None and self.batch_scoped:
            raise ValueError(f"{type(self).__name__}: a batch-wide normalisation scope is not supported under data "
                             "parallelism yet (its statistics would be one rank's); run on one process or drop that scope")
        batch.require(type(self).__name__, *self.requires)
        check_rewards(batch.rewards)
        tt = turn_table(batch)
        a_turn = self.turn_advantages(tt)  # (U,)
        return turn_to_token(a_turn.to(batch.rewards.dtype), tt.tok_turn)  # (B, T)


def need(tt: TurnTable, owner: str, *names: str) -> None:
    """Raise naming the RolloutBatch field behind each missing turn-table column."""
    fields = {"reward": "turn_rewards", "state_key": "turn_keys", "valid": "turn_valid", "matched": "turn_matched",
              "kind": "turn_kinds", "process_reward": "process_rewards"}
    missing = [fields[n] for n in names if getattr(tt, n) is None]
    if missing:
        raise ValueError(f"{owner} needs RolloutBatch fields {missing}, which this batch does not carry")
