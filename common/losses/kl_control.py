"""Controllers of the in-reward KL coefficient β (the loop's ``kl_in_reward``): fixed, or adapted to a target KL.

The loop subtracts β · KL_i from each reward, KL_i = Σ_t k1_it the sequence's KL estimate to the reference
(common/loop.py, step 3). A controller holds β in a buffer and sees each sampling round's KL:

    KLController(coef)                       β constant (a plain float ``kl_in_reward`` is this)
    AdaptiveKLController(init_coef, target, horizon)
        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)        proportional error, clipped
        β_{t+1} = β_t · (1 + K_β e_t),  K_β = n_t / horizon  n_t = sequences in the round

Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving, "Fine-Tuning Language Models from Human
Preferences", arXiv 1909.08593, §2.2 (KL_target 6 nats for sentiment, 10 for descriptiveness); as
lm-human-preferences' and OpenRLHF's ``AdaptiveKLController`` (``update(current, n_steps)``). KL_t is the round's mean
of the per-sequence KL the reward subtracts (Σ over completion tokens of k1, in nats), the quantity Ziegler et al.
target; under data parallelism the mean and n_t are over every rank (``all_reduce``), so all ranks keep one β.

The adaptive β is a persistent buffer (``coef``): it is in the Lightning checkpoint and a resumed run continues
from it. The module logs the β each round used as ``train/kl_coef`` and the round's KL_t as ``train/kl_in_reward``.

YAML (the module's ``kl_in_reward`` takes a float or a controller)::

    kl_in_reward:
      class_path: common.losses.kl_control.AdaptiveKLController
      init_args: {init_coef: 0.05, target: 6.0, horizon: 10000}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class KLController(nn.Module):
    """A fixed in-reward KL coefficient β (0 = no KL in the reward). β comes from the configuration, so it is not
    checkpointed (existing checkpoints load unchanged).

    Args:
        coef: β >= 0.
    """

    def __init__(self, coef: float = 0.0):
        super().__init__()
        if not coef >= 0:
            raise ValueError(f"{type(self).__name__}: coef must be >= 0 (the in-reward KL coefficient β), got {coef}")
        self.register_buffer("coef", torch.tensor(float(coef)), persistent=self.stateful)  # () β of the next round
        self.register_buffer("used_coef", torch.tensor(float(coef)), persistent=False)  # () β of the last round
        self.register_buffer("last_kl", torch.zeros(()), persistent=False)  # () KL_t of the last round
        self.active = self.stateful or coef > 0  # the reward carries a KL term (the loop computes reference log-probs)

    stateful = False  # does ``coef`` change during training (then it is checkpointed)?

    def observe(self, kl: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Record a round's per-sequence KL (B,) (the β just used is ``coef``) and adapt β. No host sync."""
        stats = torch.stack([kl.detach().float().sum(), torch.tensor(float(kl.numel()), device=kl.device)])  # (2,)
        if all_reduce is not None:
            stats = all_reduce(stats)  # Σ over ranks: global KL sum and sequence count
        n = stats[1]
        mean = stats[0] / n.clamp(min=1)  # () KL_t; 0 for an empty round
        self.used_coef.copy_(self.coef)
        self.last_kl.copy_(mean)
        self.update(mean, n)

    def update(self, kl: Tensor, n: Tensor) -> None:
        """β after a round with mean KL ``kl`` over ``n`` sequences (both () tensors): unchanged here."""

    def metrics(self) -> dict[str, Tensor]:
        """``kl_coef`` (β the last round used) and ``kl_in_reward`` (its mean per-sequence KL); {} when inactive."""
        return {"kl_coef": self.used_coef.clone(), "kl_in_reward": self.last_kl.clone()} if self.active else {}

    def extra_repr(self) -> str:
        return f"coef={float(self.coef):g}"


class AdaptiveKLController(KLController):
    """β adapted toward a target KL (Ziegler et al. 2019, arXiv 1909.08593, §2.2; module docstring).

    Args:
        init_coef: β_0 > 0 (the update is multiplicative: 0 would stay 0).
        target: KL_target > 0, nats per sequence (Σ_t k1 of a completion).
        horizon: samples over which β may change by the clip's ±20 % (K_β = n_t / horizon); OpenRLHF / Ziegler 10000.
    """

    stateful = True

    def __init__(self, init_coef: float = 0.05, target: float = 6.0, horizon: float = 10000.0):
        problems = []
        if not init_coef > 0:
            problems.append(f"init_coef must be > 0 (β_0; the update is multiplicative), got {init_coef}")
        if not target > 0:
            problems.append(f"target must be > 0 (KL_target in nats per sequence), got {target}")
        if not horizon > 0:
            problems.append(f"horizon must be > 0 (samples; K_β = n / horizon), got {horizon}")
        if problems:
            raise ValueError("AdaptiveKLController: " + "; ".join(problems))
        super().__init__(init_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl: Tensor, n: Tensor) -> None:
        error = (kl / self.target - 1).clamp(-0.2, 0.2)  # () e_t
        self.coef.mul_(1 + error.to(self.coef.device) * n.to(self.coef.device) / self.horizon)  # β (1 + K_β e_t)

    def extra_repr(self) -> str:
        return f"coef={float(self.coef):g}, target={self.target:g}, horizon={self.horizon:g}"


def as_controller(kl_in_reward: float | KLController) -> KLController:
    """A controller for the loop's ``kl_in_reward``: a float is the fixed case."""
    if isinstance(kl_in_reward, KLController):
        return kl_in_reward
    if isinstance(kl_in_reward, bool) or not isinstance(kl_in_reward, (int, float)):
        raise ValueError("kl_in_reward must be a number >= 0 or a common.losses.kl_control.KLController, got "
                         f"{type(kl_in_reward).__name__}")
    if not kl_in_reward >= 0:
        raise ValueError(f"kl_in_reward must be >= 0 (the in-reward KL coefficient), got {kl_in_reward}")
    return KLController(float(kl_in_reward))
