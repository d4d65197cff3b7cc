"""PolicyOptimizationModule: the one RL update loop every domain shares (DESIGN.md, "The update loop").

One ``training_step`` on a batch of prompts:

    1. rollout(prompts)            -> RolloutBatch, G samples per prompt          (domain)
    2. score(rollouts)             -> rewards (B,), components (B, K)            (domain)
    3. reference / old log-probs   (reference = adapter disabled under LoRA)
    4. advantage(rollouts)         -> (B,) or (B, T)                              (YAML: common.advantages.*)
    5. select(rollouts)            -> filters, down-sampling, buffers            (YAML: common.sampling.*)
    6. mu epochs over minibatches  -> loss (YAML: common.losses.*), backward, clip, step
    7. log                         -> train/*, perf/*, sample completions

Domains override ``rollout``, ``score`` and (for non-causal-LM policies) ``sequence_logprobs``. The Trainer
owns devices, precision, logging and checkpointing; this module owns the algorithm.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.kl import kl_estimate
from common.losses.logprobs import token_logprobs
from common.losses.base import LossOutput, PolicyLoss
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import LoRA, PolicySource, TinyLlama
from common.ops import masked_mean
from common.rewards.base import RewardFunction, reward_name, score_components
from common.sampling.base import Selector
from common.rollout.base import RolloutBackend, Sampling
from common.rollout.hf import HFBackend

class PolicyOptimizationModule(L.LightningModule):
    """The shared GRPO-family update loop (manual optimisation).

    Args:
        policy: where the policy comes from (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``).
        rewards: reward functions ``fn(completions, samples) -> (B,)``; their weighted sum is the reward.
        reward_weights: one weight per reward function (default all 1).
        reward_failure: "raise" (default: name the failing prompt and completion) or "zero" (score 0, count it).
        advantage: the advantage estimator (default GRPO with group std).
        loss: the policy loss (default ``ClippedPolicyLoss()``: GRPO's clip 0.2, no KL).
        selector: optional filter / down-sampler / buffer applied after advantages (step 5).
        rollout_backend: generation backend (default HF ``generate``).
        sampling: sampling options for training rollouts.
        group_size: G, completions per prompt.
        mu: epochs over each rollout batch (GRPO's μ; 1 = one pass).
        minibatch_size: rows per optimiser step (default: the whole rollout batch, one step per rollout).
        micro_batch_size: rows per forward/backward (gradient accumulation; does not change the result).
        kl_in_reward: coefficient of the per-sequence KL (k1) subtracted from the reward (0 = off; the
            in-loss KL is the loss's ``beta``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping by global norm (0 = off).
        lora: LoRA adapters (None = full fine-tuning).
        logprob_chunk_size: rows per chunk of the chunked log-softmax.
        log_samples_every: steps between sample completions written to TensorBoard (0 = never).
        max_consecutive_skips: a non-finite loss or gradient skips the optimiser step (logged as
            ``train/skipped_steps``); this many skips in a row raise.
        reward_timeout_s: a reward function call that takes longer fails (then ``reward_failure`` decides);
            None = no limit.
        max_generation_rounds: how often a step may sample its prompts while the selector wants more rows
            (DAPO's dynamic sampling; 1 = sample once).
        share_prompt: run each group's prompt once in the update and expand its key/value cache to the group's
            rows (exact; about G times fewer prompt tokens). False = one plain forward per row.
    """

    def __init__(
        self,
        policy: PolicySource | None = None,
        rewards: Sequence[RewardFunction] = (),
        reward_weights: Sequence[float] | None = None,
        reward_failure: Literal["raise", "zero"] = "raise",
        advantage: AdvantageEstimator | None = None,
        loss: PolicyLoss | None = None,
        selector: Selector | None = None,
        rollout_backend: RolloutBackend | None = None,
        sampling: Sampling | None = None,
        group_size: int = 8,
        mu: int = 1,
        minibatch_size: int | None = None,
        micro_batch_size: int | None = None,
        kl_in_reward: float = 0.0,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        lora: LoRA | None = None,
        logprob_chunk_size: int = 1024,
        log_samples_every: int = 10,
        share_prompt: bool = True,
        max_consecutive_skips: int = 3,
        reward_timeout_s: float | None = 60.0,
        max_generation_rounds: int = 1,
    ):
        super().__init__()
        problems = []
        if group_size < 1:
            problems.append(f"group_size must be >= 1, got {group_size}")
        if mu < 1:
            problems.append(f"mu must be >= 1, got {mu}")
        for name, v in (("minibatch_size", minibatch_size), ("micro_batch_size", micro_batch_size)):
            if v is not None and v < 1:
                problems.append(f"{name} must be a positive integer or None, got {v}")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            problems.append(f"reward_weights has {len(reward_weights)} entries for {len(rewards)} reward functions")
        if max_generation_rounds < 1:
            problems.append(f"max_generation_rounds must be >= 1, got {max_generation_rounds}")
        if reward_failure not in ("raise", "zero"):
            problems.append(f"reward_failure must be 'raise' or 'zero', got {reward_failure!r}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.automatic_optimization = False
        self.source = policy if policy is not None else TinyLlama()
        self.reward_fns = list(rewards)
        self.register_buffer("reward_weights", torch.tensor(list(reward_weights or [1.0] * len(self.reward_fns)), dtype=torch.float32), persistent=False)
        self.reward_failure = reward_failure
        self.advantage = advantage if advantage is not None else GRPO()
        self.loss_fn = loss if loss is not None else ClippedPolicyLoss()
        self.selector = selector
        self.backend = rollout_backend if rollout_backend is not None else HFBackend()
        self.sampling = sampling if sampling is not None else Sampling()
        self.group_size, self.mu = group_size, mu
        self.minibatch_size, self.micro_batch_size = minibatch_size, micro_batch_size
        self.kl_in_reward, self.lr, self.weight_decay, self.max_grad_norm = kl_in_reward, lr, weight_decay, max_grad_norm
        self.lora, self.logprob_chunk_size, self.log_samples_every = lora, logprob_chunk_size, log_samples_every
        self.share_prompt = share_prompt
        self.max_consecutive_skips, self.reward_timeout_s = max_consecutive_skips, reward_timeout_s
        self.max_generation_rounds = max_generation_rounds
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long))
        self.policy, self.tokenizer = self.source.load()
        # Dropout stays off (eval mode) throughout: the ratio π/π_old must be exactly 1 on the first pass, and
        # sampling, old and reference log-probs must see the same function. (Lightning warns about eval-mode
        # modules at fit start; that is intended.)
        self.policy.eval()
        if lora is not None:
            self.policy = lora.apply(self.policy)
        self.reference = None
        if (self.loss_fn.needs_reference or kl_in_reward > 0) and lora is None:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.register_buffer("reward_failures", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ domain hooks
    def rollout(self, prompts: Any, *, greedy: bool = False, num_samples: int | None = None) -> RolloutBatch:
        """Step 1: sample completions for a batch of prompts (domain-specific)."""
        raise NotImplementedError

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        """Step 2: rewards (B,) as the weighted sum of the reward functions' components (B, K)."""
        comps, failed = score_components(self.reward_fns, rollouts.completions, rollouts.samples, self.reward_failure,
                                         timeout_s=self.reward_timeout_s)
        comps = comps.to(self.device)
        self.reward_failures += failed.sum().to(self.reward_failures.device)
        rewards = comps @ self.reward_weights.to(comps.device) if comps.shape[1] else torch.zeros(rollouts.batch_size, device=self.device)
        return rollouts.replace(rewards=rewards, reward_components=comps, reward_names=tuple(reward_name(f) for f in self.reward_fns))

    def sequence_logprobs(self, batch: RolloutBatch, model: torch.nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of the completion tokens under ``model`` (default the policy), at the sampling
        temperature, with logits only at completion positions. Shapes: -> (B, T), (B, T) float32; 0 off the mask."""
        model = model if model is not None else self.policy
        h = self.completion_hidden(model, batch)  # (B, T, H): hidden states that predict the completion tokens
        m = batch.completion_mask  # (B, T)
        head = model.get_output_embeddings()
        lp, ent = token_logprobs(h[m], head.weight, batch.completion_ids[m], bias=head.bias,
                                 temperature=self.sampling.temperature, chunk_size=self.logprob_chunk_size)  # (N,), (N,)
        logprobs = torch.zeros(m.shape, device=lp.device, dtype=lp.dtype).masked_scatter(m, lp)
        entropy = torch.zeros(m.shape, device=ent.device, dtype=ent.dtype).masked_scatter(m, ent)
        return logprobs, entropy

    def completion_hidden(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        """Last-layer hidden states at the positions that predict the completion tokens. Shapes: -> (B, T, H).

        The G rows of a group share one prompt, so the prompt is run once per group and its key/value cache
        is expanded to the group's rows (gradients flow through the expansion, so this is exact, not an
        approximation); only the completion tokens are run per row. A batch whose group rows differ in their
        prompts takes the plain path: one forward over prompt + completion for every row.
        """
        decoder = model.get_decoder()
        P = batch.prompt_ids.shape[1]
        attn = batch.attention_mask.long()  # (B, P + T)
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # as generate() builds them for left padding
        groups, inverse = torch.unique(batch.group_ids, return_inverse=True)  # (U,), (B,)
        first = torch.full_like(groups, batch.batch_size).scatter_reduce_(
            0, inverse, torch.arange(batch.batch_size, device=inverse.device), reduce="amin")  # (U,) a row per group
        shared = self.share_prompt and len(groups) < batch.batch_size and bool(
            (batch.prompt_ids == batch.prompt_ids[first][inverse]).all())
        if not shared:
            hidden = decoder(input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
            return hidden[:, P - 1 : -1]
        from transformers import DynamicCache

        cache = DynamicCache()
        prompt = decoder(input_ids=batch.prompt_ids[first], attention_mask=attn[first, :P],
                         position_ids=position_ids[first, :P], past_key_values=cache, use_cache=True)  # (U, P, H)
        cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...) rows of the shared prompt cache
        completion = decoder(input_ids=batch.completion_ids, attention_mask=attn, position_ids=position_ids[:, P:],
                             past_key_values=cache, use_cache=True).last_hidden_state  # (B, T, H)
        last_prompt = prompt.last_hidden_state[inverse, -1:]  # (B, 1, H) predicts the first completion token
        return torch.cat([last_prompt, completion[:, :-1]], dim=1)

    # ------------------------------------------------------------------ the loop
    def training_step(self, prompts: Any, batch_idx: int) -> None:
        self.loss_fn.set_step(self.global_step)
        t0 = time.perf_counter()
        rollouts, seen, rollout_s = self.collect(prompts)  # 1-5
        t1 = time.perf_counter()
        metrics = self.update(rollouts) if rollouts.batch_size else self.empty_update()  # 6
        t2 = time.perf_counter()
        metrics["selected_frac"] = torch.tensor(rollouts.batch_size / seen.batch_size)
        self.log_step(seen, metrics, rollout_s=rollout_s, prep_s=t1 - t0 - rollout_s, update_s=t2 - t1)  # 7

    def collect(self, prompts: Any) -> tuple[RolloutBatch, RolloutBatch, float]:
        """Steps 1-5, refilled: sample, score, reference log-probs, advantages, selection. While the selector
        wants more rows (DAPO's dynamic sampling), the step's prompts are sampled again, up to
        ``max_generation_rounds`` times. Returns (rows to train on, every row sampled, seconds spent sampling)."""
        kept, seen, rollout_s = None, [], 0.0
        for _ in range(self.max_generation_rounds):
            start = time.perf_counter()
            rollouts = self.rollout(prompts)  # 1
            rollout_s += time.perf_counter() - start
            rollouts = self.reference_logprobs(self.score(rollouts))  # 2, 3
            out = self.estimate_advantages(rollouts)  # 4
            advantages, keep = out if isinstance(out, tuple) else (out, None)
            rollouts = rollouts.replace(advantages=advantages)
            seen.append(rollouts)
            if keep is not None:  # e.g. MC-GRPO's pivot rows
                rollouts = rollouts.select(keep)
            if self.selector is not None:  # 5
                rollouts = self.selector(rollouts)
            kept = rollouts if kept is None else RolloutBatch.cat([kept, rollouts])
            if self.selector is None or not self.selector.wants_more(kept):
                break
        if self.selector is not None:
            kept = self.selector.finalize(kept)
        return kept, RolloutBatch.cat(seen), rollout_s

    def estimate_advantages(self, rollouts: RolloutBatch) -> Tensor | tuple[Tensor, Tensor]:
        """Step 4: the configured estimator. A critic-based subclass (T-PPO) overrides this to feed it values."""
        return self.advantage(rollouts)

    @torch.no_grad()
    def reference_logprobs(self, rollouts: RolloutBatch) -> RolloutBatch:
        """Step 3: reference log-probs (if a KL term needs them) and KL-in-reward shaping.

        Old log-probs are computed in :meth:`update` only when the policy moves before a row is used
        (``mu > 1`` or several minibatches); with one optimiser step per rollout they equal the current
        log-probs detached, so that forward pass is skipped.
        """
        if not (self.loss_fn.needs_reference or self.kl_in_reward > 0):
            return rollouts
        ref = self._micro_logprobs(rollouts, reference=True)
        rollouts = rollouts.replace(ref_logprobs=ref)
        if self.kl_in_reward > 0:
            cur = self._micro_logprobs(rollouts, reference=False)
            kl = (kl_estimate(cur, ref, "k1") * rollouts.completion_mask).sum(1)  # (B,)
            rollouts = rollouts.replace(rewards=rollouts.rewards - self.kl_in_reward * kl)
        return rollouts

    def _micro_logprobs(self, rollouts: RolloutBatch, *, reference: bool) -> Tensor:
        out = []
        for micro in rollouts.split(self.micro_batch_size or rollouts.batch_size):
            if reference and self.reference is None:  # LoRA: the reference is the adapter switched off
                with self.policy.disable_adapter():
                    out.append(self.sequence_logprobs(micro)[0])
            else:
                out.append(self.sequence_logprobs(micro, self.reference if reference else None)[0])
        return torch.cat(out)

    def update(self, rollouts: RolloutBatch) -> dict[str, Tensor]:
        """Step 6: ``mu`` epochs over minibatches; gradient accumulation over micro-batches with the loss
        normalised by the whole minibatch (so the split never changes the result)."""
        opt = self.optimizers()
        B = rollouts.batch_size
        mb_size = self.minibatch_size or B
        one_step = self.mu == 1 and mb_size >= B
        if not one_step:
            with torch.no_grad():
                rollouts = rollouts.replace(old_logprobs=self._micro_logprobs(rollouts, reference=False))
        totals: dict[str, Tensor] = {}
        steps, entropies = 0, []
        for epoch in range(self.mu):
            for mb in rollouts.split(mb_size):
                norm = Normaliser.of(mb.completion_mask, self.sampling.max_new_tokens)
                mb_loss = torch.zeros((), device=self.device)
                for micro in mb.split(self.micro_batch_size or mb.batch_size):
                    logprobs, entropy = self.sequence_logprobs(micro)
                    old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
                    out = self.loss_fn(logprobs, old, micro.advantages, micro.completion_mask,
                                       ref_logprobs=micro.ref_logprobs, entropy=entropy, normaliser=norm, batch=micro)
                    out = self.auxiliary_loss(micro, out, norm)
                    self.manual_backward(out.loss)
                    mb_loss = mb_loss + out.loss.detach()
                    if epoch == 0:
                        entropies.append(entropy.detach())
                    for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                        totals[k] = totals.get(k, 0.0) + v  # each is pre-divided by the minibatch normaliser
                grad_norm = self.step_if_finite(opt, mb_loss)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
                steps += 1
        self.backend.sync_weights(self.policy)
        if hasattr(self.backend, "observe"):  # samplers that adapt to the policy's entropy (HAPO)
            self.backend.observe(torch.cat(entropies), rollouts.completion_mask)  # rows in rollout order
        return {k: v / steps for k, v in totals.items()}

    def auxiliary_loss(self, micro: RolloutBatch, out: LossOutput, normaliser: Normaliser) -> LossOutput:
        """Add terms trained together with the policy loss on ``micro`` (a critic's value loss, T-PPO); called
        right after the micro-batch's policy forward. Default: none."""
        return out

    def empty_update(self) -> dict[str, Tensor]:
        """Nothing was selected (e.g. dynamic sampling found no informative group): take an optimiser step with
        no gradients, which changes no parameter but counts the step, so ``max_steps`` is still reached."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()
        return {"empty_steps": torch.ones(())}

    def step_if_finite(self, opt, loss: Tensor) -> Tensor:
        """Clip and step unless the loss or the gradient is non-finite; then skip the step (weights are never
        updated with NaN/inf), count it, and raise after ``max_consecutive_skips`` skips in a row."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if bool(torch.isfinite(grad_norm) & torch.isfinite(loss)):  # ok: one sync per optimiser step
            if self.max_grad_norm > 0:
                self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            self.consecutive_skips.zero_()
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if int(self.consecutive_skips) >= self.max_consecutive_skips:
                raise FloatingPointError(
                    f"{int(self.consecutive_skips)} optimiser steps in a row had a non-finite loss ({float(loss)}) or "
                    f"gradient norm ({float(grad_norm)}); stopping. Lower lr, check rewards and the reference, or raise "
                    "max_consecutive_skips."
                )
        opt.zero_grad(set_to_none=True)
        return grad_norm.detach()

    # ------------------------------------------------------------------ checkpointed state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG streams, so a resumed run samples exactly what the uninterrupted one would have."""
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["advlab_rng"] = {  # plain types and tensors only: Lightning loads with weights_only=True
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
        if torch.cuda.is_available():
            checkpoint["advlab_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        import random

        import numpy as np

        rng = checkpoint.get("advlab_rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ logging
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
        log["train/reward_failures"] = self.reward_failures.float()
        log["train/skipped_steps"] = self.skipped_steps.float()
        if rollouts.truncated is not None:
            log["train/truncated_frac"] = rollouts.truncated.float().mean()
        tokens = rollouts.lengths.sum().float()
        log["perf/rollout_s"] = torch.tensor(rollout_s)
        log["perf/update_s"] = torch.tensor(prep_s + update_s)
        log["perf/tokens_per_s"] = tokens / max(rollout_s, 1e-9)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=B)
        self.log("reward", log["train/reward"], prog_bar=True, on_step=True, logger=False, batch_size=B)
        step = self.global_step
        if self.log_samples_every and step % self.log_samples_every == 0 and hasattr(self.logger, "experiment") and hasattr(self.logger.experiment, "add_text"):
            lines = [f"**reward {float(r):.2f}** `{s.get('prompt', '')}` → `{c}`" for r, s, c in
                     zip(rollouts.rewards[: self.group_size].tolist(), rollouts.samples, rollouts.completions)]
            self.logger.experiment.add_text("samples", "\n\n".join(lines), step)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
