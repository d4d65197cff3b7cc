"""Reference-model refresh: every N optimiser steps, mix the current policy into the reference.

    π_ref <- α · π_θ + (1 − α) · π_ref       (weights; α = 1 copies the policy)

TR-DPO (Gorbatovski, Shaposhnikov, Malakhov, Surnachev, Aksenov, Maksimov, Balagansky, Gavrilov, "Learn Your
Reference Model for Real Good Alignment", arXiv 2404.09656, §3: "soft" update with α, "hard" update α = 1 every τ
steps), as TRL's ``sync_ref_model`` / ``ref_model_mixup_alpha`` (default 0.6) / ``ref_model_sync_steps`` (default 512).
The KL terms that read the reference (the loss's ``beta``, the loop's ``kl_in_reward``) then anchor the policy to
a recent copy of itself rather than to the initial model.

Listed under ``methods:`` like any method part::

    methods:
      - class_path: common.methods.ref_refresh.RefRefresh
        init_args: {every: 512, alpha: 0.6}

The refresh runs after the update in which the optimiser-step count reaches a multiple of ``every`` (the loop
takes ``mu`` x minibatches steps per update; the refresh is exactly every N steps when N is a multiple of that).
The step count is a checkpointed buffer and the reference weights are the policy's own submodule, so a resumed
run refreshes when the uninterrupted one would have. With a LoRA policy the reference is the base model with the
adapter off, which a refresh cannot move without merging the adapter: that is an error at start-up naming ``lora``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method

if TYPE_CHECKING:
    from common.loop import Loop


class RefRefresh(Method):
    """Every ``every`` optimiser steps, reference <- alpha · policy + (1 − alpha) · reference (module docstring).

    Args:
        every: N, optimiser steps between refreshes (>= 1).
        alpha: α in (0, 1], the current policy's weight in the mix (1 = copy, TR-DPO's hard update).
    """

    def __init__(self, every: int = 512, alpha: float = 0.6):
        super().__init__()
        problems = []
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            problems.append(f"every must be an integer >= 1 (optimiser steps between refreshes), got {every!r}")
        if not 0 < alpha <= 1:
            problems.append(f"alpha must be in (0, 1] (the policy's weight in the mix; 1 = copy), got {alpha}")
        if problems:
            raise ValueError("RefRefresh: " + "; ".join(problems))
        self.every, self.alpha = every, float(alpha)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps so far (checkpointed)
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long))

    def setup(self, loop: "Loop") -> None:
        if not loop.needs_reference:
            raise ValueError("RefRefresh: nothing reads a reference policy (the loss's beta is 0 and kl_in_reward is 0); "
                             "set one of them, or remove RefRefresh from methods")
        try:
            loop.policy.refresh_reference(self.alpha, dry_run=True)
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"RefRefresh: {err}") from None

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        B = batch.batch_size
        taken = loop.mu * -(-B // (loop.minibatch_size or B))  # the loop's optimiser steps this update (B > 0 here)
        before = int(self.steps)  # ok: a host read of a CPU-side counter, once per update
        self.steps += taken
        if (before + taken) // self.every > before // self.every:
            loop.policy.refresh_reference(self.alpha)
            self.refreshes += 1
        return {"ref_refreshes": self.refreshes.float()}
