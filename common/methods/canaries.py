"""Canaries: cheap run-time checks that warn (and log a metric) when training has silently become a no-op.

On by default in every RL module (``PolicyOptimizationModule`` appends ``Canaries()`` to its methods unless the
YAML lists its own ``Canaries`` or sets ``model.init_args.canaries: false``). Listed explicitly, with its own
thresholds, like any method part (it changes nothing in the batch or the loss)::

    methods:
      - class_path: common.methods.canaries.Canaries
        init_args: {equal_reward_steps: 5, sync_check_every: 10}

Checks, each a ``CanaryWarning`` once per streak (when the condition starts to hold, or reaches its count) and a
metric ``train/canary/...``:

- **equal rewards**: every reward of a sampling round equal (max = min over all rows, after the domain's score)
  for ``equal_reward_steps`` rounds in a row: group-relative advantages are all 0, so nothing is learned (a broken
  reward function, a verifier that never matches, a task far too hard or too easy). Metric
  ``canary/equal_reward_steps``: the current streak. A round is a step when ``max_generation_rounds`` = 1.
- **trainable-token fraction out of bounds**, ``canary/trainable_token_frac`` = loss tokens / (B x T) of the rows
  trained on, every step:

  * 0: every completion empty, or every token masked out of the loss (e.g. environment-written): no token carries a
    gradient. Warned at the first such step. (A step whose selector kept no row at all is logged by the loop as
    ``train/empty_steps``.)
  * 1 on sequences (T > 1) although some rows ended before the budget (``truncated`` False): every position of
    every row is trained, so nothing is masked as padding; rows that stopped early are trained on whatever was
    written after their end (a backend or method that builds ``completion_mask`` wrongly). Warned when it holds
    for ``full_mask_steps`` steps in a row (``canary/full_mask_steps``: the streak), since a batch whose rows
    all have exactly the budget's length is legitimate once in a while. Prompt tokens are never in the loss by
    construction (the loss covers the completion's (B, T) positions only), so there is no prompt-masking check;
    policies without ``truncated`` (fixed-horizon actions) are not checked.
- **stale sampler**: the rollout engine did not receive the new weights. At every ``sync_check_every``-th step
  (the first, then every K-th) a probe, ``probe_rows`` rows of the step's batch cut to the last ``probe_tokens``
  prompt tokens and the first ``probe_tokens`` actions (any fixed input will do: memory stays small for long
  prompts and a large vocabulary), is scored twice, before the
  step's update (after scoring) and after it (after ``policy.sync()``), by the trainer (``policy(probe)``) and by
  the engine (``policy.sampler_logprobs(probe)``: vLLM's prompt log-probs, or HF's forward of the weights
  ``generate`` uses). Metrics ``canary/policy_logprob_change`` and ``canary/sampler_logprob_change``: the mean
  |Δ log π| per loss token of the probe on each side at the latest checked step (logged every step, checkpointed). Warned when the trainer's log-probs moved by
  more than ``min_policy_change`` while the engine's moved by less than ``min_sampler_ratio`` times as much (a sync
  that binds nothing, a skipped sync, an engine that reloads a stale copy); an update too small to move the
  trainer's log-probs (lr 0, skipped steps) is never a warning. The ratio is loose because the trainer scores at the
  sampling temperature and the engine at temperature 1, and a bfloat16 engine rounds small updates. Cost: 2
  forwards of a ``probe_rows`` x 2 ``probe_tokens`` input on each side per checked step, none in between; the schedule depends only on the
  checkpointed step counter, so a resumed run checks (and logs) the steps the straight run does. Skipped for a
  policy that samples from its own forward (``sampler_logprobs`` not overridden); switched off with one warning if
  the engine cannot score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.batch import TIME_ALIGNED, RolloutBatch
from common.methods.base import Method
from common.policies.base import Policy

if TYPE_CHECKING:
    from common.loop import Loop


class CanaryWarning(UserWarning):
    """Training has probably become a no-op (see common/methods/canaries.py)."""


class Canaries(Method):
    """Warn when rewards stop varying, no token (or every position) is trainable, or the sampler goes stale.

    Args:
        equal_reward_steps: N, consecutive rounds with every reward equal before warning (>= 1).
        full_mask_steps: consecutive steps with every position trained while some rows ended early (>= 1).
        sync_check_every: K, the stale-sampler check runs at steps 0, K, 2K, ... (0 = off).
        probe_rows: rows of the batch scored by the stale-sampler check (>= 1).
        probe_tokens: prompt tokens (the last) and actions (the first) of each probe row (>= 1).
        min_policy_change: the trainer's mean |Δ log π| per token over a checked update above which the engine must have moved too.
        min_sampler_ratio: the engine's change below this fraction of the trainer's is a stale sampler, in (0, 1).
    """

    def __init__(self, equal_reward_steps: int = 5, full_mask_steps: int = 3, sync_check_every: int = 10,
                 probe_rows: int = 2, probe_tokens: int = 32, min_policy_change: float = 1e-3,
                 min_sampler_ratio: float = 0.1):
        super().__init__()
        problems = []
        for name, v, low in (("equal_reward_steps", equal_reward_steps, 1), ("full_mask_steps", full_mask_steps, 1),
                             ("sync_check_every", sync_check_every, 0), ("probe_rows", probe_rows, 1),
                             ("probe_tokens", probe_tokens, 1)):
            if not isinstance(v, int) or v < low:
                problems.append(f"{name} must be an integer >= {low}, got {v!r}")
        if not min_policy_change > 0:
            problems.append(f"min_policy_change must be > 0, got {min_policy_change}")
        if not 0 < min_sampler_ratio < 1:
            problems.append(f"min_sampler_ratio must be in (0, 1), got {min_sampler_ratio}")
        if problems:
            raise ValueError("Canaries: " + "; ".join(problems))
        self.equal_reward_steps, self.full_mask_steps = equal_reward_steps, full_mask_steps
        self.sync_check_every, self.probe_rows, self.probe_tokens = sync_check_every, probe_rows, probe_tokens
        self.min_policy_change, self.min_sampler_ratio = min_policy_change, min_sampler_ratio
        # checkpointed: a resume keeps counting
        self.register_buffer("equal_streak", torch.zeros((), dtype=torch.long))
        self.register_buffer("empty_streak", torch.zeros((), dtype=torch.long))
        self.register_buffer("full_streak", torch.zeros((), dtype=torch.long))
        self.register_buffer("stale_streak", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # updates seen (the check's clock)
        self.register_buffer("changes", torch.zeros(2))  # the latest check's (trainer, engine) mean |Δ log π|
        self._probe: tuple[RolloutBatch, Tensor, Tensor] | None = None  # this step's rows, trainer lp, engine lp
        self._sync_broken = False  # the engine could not score: the check is off for the run

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a checkpoint from before a counter existed (or before canaries were on by default) loads with fresh counters
        for name, buf in self._buffers.items():
            state_dict.setdefault(prefix + name, torch.zeros_like(buf))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    def _streak(counter: Tensor, holds: bool) -> int:
        counter.copy_(counter + 1 if holds else torch.zeros_like(counter))
        return int(counter)

    # ------------------------------------------------------------------ rewards (step 2 -> 3)
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        r = batch.rewards  # (B,)
        equal = bool(r.numel() == 0 or r.max() == r.min())  # ok: one host sync per round, host-side check
        if self._streak(self.equal_streak, equal) == self.equal_reward_steps:
            value = float(r[0]) if r.numel() else float("nan")
            warnings.warn(f"Canaries: every reward was equal ({value:g}) for {self.equal_reward_steps} sampling rounds in "
                          "a row: group-relative advantages are all 0 and nothing is learned; check the reward "
                          "functions and the task's difficulty", CanaryWarning, stacklevel=2)
        if self._probe is None and self._checks_sync(loop) and int(self.steps) % self.sync_check_every == 0:
            self._open_probe(loop, batch)
        return batch

    # ------------------------------------------------------------------ after the optimiser steps
    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        self.steps += 1
        mask = batch.loss_mask  # (B, T)
        frac = mask.float().mean() if mask.numel() else mask.new_zeros((), dtype=torch.float32)  # ()
        trained = int(mask.sum())  # ok: one host sync per step
        if self._streak(self.empty_streak, trained == 0) == 1:
            warnings.warn(f"Canaries: no trainable token in the {batch.batch_size} rows trained on (every completion "
                          "empty or masked out of the loss): the optimiser step changes nothing", CanaryWarning, stacklevel=2)
        ended_early = batch.truncated is not None and not bool(batch.truncated.all())
        full = mask.dim() == 2 and mask.shape[1] > 1 and trained == mask.numel() and ended_early
        if self._streak(self.full_streak, full) == self.full_mask_steps:
            warnings.warn(f"Canaries: every one of the {mask.shape[1]} completion positions of every row was trained for "
                          f"{self.full_mask_steps} steps in a row although some rows ended before the token budget: "
                          "nothing is masked as padding (check how the backend or a method builds completion_mask)",
                          CanaryWarning, stacklevel=2)
        metrics = {"canary/equal_reward_steps": self.equal_streak.float(), "canary/trainable_token_frac": frac.detach(),
                   "canary/full_mask_steps": self.full_streak.float()}
        if self._probe is not None:
            self._close_probe(loop)
        if self._checks_sync(loop):
            change = self.changes.clone()  # (2,)
            metrics.update({"canary/policy_logprob_change": change[0], "canary/sampler_logprob_change": change[1]})
        return metrics

    # ------------------------------------------------------------------ stale sampler
    def _checks_sync(self, loop: "Loop") -> bool:
        """Only a policy whose engine scores on its own (``sampler_logprobs`` overridden) can go stale."""
        return self.sync_check_every > 0 and not self._sync_broken and type(loop.policy).sampler_logprobs is not Policy.sampler_logprobs

    @torch.no_grad()
    def _score(self, loop: "Loop", probe: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(trainer, engine) log-probs of the probe's actions, each (R, T) float32, 0 off the loss mask."""
        mask = probe.loss_mask
        trainer = loop.policy(probe).logprobs.float().masked_fill(~mask, 0.0)
        engine = loop.policy.sampler_logprobs(probe).float().to(trainer.device).masked_fill(~mask, 0.0)
        return trainer, engine

    def _open_probe(self, loop: "Loop", batch: RolloutBatch) -> None:
        rows = batch.loss_mask.any(1).nonzero().squeeze(1)[: self.probe_rows]  # (R,) rows with a trainable token
        if rows.numel() == 0:
            return
        probe, K = batch.select(rows), self.probe_tokens
        fields = {f: getattr(probe, f) for f in TIME_ALIGNED}
        cut = {f: t[:, :K] for f, t in fields.items() if torch.is_tensor(t) and t.dim() > 1}  # the first K actions
        if probe.prompt_ids is not None and not probe.inputs:  # left-padded: the prompt's last K tokens (a prompt
            # with a modality payload, e.g. image placeholders that must match the image's features, is kept whole)
            cut.update(prompt_ids=probe.prompt_ids[:, -K:], prompt_mask=probe.prompt_mask[:, -K:])
        probe = probe.replace(**cut)  # (R, <= K) prompt, (R, <= K) actions
        try:
            trainer, engine = self._score(loop, probe)
        except Exception as e:  # a canary never stops training: say so once and switch the check off
            self._disable(e)
            return
        self._probe = (probe, trainer, engine)

    def _close_probe(self, loop: "Loop") -> None:
        probe, trainer0, engine0 = self._probe
        self._probe = None
        try:
            trainer1, engine1 = self._score(loop, probe)
        except Exception as e:
            self._disable(e)
            return
        n = probe.loss_mask.sum().clamp(min=1)  # ()
        d_trainer = (trainer1 - trainer0).abs().sum() / n  # () mean |Δ log π| over the probe's tokens
        d_engine = (engine1 - engine0).abs().sum() / n  # ()
        stale = bool((d_trainer > self.min_policy_change) & (d_engine < self.min_sampler_ratio * d_trainer))  # ok: per checked step
        if self._streak(self.stale_streak, stale) == 1:
            warnings.warn(f"Canaries: over an update the trainer's log-probs of a probe moved by {float(d_trainer):.3g} "
                          f"(mean |Δ log π| per token) but the rollout engine's by only {float(d_engine):.3g}: the engine "
                          "did not receive the new weights, so rollouts come from a stale policy (check the backend's "
                          "sync_weights)", CanaryWarning, stacklevel=2)
        self.changes.copy_(torch.stack([d_trainer, d_engine]))

    def _disable(self, error: Exception) -> None:
        self._sync_broken, self._probe = True, None
        warnings.warn(f"Canaries: the stale-sampler check is off for this run: the rollout engine could not score a probe "
                      f"({error!r})", CanaryWarning, stacklevel=3)


def with_canaries(methods: Sequence[Method], on: bool = True) -> list[Method]:
    """``methods`` plus a default ``Canaries()`` at the end, unless ``on`` is False or one is listed already (the RL
    module's default: ``model.init_args.canaries``)."""
    methods = list(methods)
    return methods + [Canaries()] if on and not any(isinstance(m, Canaries) for m in methods) else methods
