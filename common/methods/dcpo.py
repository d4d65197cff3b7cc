"""DCPO's segment sampler as a Method (Memory-as-Action, arXiv 2510.12635; agentic.md §11): after the rollout,
keep exactly ``segments_per_prompt`` segment rows per prompt (``common.advantages.dcpo.sample_segments``), every
trajectory at least once when the prompt has at most that many. Pair with ``common.advantages.dcpo.DCPO``.
"""

from __future__ import annotations

import torch

from common.advantages.dcpo import sample_segments
from common.batch import RolloutBatch
from common.methods.base import Method


class DCPOSegmentSampler(Method):
    """Keep ``segments_per_prompt`` segment rows per prompt (a row is one segment: ``episode_ids`` names its
    trajectory). The sampler's RNG state is a buffer, so a resumed run draws the same segments.

    Args:
        segments_per_prompt: rows kept per prompt (the authors' ``rollout.n``, 12 with 8 trajectories).
        seed: seed of the sampler's generator.
    """

    requires = ("episode_ids",)

    def __init__(self, segments_per_prompt: int = 12, seed: int = 0):
        super().__init__()
        if not isinstance(segments_per_prompt, int) or segments_per_prompt < 1:
            raise ValueError(f"segments_per_prompt must be a positive integer, got {segments_per_prompt!r}")
        self.segments_per_prompt = segments_per_prompt
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("rng_state", gen.get_state(), persistent=True)

    def after_rollout(self, loop, batch: RolloutBatch) -> RolloutBatch:
        gen = torch.Generator()
        gen.set_state(self.rng_state.cpu())
        rows = sample_segments(batch.episode_ids, batch.group_ids, self.segments_per_prompt, gen)
        self.rng_state.copy_(gen.get_state())
        return batch.select(rows.to(batch.group_ids.device))
