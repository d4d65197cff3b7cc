"""PolicyOptimizationModule: the Lightning face of the one RL loop (common/loop.py).

One ``training_step`` on a batch of prompts (or tasks, images, environments): ``loop.collect`` (steps 1-5:
rollout, score, reference log-probs, advantages, selection), ``loop.update`` (step 6: mu epochs of minibatch
optimiser steps), then logging (step 7). What is trained plugs in, and this file names none of it concretely:

- a **policy** (``common.policies``: a causal LM, a categorical or Gaussian policy, ...),
- **components** (estimator, loss, selector, reward functions), chosen by ``class_path`` in YAML,
- **methods** (``common.methods``): composable parts with hooks at the loop's steps, listed in YAML.

A domain module subclasses this one only to build its policy from its arguments, to say which rows are
correct (``verify``) and to score validation; it never overrides ``training_step``. The Trainer owns devices,
precision, logging and checkpointing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.completions_log import check_every, log_completions
from common.data import ResumableData
from common.distributed import all_gather_rows, all_reduce_sum
from common.fsdp import shard_module
from common.loop import Loop, Stepper
from common.losses.base import PolicyLoss
from common.losses.kl_control import KLController, as_controller
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.methods.canaries import with_canaries
from common.ops import masked_mean
from common.policies.base import Policy
from common.predict import PredictBatch, prediction_records
from common.rewards.base import RewardFunction, reward_name, score_components
from common.rank_state import load_rank_checkpoint, load_rank_module_state, save_rank_checkpoint, setup_rank
from common.schedules import lr_scheduler, schedule_problems
from common.sampling.base import Selector


class PolicyOptimizationModule(L.LightningModule):
    """The shared GRPO-family update loop (manual optimisation).

    Args:
        policy: the policy being trained (a ``common.policies.base.Policy``).
        rewards: reward functions ``fn(completions, samples) -> (B,)``; their weighted sum is the reward.
        reward_weights: one weight per reward function (default all 1).
        reward_failure: "raise" (default: name the failing prompt and completion) or "zero" (score 0, count it).
        advantage: the advantage estimator (default GRPO with group std).
        loss: the policy loss (default ``ClippedPolicyLoss()``: GRPO's clip 0.2, no KL).
        selector: optional filter / down-sampler / buffer applied after advantages (step 5).
        methods: method parts (``common.methods``), applied in order at every hook.
        group_size: G, completions per prompt.
        mu: epochs over each rollout batch (GRPO's μ; 1 = one pass).
        minibatch_size: rows per optimiser step (default: the whole rollout batch, one step per rollout).
        micro_batch_size: rows per forward/backward (gradient accumulation; does not change the result).
        micro_batch_tokens: a token budget per forward/backward instead (rows sorted by length; Loop's); exact too.
        kl_in_reward: coefficient of the per-sequence KL (k1) subtracted from the reward (0 = off; the
            in-loss KL is the loss's ``beta``), or a controller (``common.losses.kl_control.AdaptiveKLController``:
            β adapted to a target KL, checkpointed); logged as ``train/kl_coef``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule, warmup_steps, total_steps: lr x linear warm-up, then constant / linear / cosine decay to 0 at
            total_steps (default trainer.max_steps), per optimiser step; logged as train/lr (common/schedules.py).
        max_grad_norm: gradient clipping by global norm (0 = off).
        log_samples_every: steps between sample completions written to TensorBoard (0 = never).
        max_consecutive_skips: a non-finite loss or gradient skips the optimiser step (logged as
            ``train/skipped_steps``); this many skips in a row raise.
        reward_timeout_s: a reward function call that takes longer fails (then ``reward_failure`` decides);
            None = no limit.
        max_generation_rounds: how many rounds a step may sample while the selector wants more rows, each round
            after the first from the next prompts of the data module's stream (DAPO's dynamic sampling; 1 = once).
        canaries: add ``common.methods.canaries.Canaries()`` unless ``methods`` lists one (False = off).
        log_completions_every: steps between rows of ``<log_dir>/completions/rank<r>.jsonl`` (common/completions_log.py).
    """

    provides: tuple[str, ...] = ()  # RolloutBatch fields the domain's score/verify fills

    def __init__(
        self,
        policy: Policy,
        rewards: Sequence[RewardFunction] = (),
        reward_weights: Sequence[float] | None = None,
        reward_failure: Literal["raise", "zero"] = "raise",
        advantage: AdvantageEstimator | None = None,
        loss: PolicyLoss | None = None,
        selector: Selector | None = None,
        methods: Sequence[Method] = (),
        group_size: int = 8,
        mu: int = 1,
        minibatch_size: int | None = None,
        micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
        kl_in_reward: float | KLController = 0.0,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        log_samples_every: int = 10,
        max_consecutive_skips: int = 3,
        reward_timeout_s: float | None = 60.0,
        max_generation_rounds: int = 1,
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        canaries: bool = True, log_completions_every: int = 1,
    ):
        super().__init__()
        problems = []
        if not isinstance(policy, Policy):
            problems.append(f"policy must be a common.policies.base.Policy, got {type(policy).__name__}")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            problems.append(f"reward_weights has {len(reward_weights)} entries for {len(rewards)} reward functions")
        if reward_failure not in ("raise", "zero"):
            problems.append(f"reward_failure must be 'raise' or 'zero', got {reward_failure!r}")
        problems += schedule_problems(lr_schedule, warmup_steps, total_steps)
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.automatic_optimization = False
        self.policy = policy
        self.set_rewards(rewards, reward_weights)
        self.reward_failure, self.reward_timeout_s = reward_failure, reward_timeout_s
        self.advantage = advantage if advantage is not None else GRPO()
        self.loss_fn = loss if loss is not None else ClippedPolicyLoss()
        self.selector = selector
        self.kl_control = as_controller(kl_in_reward)  # a submodule: an adaptive β is in the checkpoint
        self.methods = torch.nn.ModuleList(with_canaries(methods, canaries))  # Canaries() appended by default
        self.group_size, self.mu = group_size, mu
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.lr_schedule, self.warmup_steps, self.total_steps = lr_schedule, warmup_steps, total_steps
        self.log_samples_every, self.max_consecutive_skips = log_samples_every, max_consecutive_skips
        self.samples_logged = False  # TensorBoard samples are written at this run's first step, then every N
        self.log_completions_every = check_every(log_completions_every)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long))
        self.register_buffer("reward_failures", torch.zeros((), dtype=torch.long))
        self.pending_rank_state: dict = {}  # this rank's own state from a checkpoint (common/rank_state.py)
        self.loop = Loop(self.policy, self.score, self.advantage, self.loss_fn, selector, list(self.methods),
                         group_size=group_size, mu=mu, minibatch_size=minibatch_size, micro_batch_size=micro_batch_size,
                         kl_in_reward=self.kl_control, max_generation_rounds=max_generation_rounds, provided=self.provides,
                         micro_batch_tokens=micro_batch_tokens, all_reduce=all_reduce_sum, all_gather=all_gather_rows)  # over DDP ranks

    def set_rewards(self, rewards: Sequence[RewardFunction], weights: Sequence[float] | None = None) -> None:
        self.reward_fns = list(rewards)
        w = torch.tensor(list(weights or [1.0] * len(self.reward_fns)), dtype=torch.float32)
        self.register_buffer("reward_weights", w, persistent=False)

    # ------------------------------------------------------------------ step 2 (the domain adds `verify`)
    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        """Rewards (B,) as the weighted sum of the reward functions' components (B, K); ``correct`` from ``verify``."""
        comps, failed = score_components(self.reward_fns, rollouts.completions, rollouts.samples, self.reward_failure,
                                         timeout_s=self.reward_timeout_s)
        comps = comps.to(self.device)
        self.reward_failures += failed.sum().to(self.reward_failures.device)
        rewards = comps @ self.reward_weights.to(comps.device) if comps.shape[1] else torch.zeros(rollouts.batch_size, device=self.device)
        rollouts = rollouts.replace(rewards=rewards, reward_components=comps, reward_names=tuple(reward_name(f) for f in self.reward_fns))
        return rollouts.replace(correct=self.verify(rollouts))

    def verify(self, rollouts: RolloutBatch) -> Tensor | None:
        """(B,) bool: which rows the task counts as correct (accuracy); None where the domain has no notion of it."""
        return None

    # ------------------------------------------------------------------ the loop
    def training_step(self, prompts: Any, batch_idx: int) -> None:
        self.pending_rank_state = load_rank_module_state(self, self.pending_rank_state)  # a resumed rank's own state
        self.loss_fn.set_step(self.global_step)
        t0 = time.perf_counter()
        got = self.loop.collect(prompts, more=self.more_prompts())  # 1-5
        t1 = time.perf_counter()
        lr = torch.tensor(self.optimizers().param_groups[0]["lr"])  # of the step's first optimiser step
        metrics = self.loop.update(got.kept, self.stepper())  # 6
        t2 = time.perf_counter()
        metrics.update(lr=lr, selected_frac=torch.tensor(got.kept.batch_size / got.seen.batch_size))
        self.log_step(got.seen, metrics, rollout_s=got.rollout_s, prep_s=t1 - t0 - got.rollout_s, update_s=t2 - t1)  # 7

    def more_prompts(self) -> Callable[[], Any] | None:
        """Where refill rounds get new prompts: the next batch of the data module's training stream
        (:meth:`common.data.ResumableData.next_prompts`, which moves the data position past it); None when the data
        come from a plain dataloader or no refill round can happen."""
        if self.selector is None or self.loop.max_generation_rounds == 1:
            return None
        data = self._trainer.datamodule if self._trainer is not None else None  # a module stepped by hand has none
        return data.next_prompts if isinstance(data, ResumableData) else None

    def stepper(self) -> Stepper:
        opt = self.optimizers()
        return Stepper(opt, [p for g in opt.param_groups for p in g["params"]], max_grad_norm=self.max_grad_norm,
                       max_consecutive_skips=self.max_consecutive_skips, backward=self.manual_backward,
                       clip=lambda: self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"),
                       skipped=self.skipped_steps, consecutive=self.consecutive_skips, scheduler=self.lr_schedulers())

    def configure_optimizers(self):
        groups = [{"params": self.policy.trainable_parameters()}]
        for m in self.methods:
            groups += m.param_groups(self.lr)
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        sched = lr_scheduler(opt, self.lr_schedule, self.warmup_steps, self.total_steps or getattr(self._trainer, "max_steps", None))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    # ------------------------------------------------------------------ advlab predict (common/predict.py)
    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """``n`` completions of every prompt of the batch (greedy or sampled with the policy's sampling settings),
        scored by the reward functions and ``verify`` when the batch asks: one JSON-ready record per completion."""
        rollouts = self.policy.rollout(batch.samples, batch.n, greedy=batch.greedy)
        if batch.score:
            rollouts = self.score(rollouts)
        return prediction_records(batch, rollouts)

    # ------------------------------------------------------------------ data parallelism, checkpointed RNG
    def setup(self, stage: str) -> None:  # FSDP1 refused in one line; each DDP rank samples with seed + rank
        setup_rank(self, stage)

    def configure_model(self) -> None:  # FSDP2 under Lightning's ModelParallelStrategy (common/fsdp.py); else nothing
        shard_module(self)

    def on_fit_start(self) -> None:
        for fn in self.reward_fns:  # a reward that holds a model (common.rewards.model) scores on the trainer's device
            if isinstance(fn, torch.nn.Module):
                fn.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # every rank's RNG states and own state (common/rank_state.py)
        save_rank_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # RNG states now; the rank's own state at its next step
        self.pending_rank_state = load_rank_checkpoint(self, checkpoint)

    # ------------------------------------------------------------------ step 7: logging
    def log_step(self, rollouts: RolloutBatch, metrics: dict[str, Tensor], *, rollout_s: float, prep_s: float, update_s: float) -> None:
        B = rollouts.batch_size
        log = {f"train/{k}": v for k, v in metrics.items()}
        log["train/reward"] = rollouts.rewards.mean()
        for k, name in enumerate(rollouts.reward_names):
            log[f"train/reward/{name}"] = rollouts.reward_components[:, k].mean()
        if rollouts.correct is not None:
            log["train/accuracy"] = rollouts.correct.float().mean()
        adv = rollouts.advantages if rollouts.advantages.dim() == 1 else masked_mean(rollouts.advantages, rollouts.completion_mask, 1)
        log["train/zero_adv_frac"] = (adv == 0).float().mean()
        log["train/response_len"] = rollouts.lengths.float().mean()
        log["train/reward_failures"], log["train/skipped_steps"] = self.reward_failures.float(), self.skipped_steps.float()
        if rollouts.truncated is not None:
            log["train/truncated_frac"] = rollouts.truncated.float().mean()
        log.update({"perf/rollout_s": torch.tensor(rollout_s), "perf/update_s": torch.tensor(prep_s + update_s),
                    "perf/tokens_per_s": rollouts.lengths.sum().float() / max(rollout_s, 1e-9)})
        # under DDP every metric is the mean over ranks (the loss terms are each rank's share of the global sum)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=B, sync_dist=self.trainer.world_size > 1)
        self.log("reward", log["train/reward"], prog_bar=True, on_step=True, logger=False, batch_size=B)
        step = self.global_step
        if (self.log_samples_every and (not self.samples_logged or step % self.log_samples_every == 0)
                and rollouts.completions and isinstance(self.logger, TensorBoardLogger)):
            self.samples_logged = True
            lines = [f"**reward {float(r):.2f}** `{s.get('prompt', '')}` → `{c}`" for r, s, c in
                     zip(rollouts.rewards[: self.group_size].tolist(), rollouts.samples, rollouts.completions)]
            self.logger.experiment.add_text("samples", "\n\n".join(lines), step)
        log_completions(self, rollouts, self.log_completions_every)  # JSONL beside the logger's files
