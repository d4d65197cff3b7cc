"""The Policy interface: what the update loop needs from any policy, and nothing about what it is.

A causal LM (``causal_lm.py``), a categorical or Gaussian policy over actions (``toy.py``), a masked-diffusion LM,
a diffusion sampler (actions = denoising transitions, Gaussian step log-probs), a VLM or a multi-turn agent each
implement these four things; the loop (``common/loop.py``) calls nothing else:

    rollout(prompts, n, greedy)          -> RolloutBatch, n samples per prompt, group id = prompt
    forward(batch, epoch, reference)     -> PolicyOutput: log π(a_t | s_t) and entropies (B, T), 0 off the mask
    trainable_parameters()               -> the parameters the optimiser updates
    sync()                               -> the rollout engine samples from the current weights

Randomness that a log-prob estimator needs (the mask seed of a masked-diffusion LM, the noise of a diffusion
step) is not drawn inside ``forward``: it is a function of what the batch records (``batch.seeds``) and of the
inner epoch, so old, reference and current log-probs of one epoch see the same draw whatever the minibatch or
micro-batch split. Such a policy sets ``epoch_dependent = True`` and the loop computes old log-probs per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch


@dataclass
class PolicyOutput:
    logprobs: Tensor  # (B, T) log π of the batch's actions, 0 off the mask
    entropy: Tensor  # (B, T) entropy of the action distribution, 0 off the mask
    hidden: Tensor | None = None  # (B, T, H) features at the action positions, when asked for (critics, distillation)


class Policy(nn.Module):
    """Base class of every policy the loop trains (see the module docstring).

    Class attributes:
        provides: optional RolloutBatch fields that ``rollout`` fills (checked against what parts require).
        epoch_dependent: log-probs depend on the inner epoch (a per-epoch seed): old log-probs are per epoch.
    """

    provides: ClassVar[tuple[str, ...]] = ()
    epoch_dependent: ClassVar[bool] = False
    horizon: int | None = None  # T_max, the action budget of a rollout (the constant of Dr. GRPO's normaliser)

    def rollout(self, prompts: Any, n: int, *, greedy: bool = False) -> RolloutBatch:
        raise NotImplementedError

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def enable_reference(self) -> None:
        """Make ``forward(..., reference=True)`` available (a frozen copy, or the adapter switched off)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference policy")

    def refresh_reference(self, alpha: float = 1.0, *, dry_run: bool = False) -> None:
        """Move the reference toward the current weights, ref <- alpha·θ + (1 − alpha)·ref (alpha = 1 copies; TRL's
        ``sync_ref_model``, TR-DPO, Gorbatovski et al. 2024, arXiv 2404.09656). ``dry_run``: only raise (naming
        the argument at fault) if this policy cannot, checked once at start-up. ``mix_weights_`` does the mixing."""
        raise NotImplementedError(f"{type(self).__name__} cannot refresh its reference policy (no refresh_reference)")

    def sync(self) -> None:
        """Push the current weights to the rollout engine (a no-op when it samples from these weights)."""

    def sampler_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log π of the batch's actions as the rollout engine computes them (B, T): the conformance test compares
        them with ``forward`` after an optimiser step, so a sync that binds nothing fails."""
        return self(batch).logprobs


@torch.no_grad()
def mix_weights_(reference: nn.Module, current: nn.Module, alpha: float) -> None:
    """In place: every floating parameter and buffer of ``reference`` <- alpha · current's + (1 − alpha) · its own
    (alpha = 1: an exact copy). The two modules must have the same structure (a deep copy); tied weights are mixed
    once (``named_parameters`` lists a shared tensor once)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1] (the weight of the current policy in the mix), got {alpha}")
    for kind in ("named_parameters", "named_buffers"):
        mine, theirs = dict(getattr(reference, kind)()), dict(getattr(current, kind)())
        if mine.keys() != theirs.keys():
            raise ValueError(f"mix_weights_: the reference's {kind[6:]} differ from the policy's "
                             f"({sorted(mine.keys() ^ theirs.keys())[:3]}...); expected a copy of the same network")
        for name, r in mine.items():
            if not r.is_floating_point():
                continue
            p = theirs[name].to(r.dtype)
            r.copy_(p) if alpha == 1 else r.lerp_(p, alpha)  # r + α (p − r)
