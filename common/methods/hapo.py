"""HAPO: entropy-aware treatment of every token, in sampling, advantages and the loss.

"From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's Nature" (Heterogeneous Adaptive
Policy Optimization, arXiv 2509.16591; code github.com/starriver030515/HAPO). With H_t the entropy of the
next-token distribution and the normalised entropy h̃ of ``common/losses/hapo.py``

    z = log max(H, 1e-8);  q = ρ_piv-quantile of z;  s = RMS of (z − q);  h = (z − q)/s
    h̃ = h / max(h⁺)  if h > 0,   h / |min(h⁻)|  if h <= 0                               (h̃ ∈ [−1, 1])

the four parts are:

    1. adaptive temperature      T_t = T_0 · (1 + τ_T · clip(h̃_t, −1, 1)), h̃ from the previous step's statistics
    2. token-level group average A_i = (r_i − μ^tok_g)/(σ^tok_g + eps), length-weighted group statistics
    3. asymmetric adaptive clip  ε'_low = ε_low(1 − α h̃) where h̃ <= 0,  ε'_high = ε_high(1 + α h̃) where h̃ > 0
    4. advantage redistribution  Ã = A(1 + β h̃) outside (h̃ > 0) / inside (h̃ <= 0) the band around ρ = 1

Components it wires (the configs/text_reasoning/hapo.yaml recipe lists all four):
    sampling    this file: :class:`AdaptiveTemperature` (the logits processor and its checkpointed statistics) and
                :class:`AdaptiveTemperatureSampling` (the method part: hands the processor to the HF backend in
                ``setup``, feeds it the step's token entropies in ``after_update``)
    advantage   ``common.advantages.hapo.HAPOAdvantage`` (2)
    loss        ``common.losses.hapo.HAPOLoss`` (3, 4; dual-clip through ``common.losses.ppo_clip.clipped_surrogate``)

The temperature's statistics are those of the entropies of the tokens trained on in the last update (under
π_old; under DDP every rank's, gathered, so all ranks sample with the global batch's statistics), so high-entropy ("forking") tokens are sampled hotter and low-entropy ones colder. The public code's
negative branch divides by min(h) (a negative number), which makes h̃ >= 0 everywhere; the default follows the
paper's intent (sign-preserving) unless ``code_compat=True``. Before the first update (no statistics yet)
T = T_0. The HF backend hands the processor the scores at T_0 (logits / T_0, before top-k / top-p), so the
entropy that sets the factor is measured at T_0, the temperature of the entropies ``observe`` is fed (the policy's
forward at ``sampling.temperature``), and the recorded behaviour log-probs are those of the distribution actually
sampled, log-softmax(logits / (T_0 (1 + τ h̃))). The training log-probs stay at T_0 (the paper's choice), so
sampler and learner differ slightly here; ``RolloutCorrection`` with ``sampling.logprobs: true`` sees the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.hapo import EntropyStats, hapo_entropy_stats, normalised_entropy
from common.methods.base import Method
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.hf import HFBackend

if TYPE_CHECKING:
    from common.loop import Loop

# Entropies are floored before the log so a one-hot distribution (H = 0) gives a finite z.
_MIN_ENTROPY = 1e-8


class AdaptiveTemperature(nn.Module):
    """HAPO's adaptive temperature as a transformers logits processor, with checkpointed statistics (buffers).
    The statistics and h̃ are HAPO's normalised entropy from ``common.losses.hapo`` (one definition for the
    sampler and the loss).

    Args:
        tau: τ_T, the relative temperature swing (HAPO 0.05).
        pivot: ρ_piv, the entropy quantile that maps to h = 0 (HAPO 0.8).
        code_compat: reproduce the public code's sign bug (h̃ ≥ 0 everywhere).
    """

    def __init__(self, tau: float = 0.05, pivot: float = 0.8, code_compat: bool = False):
        super().__init__()
        if not 0 <= tau < 1:
            raise ValueError(f"tau must be in [0, 1) so temperatures stay positive, got {tau}")
        if not 0 < pivot < 1:
            raise ValueError(f"pivot must be a quantile in (0, 1), got {pivot}")
        self.tau, self.quantile, self.code_compat = tau, pivot, code_compat
        for name in EntropyStats._fields:  # q (pivot), s (scale), pos_scale, neg_scale
            self.register_buffer(name, torch.ones(()))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @property
    def stats(self) -> EntropyStats:
        return EntropyStats(*(getattr(self, name) for name in EntropyStats._fields))

    def normalised(self, z: Tensor) -> Tensor:
        """h̃ for log-entropies ``z`` under the stored statistics; any shape -> same shape, in [−1, 1]."""
        h = normalised_entropy(z.exp().reshape(1, -1), torch.ones(1, z.numel(), dtype=torch.bool), self.stats)
        return h.reshape(z.shape).clamp(-1.0, 1.0)

    @torch.no_grad()
    def observe(self, entropy: Tensor, mask: Tensor, all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> None:
        """Update the statistics from a step's token entropies. Shapes: (B, T), (B, T) bool. ``all_gather`` (a
        collective, e.g. ``common.distributed.all_gather_rows``): from every data-parallel rank's tokens, so every
        rank holds the statistics of the global batch."""
        entropy = entropy.float()
        if all_gather is not None:
            every, _ = all_gather(torch.stack([entropy.flatten(), mask.flatten().float()], 1))  # (L, 2) every rank's
            entropy, mask = every[None, :, 0], every[None, :, 1] > 0  # (1, L)
        if not bool(mask.any()):
            return
        for name, value in zip(EntropyStats._fields, hapo_entropy_stats(entropy, mask, self.quantile, self.code_compat)):
            getattr(self, name).copy_(value)
        self.ready.fill_(True)

    def temperature_factor(self, scores: Tensor) -> Tensor:
        """(1 + τ h̃) for next-token scores already at T_0 (logits / T_0, as ``HFBackend.sampling_processors``
        passes them), so H is the entropy at the base temperature. Shapes: (B, V) -> (B,)."""
        logp = torch.log_softmax(scores.float(), dim=-1)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B,) top-k/top-p -inf entries count 0
        h_tilde = self.normalised(torch.log(entropy.clamp(min=_MIN_ENTROPY)))
        return torch.where(self.ready, 1.0 + self.tau * h_tilde, torch.ones_like(h_tilde))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # transformers LogitsProcessor protocol
        """scores / T_0 (B, V) -> scores / (T_0 (1 + τ h̃)) (B, V)."""
        return scores / self.temperature_factor(scores)[:, None].to(scores.dtype)


class AdaptiveTemperatureSampling(Method):
    """HAPO's part 1 (module docstring): training rollouts are sampled at T_0·(1 + τ h̃) per token, with h̃ from the
    entropies of the tokens trained on in the previous update. Needs a causal-LM policy sampled by the HF backend
    (vLLM takes no custom logits processor); greedy validation is unaffected.

    Args:
        tau: τ_T, the relative temperature swing (HAPO 0.05).
        pivot: ρ_piv, the entropy quantile that maps to h = 0 (HAPO 0.8).
        code_compat: reproduce the public code's sign bug (h̃ ≥ 0 everywhere).
    """

    # every rank's rows, set by the Loop under data parallelism: the statistics are the global batch's on every rank
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    def __init__(self, tau: float = 0.05, pivot: float = 0.8, code_compat: bool = False):
        super().__init__()
        self.temperature = AdaptiveTemperature(tau, pivot, code_compat)

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.policy, CausalLMPolicy):
            raise ValueError(f"AdaptiveTemperatureSampling needs a CausalLMPolicy, got {type(loop.policy).__name__}")
        if not isinstance(loop.policy.backend, HFBackend):
            raise ValueError("AdaptiveTemperatureSampling samples through a logits processor of common.rollout.hf.HFBackend, "
                             f"got the backend {type(loop.policy.backend).__name__} (vLLM takes no custom processor)")
        if self.temperature not in loop.policy.backend.logits_processors:
            loop.policy.backend.logits_processors.append(self.temperature)

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        self.temperature.observe(batch.entropy, batch.loss_mask, self.all_gather)  # (B, T) under π_old, by the update
        return {}


__all__ = ["AdaptiveTemperature", "AdaptiveTemperatureSampling"]
