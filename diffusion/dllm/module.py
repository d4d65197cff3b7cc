"""The dllm domain module: GRPO-family training of a masked-diffusion LM on the shared loop.

The loop is ``common/loop.py``'s and the policy is :class:`diffusion.dllm.policy.MaskedDiffusionPolicy`; this module
only builds that policy from its arguments, says which completions are correct (the task's verifier) and scores
validation (greedy accuracy). diffu-GRPO (d1) is a recipe of it (``configs/diffusion/d1.yaml``); IGPO adds a method.

Every validation also appends its evaluation record (``diffusion.dllm.evaluation.EvaluationRecord``: prompt
template, EOS rule, T, steps, block length, temperature, split hash) with the accuracy to
``evaluation_records.jsonl`` in the run's log folder.
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
from diffusion.dllm.evaluation import EvaluationRecord
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
        self.val_problems: list[dict] = []  # the problems of the current validation (its split hash)
        self.evaluation_record: EvaluationRecord | None = None  # the last validation's record

    def verify(self, rollouts: RolloutBatch) -> torch.Tensor:  # (B,) bool
        return torch.as_tensor(self.verifier(rollouts.completions, rollouts.samples), dtype=torch.float32).to(self.device) > 0.5

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        self.val_accuracy.update(self.verify(self.policy.rollout(prompts, 1, greedy=True)).float())
        self.val_problems.extend(prompts)

    def on_validation_epoch_end(self) -> None:
        acc, n = self.val_accuracy.compute(), int(self.val_accuracy.weight)
        self.log("val/accuracy", acc, prog_bar=True)
        self.val_accuracy.reset()
        split = getattr(self.trainer.datamodule, "val_set", None) or self.val_problems  # the whole split (all ranks)
        self.evaluation_record = EvaluationRecord.of(self.policy, split, greedy=True, verifier=self.verifier)
        self.val_problems = []
        folder = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and folder:
            self.evaluation_record.append(f"{folder}/evaluation_records.jsonl", step=int(self.global_step),
                                          accuracy=float(acc), n=n)


__all__ = ["DiffusionLMModule"]
