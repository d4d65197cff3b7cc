"""GRPO-family training for math and logic reasoning with a causal LM and its chat template.

The update loop is the shared one (common/loop.py) and the policy is ``common.policies.causal_lm.CausalLMPolicy``;
this module only builds that policy from its arguments, says which completions count as correct, and scores
validation: greedy accuracy on held-out problems and, optionally, unbiased pass@k from sampled completions.
Methods (T-PPO's critic, SDPO's teacher, ADHint's hints, ...) are parts listed in ``methods``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from common.batch import RolloutBatch
from common.metrics import PassAtK
from common.models import LoRA, PolicySource, TinyLlama
from common.module import PolicyOptimizationModule
from common.policies.agent import MultiTurnAgentPolicy
from common.policies.causal_lm import CausalLMPolicy
from common.rewards.base import RewardFunction
from common.rollout.base import RolloutBackend, Sampling
from common.rollout.env import Environment, EpisodeLimits, EpisodeReturn
from text_reasoning.rewards import TaskReward


class TextReasoningModule(PolicyOptimizationModule):
    """Reasoning tasks (arithmetic, countdown, logic, GSM8K/MATH files) with a chat-tuned causal LM.

    Args:
        policy: where the weights come from (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``).
        sampling: sampling options for training rollouts.
        rollout_backend: generation backend (default HF ``generate``; ``common.rollout.vllm.VLLMBackend``).
        lora: LoRA adapters (None = full fine-tuning; the reference is then the adapter switched off).
        share_prompt: run each group's prompt once in the update (exact; about G times fewer prompt tokens).
        logprob_chunk_size: rows per chunk of the chunked log-softmax.
        chat_template_kwargs: variables for the chat template (e.g. ``{enable_thinking: false}``), passed to
            ``apply_chat_template``.
        chat_template: a Jinja chat template string, or the path of a file holding one, instead of the tokenizer's.
        gradient_checkpointing: recompute each decoder layer in the backward instead of keeping its activations
            (less memory, about one more forward; exact, shared-prompt cache included).
        pack: padding-free forwards, each micro-batch's sequences in one packed row (``CausalLMPolicy(pack=...)``;
            exact; bound the row with ``micro_batch_tokens``). Plain causal LMs only.
        verifier: decides correctness (accuracy, pass@k); default the task's answer check. If ``rewards`` is
            empty the verifier is also the training reward.
        system_prompt: optional system message placed before every problem.
        instruction: text appended to every problem (e.g. "Put the final answer in \\boxed{}.").
        val_pass_k: k of the validation pass@k, from k sampled completions per problem (0 = off).
        environment: a text environment (``common.rollout.env.Environment``): the causal LM then acts in it for
            several turns (``common.policies.agent.MultiTurnAgentPolicy``, one sequence per episode) and the
            default verifier is the episode's return (``EpisodeReturn``). None = single-turn completions.
        episode: the agent's episode limits (``common.rollout.env.EpisodeLimits``; only with ``environment``).
        policy_kind: the CausalLMPolicy class built from these arguments (by import path in YAML), e.g.
            ``multimodal.vlm.policy.VLMPolicy`` for a vision-language model whose samples carry an image.
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule` but ``policy``.
    """

    provides = ("correct",)

    def __init__(
        self,
        policy: PolicySource | None = None,
        sampling: Sampling | None = None,
        rollout_backend: RolloutBackend | None = None,
        lora: LoRA | None = None,
        share_prompt: bool = True,
        logprob_chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        verifier: RewardFunction | None = None,
        system_prompt: str | None = None,
        instruction: str = "",
        val_pass_k: int = 0,
        environment: Environment | None = None,
        episode: EpisodeLimits | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
        policy_kind: type[CausalLMPolicy] = CausalLMPolicy,
        pack: bool = False,
        **kwargs: Any,
    ):
        if episode is not None and environment is None:
            raise ValueError("TextReasoningModule: episode limits are given but no environment")
        lm = policy_kind(policy if policy is not None else TinyLlama(), sampling, rollout_backend, lora,
                            system_prompt, instruction, share_prompt, logprob_chunk_size,
                            gradient_checkpointing=gradient_checkpointing,
                            chat_template_kwargs=chat_template_kwargs, chat_template=chat_template,
                            **({"pack": True} if pack else {}))  # VLM policies take no `pack`
        agent = lm if environment is None else MultiTurnAgentPolicy(lm, environment, episode)
        if verifier is None:
            verifier = TaskReward() if environment is None else EpisodeReturn()
        if not kwargs.get("rewards"):
            kwargs["rewards"] = [verifier]
        super().__init__(agent, **kwargs)
        self.verifier = verifier
        self.val_pass_k = val_pass_k
        self.val_accuracy = MeanMetric()
        self.val_pass = PassAtK(val_pass_k) if val_pass_k > 0 else None
        self.val_history: list[tuple[int, float, int]] = []  # (global step, greedy accuracy, problems)

    def verify(self, rollouts: RolloutBatch) -> torch.Tensor:  # (B,) bool
        return torch.as_tensor(self.verifier(rollouts.completions, rollouts.samples), dtype=torch.float32).to(self.device) > 0.5

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        greedy = self.policy.rollout(prompts, 1, greedy=True)
        self.val_accuracy.update(self.verify(greedy).float())
        if self.val_pass is not None:
            sampled = self.policy.rollout(prompts, self.val_pass_k)
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
