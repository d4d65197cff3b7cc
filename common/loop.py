"""The one RL step: ``collect`` (steps 1-5) and ``update`` (step 6), as plain code over a Policy and method parts.

Used by the Lightning module (common/module.py), by the reproductions' toy policies and by anything else that
trains a policy: a ``Loop`` holds no model of its own kind, only the parts it was given.

    1. rollout        policy.rollout(prompts, G)              (or a method's rollout)   -> RolloutBatch
    2. score          score(batch)                            rewards (B,), components (B, K); methods' after_score
    3. reference      policy(batch, reference=True)           if the loss or KL-in-reward needs it
    4. advantages     advantage(batch)                        (B,) or (B, T), or (advantages, keep rows)
    5. selection      selector(batch)                         filters, down-sampling, buffers; refill rounds from new
                                                              prompts (DAPO)
    6. update         mu epochs x minibatches x micro-batches: policy forward -> loss (+ methods' terms)
                      -> backward; one optimiser step per minibatch, skipped when non-finite

Micro-batches are normalised by the whole minibatch (``Normaliser``), so the split never changes the gradient.

Data parallelism (DDP: one Loop per rank, each on its own prompts): with ``all_reduce`` (the sum over ranks) the
minibatch normaliser counts the tokens and sequences of every rank (``Normaliser.of``), so DDP's mean of the ranks'
gradients is exactly the gradient of one process on the global minibatch, and the estimator's batch-level
statistics that it reduces with ``all_reduce`` (GRPO's ``scale="batch"``) are the global batch's. With
``all_gather`` (every rank's rows in rank order, ``common.distributed.all_gather_rows``) the parts that declare an
``all_gather`` field compute their batch statistics on the concatenation of every rank's values, exactly as one
process on the global batch: REINFORCE++ whitening, SPO's normalisation, Segment-PO whitening (the estimator),
the entropy quantiles of the 80/20 filter and HAPO, Clip-Cov / KL-Cov's covariance and token selection (the
loss; over the global micro-batch, each rank's k-th micro-batch together), HAPO's sampling statistics (a method).
``minibatch_size`` and ``micro_batch_size`` count rows per rank (a global minibatch is ``W x minibatch_size``
rows), and every rank must train on the same number of rows (one collective per step checks it). Per rank, not
reduced: group statistics (a group's G samples lie on one rank) and buffers' rows (each rank's own, checkpointed per
rank by ``common/rank_state.py``). Curricula and trackers that draw the batches (DUMP, SPO's tracker) gather every
rank's rows themselves, so their state is global.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.batch import RolloutBatch, check_requirements
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss
from common.losses.kl import kl_estimate
from common.losses.kl_control import KLController, as_controller
from common.methods.base import Method
from common.policies.base import Policy
from common.sampling.base import Selector


class Stepper:
    """Backward, clip and step, skipping a step whose loss or gradient is non-finite (weights are never updated
    with NaN/inf); ``max_consecutive_skips`` skips in a row raise. The Lightning module passes its
    ``manual_backward`` and ``clip_gradients``; plain code uses the defaults.

    Args:
        optimizer: the optimiser.
        params: the parameters whose gradient norm is checked and clipped.
        max_grad_norm: clip the global gradient norm to this (0 = off).
        max_consecutive_skips: raise after this many skipped steps in a row.
        backward: ``loss -> None`` (default ``loss.backward()``).
        clip: ``() -> None`` clipping the gradients (default ``clip_grad_norm_`` of ``params``).
        skipped, consecutive: () long tensors counting skips (a module's buffers, so they are checkpointed).
        scheduler: a learning-rate scheduler stepped after every optimiser step taken (common/schedules.py).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], *, max_grad_norm: float = 1.0,
                 max_consecutive_skips: int = 3, backward: Callable[[Tensor], None] | None = None,
                 clip: Callable[[], None] | None = None, skipped: Tensor | None = None, consecutive: Tensor | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.optimizer, self.params = optimizer, list(params)
        self.max_grad_norm, self.max_consecutive_skips = max_grad_norm, max_consecutive_skips
        self.backward = backward if backward is not None else (lambda loss: loss.backward())
        self.clip = clip if clip is not None else (lambda: torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.skipped = skipped if skipped is not None else torch.zeros((), dtype=torch.long)
        self.consecutive = consecutive if consecutive is not None else torch.zeros((), dtype=torch.long)
        self.scheduler = scheduler

    def step(self, loss: Tensor) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a replicated DTensor
        if bool(torch.isfinite(grad_norm) & torch.isfinite(loss)):  # ok: one sync per optimiser step
            if self.max_grad_norm > 0:
                self.clip()
            self.optimizer.step()
            self.consecutive.zero_()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped += 1
            self.consecutive += 1
            if int(self.consecutive) >= self.max_consecutive_skips:
                raise FloatingPointError(
                    f"{int(self.consecutive)} optimiser steps in a row had a non-finite loss ({float(loss)}) or "
                    f"gradient norm ({float(grad_norm)}); stopping. Lower lr, check rewards and the reference, or raise "
                    "max_consecutive_skips."
                )
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def empty_step(self) -> None:
        """Nothing was selected: a step with no gradients changes no parameter but counts as a step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


@dataclass
class Collected:
    kept: RolloutBatch  # rows to train on
    seen: RolloutBatch  # every row sampled this step (for logging)
    rollout_s: float  # seconds spent sampling


def pad_time(x: Tensor, width: int) -> Tensor:
    """Right-pad dim 1 of a per-token output (B, t, ...) with zeros to ``width`` (a trimmed micro-batch's)."""
    if x.dim() < 2 or x.shape[1] >= width:
        return x
    return torch.nn.functional.pad(x.movedim(1, -1), (0, width - x.shape[1])).movedim(-1, 1)


class Loop:
    """Steps 1-6 over a policy and its parts (module docstring).

    Args:
        policy: the Policy being trained.
        score: ``batch -> batch`` with ``rewards`` (B,) (and components) set: the domain's reward functions.
        advantage: the estimator ``batch -> (B,) | (B, T) | (advantages, keep)``.
        loss: the policy loss.
        selector: optional step-5 selector.
        methods: method parts, applied in order at every hook.
        group_size: G, samples per prompt.
        mu: epochs over each rollout batch.
        minibatch_size: rows per optimiser step (None = the whole batch).
        micro_batch_size: rows per forward/backward (None = the whole minibatch).
        micro_batch_tokens: a token budget per forward/backward instead of a row count: the minibatch's rows
            sorted by completion length, packed into micro-batches whose padded size, rows x (prompt width +
            longest completion among them), fits the budget, each cut to its longest completion
            (``RolloutBatch.split_tokens``; verl's dynamic batch size). With mixed lengths, far fewer padded
            columns go through the model; the result is the padded path's (gradient accumulation under the
            minibatch's normaliser; per-token outputs are put back in rollout order). Overrides
            ``micro_batch_size``.
        kl_in_reward: coefficient of the per-sequence KL (k1) subtracted from the reward, or a controller of it
            (``common.losses.kl_control``: fixed, or adaptive to a target KL); logged as ``kl_coef``.
        max_generation_rounds: rounds of sampling, each from new prompts, while the selector wants more rows
            (DAPO's dynamic sampling; see :meth:`collect`).
        provided: RolloutBatch fields the domain fills (with the policy's and the methods' ``provides``, checked
            against every part's ``requires``).
        all_reduce: ``tensor -> tensor`` summed over data-parallel ranks (a collective; e.g.
            ``common.distributed.all_reduce_sum``); None = one process. Given to the estimator as its
            ``all_reduce``.
        all_gather: ``tensor (n_r, ...) -> (every rank's rows concatenated in rank order, this rank's start)`` (a
            collective; e.g. ``common.distributed.all_gather_rows``); None = one process. Given as ``all_gather``
            to the estimator, the loss and the methods that declare that field.
    """

    def __init__(self, policy: Policy, score: Callable[[RolloutBatch], RolloutBatch], advantage: AdvantageEstimator,
                 loss: PolicyLoss, selector: Selector | None = None, methods: Sequence[Method] = (), *, group_size: int = 8,
                 mu: int = 1, minibatch_size: int | None = None, micro_batch_size: int | None = None,
                 kl_in_reward: float | KLController = 0.0, max_generation_rounds: int = 1, provided: Sequence[str] = (),
                 all_reduce: Callable[[Tensor], Tensor] | None = None,
                 all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None,
                 micro_batch_tokens: int | None = None):
        problems = []
        if group_size < 1:
            problems.append(f"group_size must be >= 1, got {group_size}")
        if mu < 1:
            problems.append(f"mu must be >= 1, got {mu}")
        for name, v in (("minibatch_size", minibatch_size), ("micro_batch_size", micro_batch_size),
                        ("micro_batch_tokens", micro_batch_tokens)):
            if v is not None and v < 1:
                problems.append(f"{name} must be a positive integer or None, got {v}")
        if max_generation_rounds < 1:
            problems.append(f"max_generation_rounds must be >= 1, got {max_generation_rounds}")
        min_g = getattr(advantage, "min_group_size", 1)  # a method that replaces the rollout makes its own groups
        if 1 <= group_size < min_g and all(type(m).rollout is Method.rollout for m in methods):
            problems.append(f"group_size must be >= {min_g} for {type(advantage).__name__}, got {group_size}: it centres "
                            "each reward on its group, so every advantage would be 0 (use a group-free estimator "
                            "such as common.advantages.tracker.SPOTracker for G = 1)")
        if sum(type(m).rollout is not Method.rollout for m in methods) > 1:
            problems.append("at most one method may replace the rollout, got "
                            f"{[type(m).__name__ for m in methods if type(m).rollout is not Method.rollout]}")
        if problems:
            raise ValueError("Loop: " + "; ".join(problems))
        self.policy, self.score, self.advantage, self.loss, self.selector = policy, score, advantage, loss, selector
        self.methods = list(methods)
        self.group_size, self.mu = group_size, mu
        self.minibatch_size, self.micro_batch_size = minibatch_size, micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.kl_control, self.max_generation_rounds = as_controller(kl_in_reward), max_generation_rounds
        self.all_reduce = all_reduce
        if all_reduce is not None:
            advantage.all_reduce = all_reduce
        for part in (advantage, loss, *self.methods):  # those whose batch statistics span the ranks declare it
            if all_gather is not None and hasattr(part, "all_gather"):
                part.all_gather = all_gather
        self.needs_reference = loss.needs_reference or self.kl_control.active
        if self.needs_reference:
            policy.enable_reference()
        self.needs_hidden = any(m.needs_hidden for m in self.methods)
        self.needs_old = any(m.needs_old_logprobs for m in self.methods)
        provides = [*policy.provides, *provided, *(f for m in self.methods for f in m.provides)]
        check_requirements([advantage, loss, selector, *self.methods], provides)
        for m in self.methods:
            m.setup(self)

    # ------------------------------------------------------------------ steps 1-5
    def rollout(self, prompts: Any) -> RolloutBatch:
        """Step 1 for training: a method's rollout if one replaces it, else G samples per prompt; then every
        method's ``after_rollout``."""
        batch = None
        for m in self.methods:
            batch = batch or m.rollout(self, prompts, self.group_size)
        batch = batch if batch is not None else self.policy.rollout(prompts, self.group_size)
        for m in self.methods:
            batch = m.after_rollout(self, batch)
        return batch

    def collect(self, prompts: Any, more: Callable[[], Any] | None = None) -> Collected:
        """Steps 1-5, refilled: while the selector wants more rows, another round samples *new* prompts, ``more()``
        (the next batch of the training data), up to ``max_generation_rounds`` rounds in all, as DAPO's dynamic
        sampling keeps drawing prompt batches until its batch is full (arXiv 2503.14476, §3.2 and Algorithm 1;
        verl's ``gen_batch`` loop). Rows that arrive with rewards (offline records, tree edges) are not scored again;
        rows that arrive with advantages are not estimated again.

        Args:
            prompts: the step's prompts.
            more: ``() -> prompts``, the next prompt batch, consumed from the training data (the Lightning module
                passes its data module's ``next_prompts``); required when a selector may ask for refill rounds.
        """
        if more is None and self.selector is not None and self.max_generation_rounds > 1:
            raise ValueError(f"Loop.collect: max_generation_rounds={self.max_generation_rounds} refills a step from new "
                             "prompts, so `more` (a function returning the next prompt batch) must be given; in Lightning "
                             "train with a data module derived from common.data.ResumableData")
        kept, seen, rollout_s = None, [], 0.0
        for round_ in range(self.max_generation_rounds):
            start = time.perf_counter()
            if round_ > 0:
                prompts = more()  # new prompts: never the step's own again
            batch = self.rollout(prompts)  # 1
            rollout_s += time.perf_counter() - start
            if batch.rewards is None:
                batch = self.score(batch)  # 2
            for m in self.methods:
                batch = m.after_score(self, batch)
            batch = self.reference_logprobs(batch)  # 3
            keep = None
            if batch.advantages is None:  # 4
                out = self.advantage(batch)
                advantages, keep = out if isinstance(out, tuple) else (out, None)
                batch = batch.replace(advantages=advantages)
            seen.append(batch)
            if keep is not None:  # e.g. MC-GRPO's pivot rows
                batch = batch.select(keep)
            if self.selector is not None:  # 5
                batch = self.selector(batch)
            kept = batch if kept is None else RolloutBatch.cat([kept, batch])
            if self.selector is None or not self.selector.wants_more(kept):
                break
        if self.selector is not None:
            kept = self.selector.finalize(kept)
        return Collected(kept, RolloutBatch.cat(seen), rollout_s)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, *, reference: bool = False, epoch: int = 0) -> Tensor:
        """log π (or π_ref) of the batch's actions, micro-batch by micro-batch, without gradient. -> (B, T)."""
        T = batch.completion_mask.shape[1]
        micros, inverse = self.micro_batches(batch)
        out = torch.cat([pad_time(self.policy(micro, epoch=epoch, reference=reference).logprobs, T) for micro in micros])
        return out if inverse is None else out[inverse]

    def micro_batches(self, batch: RolloutBatch) -> tuple[list[RolloutBatch], Tensor | None]:
        """Rows per forward/backward: ``micro_batch_size`` rows in order (inverse None), or with
        ``micro_batch_tokens`` the rows sorted by length and packed to the budget; ``inverse`` (B,) puts the
        micro-batches' concatenated rows back in the batch's order."""
        if self.micro_batch_tokens is None:
            return batch.split(self.micro_batch_size or batch.batch_size), None
        order = batch.completion_widths().argsort(stable=True)  # (B,) shortest first
        return batch.select(order).split_tokens(self.micro_batch_tokens), order.argsort()

    def reference_logprobs(self, batch: RolloutBatch) -> RolloutBatch:
        """Step 3: reference log-probs (if a KL term needs them) and KL-in-reward shaping."""
        if not self.needs_reference:
            return batch
        batch = batch.replace(ref_logprobs=self.logprobs(batch, reference=True))
        if self.kl_control.active:
            kl = (kl_estimate(self.logprobs(batch), batch.ref_logprobs, "k1") * batch.completion_mask).sum(1)  # (B,)
            batch = batch.replace(rewards=batch.rewards - self.kl_control.coef.to(kl.device) * kl)
            self.kl_control.observe(kl, self.all_reduce)  # an adaptive β moves toward its target KL
        return batch

    def old_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log π_old before the update: (B, T), or (B, T, mu) for a policy whose log-probs depend on the epoch."""
        if not self.policy.epoch_dependent:
            return self.logprobs(batch)
        return torch.stack([self.logprobs(batch, epoch=e) for e in range(self.mu)], dim=-1)

    # ------------------------------------------------------------------ step 6
    def update(self, batch: RolloutBatch, stepper: Stepper) -> dict[str, Tensor]:
        """``mu`` epochs over minibatches; gradient accumulation over micro-batches with the loss normalised by the
        whole minibatch. Old log-probs are computed only when the policy moves before a row is used (or a method
        asks for them); with one optimiser step per rollout they equal the current log-probs detached."""
        if self.all_reduce is not None:
            self.check_rows_agree(batch)
        if batch.batch_size == 0:
            stepper.empty_step()
            return {"empty_steps": torch.ones(())}
        B = batch.batch_size
        mb_size = self.minibatch_size or B
        if not (self.mu == 1 and mb_size >= B) or self.needs_old or self.policy.epoch_dependent:
            batch = batch.replace(old_logprobs=self.old_logprobs(batch))
        totals: dict[str, Tensor] = {}
        steps, entropies = 0, []
        for epoch in range(self.mu):
            for mb in batch.split(mb_size):
                norm = Normaliser.of(mb.loss_mask, self.policy.horizon, self.all_reduce)  # global counts / W
                mb_loss, mb_entropies = 0.0, []
                micros, inverse = self.micro_batches(mb)
                for micro in micros:
                    out, entropy = self.micro_loss(micro, norm, epoch)
                    stepper.backward(out.loss)
                    mb_loss = mb_loss + out.loss.detach()
                    for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                        totals[k] = totals.get(k, 0.0) + v  # each is pre-divided by the minibatch normaliser
                    if epoch == 0:
                        mb_entropies.append(pad_time(entropy, mb.completion_mask.shape[1]))
                if epoch == 0:
                    mb_entropy = torch.cat(mb_entropies)
                    entropies.append(mb_entropy if inverse is None else mb_entropy[inverse])
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + stepper.step(mb_loss)
                steps += 1
        self.policy.sync()
        metrics = {k: v / steps for k, v in totals.items()} | self.kl_control.metrics()
        batch = batch.replace(entropy=torch.cat(entropies))  # (B, T) under π_old, rows in rollout order
        for m in self.methods:
            metrics.update(m.after_update(self, batch))
        return metrics

    def check_rows_agree(self, batch: RolloutBatch) -> None:
        """Under data parallelism every rank must update on the same number of rows: the minibatches' collectives
        (the normaliser's counts, DDP's gradient reduction) pair up only if every rank runs as many."""
        B = float(batch.batch_size)
        ranks, total, squares = self.all_reduce(torch.tensor([1.0, B, B * B], dtype=torch.float64,
                                                             device=batch.completion_mask.device)).tolist()
        if ranks * squares != total * total:  # Σ B_r² · W = (Σ B_r)² only if every B_r is equal
            raise ValueError(f"Loop.update: the {int(ranks)} data-parallel ranks have different numbers of rows "
                             f"(this rank {int(B)}, {total / ranks:g} on average); a selector that keeps a varying "
                             "number of rows (filters, dynamic sampling, buffers) is not supported under DDP yet")

    def micro_loss(self, micro: RolloutBatch, norm: Normaliser, epoch: int) -> tuple[LossOutput, Tensor]:
        """One micro-batch: the policy forward, the loss (with the methods' inputs) and the methods' extra terms.
        Returns the loss and the detached token entropies (B, T)."""
        out = self.policy(micro, epoch=epoch, hidden=self.needs_hidden)
        old = micro.old_logprobs
        if old is not None and old.dim() == 3:
            old = old[..., epoch]
        inputs: dict[str, Any] = dict(logprobs=out.logprobs, old_logprobs=old if old is not None else out.logprobs.detach(),
                                      advantages=micro.advantages, mask=micro.loss_mask, ref_logprobs=micro.ref_logprobs,
                                      entropy=out.entropy, normaliser=norm, batch=micro)
        for m in self.methods:
            inputs.update(m.loss_inputs(self, micro, out, inputs))
        result = self.loss(**inputs)
        loss, metrics = result.loss, dict(result.metrics)
        for m in self.methods:
            extra = m.extra_loss(self, micro, out, norm)
            if extra is not None:
                loss, metrics = loss + extra.loss, {**metrics, **extra.metrics}
        return LossOutput(loss, metrics), inputs["entropy"].detach()
