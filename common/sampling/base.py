"""Selection after advantages (DESIGN step 5): filters, down-sampling, curricula, buffers."""

from __future__ import annotations

from common.batch import RolloutBatch


class Selector:
    """Base class: ``selector(rollouts) -> rollouts`` keeps, drops or adds rows after advantages are computed.

    Stateful selectors (buffers) also subclass ``torch.nn.Module`` so their state is checkpointed.
    """

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        raise NotImplementedError
