"""Selection after advantages (DESIGN step 5): filters, down-sampling, curricula, buffers."""

from __future__ import annotations

from common.batch import RolloutBatch


class Selector:
    """Base class: ``selector(rollouts) -> rollouts`` keeps, drops or adds rows after advantages are computed.

    Refill (DAPO's dynamic sampling): while ``wants_more(kept)`` is true, the loop samples the next prompts of the
    training data (up to ``max_generation_rounds`` rounds; ``Loop.collect``), selects from the new rollouts and
    appends them to ``kept``;
    ``finalize(kept)`` then trims the result (e.g. to a target number of groups).
    Stateful selectors (buffers) also subclass ``torch.nn.Module`` so their state is checkpointed.
    """

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        raise NotImplementedError

    def wants_more(self, kept: RolloutBatch) -> bool:
        return False

    def finalize(self, kept: RolloutBatch) -> RolloutBatch:
        return kept
