"""The dllm domain module: GRPO-family training of a masked-diffusion LM on the shared loop.

The loop is ``common/loop.py``'s and the policy is :class:`diffusion.dllm.policy.MaskedDiffusionPolicy`; this module
only builds that policy from its arguments, says which completions are correct (the task's verifier) and scores
validation (greedy accuracy). diffu-GRPO (d1) is a recipe of it (``configs/diffusion/d1.yaml``); IGPO adds a method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from common.batch import RolloutBatch
from common.models import PolicySource
from common.module import PolicyOptimizationModule
from common.rewards.base import RewardFunction
from diffusion.dllm.data import ALPHABET
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy
from diffusion.dllm.rewards import ChainSumCorrect, ChainSumReward


class DiffusionLMModule(PolicyOptimizationModule):
    """A masked-diffusion LM trained by the shared loop.

    Args:
        policy: where the weights come from (default ``TinyDiffusionLM`` over the chain-sum alphabet).
        gen_length, block_length, steps, temperature: the LLaDA sampler's settings (``MaskedDiffusionPolicy``).
        p_mask: prompt-mask probability of d1's one-step estimator (0.15 in d1).
        logprob_temperature: temperature of the estimator's softmax.
        include_eos_padding: train on the EOS padding after the first EOS too (LLaDA / d1 / IGPO code).
        verifier: decides correctness (accuracy); default ``ChainSumCorrect``. Default training reward:
            ``ChainSumReward`` (answer 1.0 + format 0.1).
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule` but ``policy``.
    """

    provides = ("correct",)

    def __init__(self, policy: PolicySource | None = None, gen_length: int = 12, block_length: int = 12, steps: int = 6,
                 temperature: float = 1.0, p_mask: float = 0.15, logprob_temperature: float = 1.0,
                 include_eos_padding: bool = False, verifier: RewardFunction | None = None, **kwargs: Any):
        lm = MaskedDiffusionPolicy(policy if policy is not None else TinyDiffusionLM(alphabet=ALPHABET), gen_length,
                                   block_length, steps, temperature, p_mask, logprob_temperature, include_eos_padding)
        if not kwargs.get("rewards"):
            kwargs["rewards"] = [ChainSumReward()]
        super().__init__(lm, **kwargs)
        self.verifier = verifier if verifier is not None else ChainSumCorrect()
        self.val_accuracy = MeanMetric()

    def verify(self, rollouts: RolloutBatch) -> torch.Tensor:  # (B,) bool
        return torch.as_tensor(self.verifier(rollouts.completions, rollouts.samples), dtype=torch.float32).to(self.device) > 0.5

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        self.val_accuracy.update(self.verify(self.policy.rollout(prompts, 1, greedy=True)).float())

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.val_accuracy.reset()


__all__ = ["DiffusionLMModule"]
