"""Toy tasks for policies that are not language models (``common/policies/toy.py``), trained by the same loop and
module as every domain: a contextual bandit for ``CategoricalPolicy`` and a reach-the-target chain for
``GaussianPolicy``. Used by the loop's conformance tests, by reproductions that need a cheap policy, and from YAML
(``configs/toy/*.yaml``)::

    advlab fit --config configs/toy/bandit_grpo.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.data import SEED_STRIDE, ResumableData
from common.module import PolicyOptimizationModule
from common.policies.base import Policy


class ToyTask:
    """A task: prompts (dicts with a ``"context"``) and the reward of a batch's actions."""

    def prompts(self, n: int, seed: int) -> list[dict]:
        raise NotImplementedError

    def reward(self, batch: RolloutBatch) -> Tensor:  # (B,)
        raise NotImplementedError

    def correct(self, batch: RolloutBatch) -> Tensor | None:  # (B,) bool
        return None


class Bandit(ToyTask):
    """Contextual bandit: contexts x ~ N(0, I_C); arm k pays 1 if k = argmax_k (W x)_k, else 0 (W fixed by ``seed``).

    Args:
        context_dim: C.
        num_actions: K.
        seed: draws W.
    """

    def __init__(self, context_dim: int = 4, num_actions: int = 4, seed: int = 0):
        self.context_dim, self.num_actions = context_dim, num_actions
        self.W = torch.randn(num_actions, context_dim, generator=torch.Generator().manual_seed(seed))  # (K, C)

    def prompts(self, n: int, seed: int) -> list[dict]:
        x = torch.randn(n, self.context_dim, generator=torch.Generator().manual_seed(seed))
        return [{"context": row} for row in x.tolist()]

    def best(self, x: Tensor) -> Tensor:  # (B, C) -> (B,)
        return (x.float() @ self.W.T.to(x.device)).argmax(-1)

    def reward(self, batch: RolloutBatch) -> Tensor:
        return self.correct(batch).float()

    def correct(self, batch: RolloutBatch) -> Tensor:
        return batch.completion_ids[:, 0] == self.best(batch.inputs["context"])


class GaussianTarget(ToyTask):
    """Reach a target: the chain's end state s_T = x + Σ_t a_t should be g = −x (reward −‖s_T − g‖², 0 is best).

    Args:
        dim: D.
    """

    def __init__(self, dim: int = 2):
        self.dim = dim

    def prompts(self, n: int, seed: int) -> list[dict]:
        x = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed))
        return [{"context": row} for row in x.tolist()]

    def reward(self, batch: RolloutBatch) -> Tensor:
        x = batch.inputs["context"]  # (B, D)
        end = x + (batch.completion_ids * batch.completion_mask[..., None]).sum(1)  # (B, D)
        return -(end + x).pow(2).sum(-1).float()


class ToyModule(PolicyOptimizationModule):
    """The shared module with a toy task's reward (``task.reward`` of the batch's actions, not of text).

    Args:
        policy: a non-LM policy (``common.policies.toy.CategoricalPolicy``, ``GaussianPolicy``).
        task: the toy task.
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule`.
    """

    def __init__(self, policy: Policy, task: ToyTask, **kwargs: Any):
        super().__init__(policy, **kwargs)
        self.task = task

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        r = self.task.reward(rollouts).to(rollouts.completion_mask.device)  # (B,)
        return rollouts.replace(rewards=r, reward_components=r[:, None], reward_names=("task",),
                                correct=self.task.correct(rollouts))

    def validation_step(self, prompts: list[dict], batch_idx: int) -> None:
        greedy = self.score(self.policy.rollout(prompts, 1, greedy=True))
        self.log("val/reward", greedy.rewards.mean(), prog_bar=True, batch_size=len(prompts))


class ToyData(ResumableData):
    """Prompts of a toy task: ``train_size`` training and ``val_size`` validation contexts, streamed from the exact
    data position (``common.data.ResumableData``).

    Args:
        task: the toy task.
        train_size, val_size: numbers of contexts.
        prompts_per_step: prompts per training batch.
        seed: draws the contexts (validation with ``seed + SEED_STRIDE``) and shuffles the stream.
    """

    def __init__(self, task: ToyTask, train_size: int = 256, val_size: int = 64, prompts_per_step: int = 8, seed: int = 0):
        super().__init__(prompts_per_step, val_size, seed)
        self.task, self.train_size, self.val_size = task, train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        if not self.val_set:
            self.train_set = self.task.prompts(self.train_size, self.seed)
            self.val_set = self.task.prompts(self.val_size, self.seed + SEED_STRIDE)
