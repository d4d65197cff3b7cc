"""SPO single-stream ("Single-stream Policy Optimization", Xu & Ding 2025, arXiv 2509.13232; shared/methods/text.md
§11): the policy-drift feed of the per-prompt value tracker.

The tracker (``common.advantages.tracker.SPOTracker``, the loop's estimator) forgets a prompt's value by how far
the policy moved since the prompt was last seen: ρ = clamp(2^(−D/D_half), ρ_min, ρ_max), D = K_total − K_at_visit.
This part adds one update's drift to K_total:

    K_total ← K_total + max(0, mean_{valid tokens} k3(log π_before, log π_after))     on the step's own completions

with π_before = the batch's ``old_logprobs`` (the loop computes them because ``needs_old_logprobs``) and π_after one
no-grad forward after the optimiser steps. Logged: ``train/spo_kl`` and ``train/spo_value`` (the tracker's mean v̂
over visited prompts).

Under data parallelism the mean is over every rank's valid tokens (sum and count all-reduced), so K_total, like the
tracker's other state, is equal on every rank.

Components it wires:
    advantage   ``common.advantages.tracker.SPOTracker`` (requires ``prompt_uid``)
    method      ``common.methods.sample_fields.SampleFields`` with ``{prompt_uid: uid}`` fills that field
    data        ``text_reasoning.spo.PrioritisedData`` tags ``uid`` and draws prompts by the tracker's priority
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.advantages.tracker import SPOTracker
from common.batch import RolloutBatch
from common.losses.kl import kl_estimate
from common.methods.base import Method
from common.ops import masked_sum

if TYPE_CHECKING:
    from common.loop import Loop


class SPOStream(Method):
    """Feeds the loop's ``SPOTracker`` the KL(π_before ‖ π_after) of every update (module docstring)."""

    needs_old_logprobs = True

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.advantage, SPOTracker):
            raise ValueError(f"SPOStream needs advantage common.advantages.tracker.SPOTracker, got "
                             f"{type(loop.advantage).__name__}")

    @torch.no_grad()
    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        tracker = loop.advantage
        after = loop.logprobs(batch)  # (B, T) log π_after
        mask = batch.completion_mask
        k3 = masked_sum(kl_estimate(batch.old_logprobs, after, "k3"), mask)  # () Σ k3 over this rank's valid tokens
        sums = torch.stack([k3, mask.sum().to(k3.dtype)])  # (2,) Σ k3, valid tokens
        if loop.all_reduce is not None:  # DDP: the global batch's mean, so K_total is equal on every rank
            sums = loop.all_reduce(sums)
        kl = sums[0] / sums[1].clamp(min=1)  # () KL(π_before ‖ π_after) over every rank's valid tokens
        tracker.observe_kl(kl)
        visited = tracker.visits > 0  # (N,)
        return {"spo_kl": kl, "spo_value": (tracker.value() * visited).sum() / visited.sum().clamp(min=1)}
