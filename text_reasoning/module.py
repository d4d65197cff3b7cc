"""GRPO-family training for math and logic reasoning with a causal LM and its chat template.

The update loop is the shared one (common/module.py); this module only says how prompts become token ids
(chat template, left padding), which completions count as correct, and how validation is scored: greedy
accuracy on held-out problems and, optionally, unbiased pass@k from sampled completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from common.batch import RolloutBatch
from common.metrics import PassAtK
from common.module import PolicyOptimizationModule
from common.rewards.base import RewardFunction
from text_reasoning.rewards import TaskReward


class TextReasoningModule(PolicyOptimizationModule):
    """Reasoning tasks (arithmetic, countdown, logic, GSM8K/MATH files) with a chat-tuned causal LM.

    Args:
        verifier: decides correctness (accuracy, pass@k); default the task's answer check. If ``rewards`` is
            empty the verifier is also the training reward.
        system_prompt: optional system message placed before every problem.
        instruction: text appended to every problem (e.g. "Put the final answer in \\boxed{}.").
        val_pass_k: k of the validation pass@k, from k sampled completions per problem (0 = off).
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule`.
    """

    def __init__(
        self,
        *args: Any,
        verifier: RewardFunction | None = None,
        system_prompt: str | None = None,
        instruction: str = "",
        val_pass_k: int = 0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.verifier = verifier if verifier is not None else TaskReward()
        if not self.reward_fns:
            self.reward_fns = [self.verifier]
            self.reward_weights = torch.ones(1)
        self.system_prompt, self.instruction, self.val_pass_k = system_prompt, instruction, val_pass_k
        self.val_accuracy = MeanMetric()
        self.val_pass = PassAtK(val_pass_k) if val_pass_k > 0 else None
        self.val_history: list[tuple[int, float, int]] = []  # (global step, greedy accuracy, problems)

    def encode_prompts(self, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-template and left-pad prompts. Shapes: -> ids (P, L) long, mask (P, L) bool."""
        texts = []
        for s in samples:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": s["prompt"] + self.instruction})
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def rollout(self, prompts: Sequence[dict], *, greedy: bool = False, num_samples: int | None = None) -> RolloutBatch:
        n = num_samples or (1 if greedy else self.group_size)
        ids, mask = self.encode_prompts(prompts)
        batch = self.backend.generate(self.policy, self.tokenizer, ids, mask, n, self.sampling, greedy=greedy)
        samples = [dict(s) for s in prompts for _ in range(n)]
        return batch.replace(samples=samples)

    def verify(self, rollouts: RolloutBatch) -> torch.Tensor:  # (B,) bool
        return torch.as_tensor(self.verifier(rollouts.completions, rollouts.samples), dtype=torch.float32).to(self.device) > 0.5

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        rollouts = super().score(rollouts)
        return rollouts.replace(correct=self.verify(rollouts))

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        greedy = self.rollout(prompts, greedy=True)
        self.val_accuracy.update(self.verify(greedy).float())
        if self.val_pass is not None:
            sampled = self.rollout(prompts, num_samples=self.val_pass_k)
            self.val_pass.update(self.verify(sampled).view(len(prompts), self.val_pass_k))

    def on_validation_epoch_end(self) -> None:
        n = int(self.val_accuracy.weight)
        acc = self.val_accuracy.compute()
        self.log("val/accuracy", acc, prog_bar=True)
        if self.val_pass is not None:
            self.log(f"val/pass@{self.val_pass_k}", self.val_pass.compute())
            self.val_pass.reset()
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(acc), n))
        self.val_accuracy.reset()
