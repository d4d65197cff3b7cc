"""ROMA: reinforcing multimodal reasoning against visual degradation, as a composable Method (no loop override).

"Reinforcing Multimodal Reasoning Against Visual Degradation" (ROMA, arXiv 2605.09262; abstract and two summaries,
no code: shared/methods/domains.md §4). Rollouts happen on **clean** images only (rolling out on degraded ones
poisons the reward); a second, teacher-forced forward pass scores the *same* clean trajectories under Kc corrupted
views of the image, and two regularisers are added to the GRPO loss of the clean rollouts:

    views       Ĩ_{i,k} = c_{i,k}(I_i),  k = 1..Kc, kind / level / noise from key_{i,k} = h(seed, sample_i, step, k)
    log-probs   ℓ^clean_{i,t} = log π_θ(o_{i,t} | I_i, q_i, o_{i,<t}),   ℓ^(k)_{i,t} = log π_θ(o_{i,t} | Ĩ_{i,k}, q_i, o_{i,<t})
    token KL    D^(k)_{i,t} = exp(δ) − δ − 1,  δ = ℓ^(k)_{i,t} − sg(ℓ^clean_{i,t})        k3 estimate of KL(p_clean ‖ p^(k))
    worst case  D_{i,t} = max_k D^(k)_{i,t}                                                     (per token; ``worst``)
    aux PG      L_aux = agg_{i,t} −min(ρ^aux A_i, clip(ρ^aux, 1 − ε, 1 + ε) A_i),  ρ^aux = exp(ℓ^(k_i) − sg ℓ^(k_i)_old)
    gate        g_i = 1[trajectory i is correct]   (correctness-conditioned regularisation)
    total       L = L_GRPO(clean) + λ_KL · agg(g_i m_{i,t} D_{i,t}) + λ_aux · agg(g_i^aux m_{i,t} l^aux_{i,t})

with A_i the **clean** GRPO advantages (the batch's ``advantages``: the auxiliary term reuses them, never a reward
measured on a corrupted view) and agg the loop's aggregation over the minibatch (``common.losses.aggregate``).

What the abstract fixes: the dual forward pass with teacher forcing and no rollouts on corrupted views; a token-level
surrogate KL against the worst-case augmentation; an auxiliary PG loss anchored to clean-image advantages;
correctness-conditioned regularisation. Everything else is our reading, chosen as follows ([UNVERIFIED] in the spec):
    - KL direction: the corrupted branch is pulled toward the clean one (clean detached).
    - "surrogate KL": the k3 estimator on the sampled token (GRPO's per-token KL), since the Policy interface hands
      back the sampled tokens' log-probs only; the spec's full-vocabulary option is not implemented.
    - worst case: per token (``worst="token"``, the spec's default); ``"sample"`` takes per row the view with the
      largest mean KL over its tokens (argmax_k of the per-sample KL), ``"mean"`` averages the views (an ablation).
    - aux view k_i: view 0 of each row; the views are i.i.d. draws, so this is a uniformly random view.
    - aux ratio: against the corrupted view's log-prob before the update; with one optimiser step per rollout
      (mu = 1, one minibatch) that is the current log-prob detached (ρ = 1, REINFORCE's gradient −A ∇ℓ^(k)), else it
      is computed once per step before the update (``after_score``) and carried in the batch.
    - gate: per term (``gate_kl``, ``gate_aux``; both on: the summaries say both, the abstract the invariance term);
      correctness is the batch's ``correct`` (the task's verifier), or ``reward > reward_threshold``.
    - normaliser: the minibatch's token count (the loop's ``Normaliser``, so a micro-batch split never changes the
      gradient), not the count of correct tokens; λ_KL therefore acts on the share of correct tokens.
    - defaults Kc = 3, λ_KL = 0.1, λ_aux = 0.5, severities uniform over the five levels of the seen set.

Recorded in the batch (``batch.inputs``, (B, Kc, ...) rows travel with select / split / cat): the views' kind,
level and key (``roma_kind``, ``roma_level``, ``roma_key``; ``multimodal.roma.corruptions.describe`` names them) and
the corrupted pixels (``roma_views``), plus ``roma_old_logprobs`` (B, Kc, T) when the aux ratio needs them. The
image is ``inputs[image_key]`` (B, C, H, W) or (B, N, C, H, W), stored as ``(x − mean) / std`` of pixels in [0, 1].
State across steps: ``step`` (a buffer, in the checkpoint), which enters every key. ``roma_old_logprobs`` has the
step's completion width T, so a selector that refills a step from new prompts (``max_generation_rounds > 1``, whose
rounds may differ in T) cannot concatenate it; such a run needs one optimiser step per rollout (mu = 1, one minibatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.losses.aggregate import AGGREGATIONS, Aggregation, Normaliser, aggregate
from common.losses.base import LossOutput
from common.losses.kl import kl_estimate
from common.losses.ppo_clip import clipped_surrogate
from common.methods.base import Method
from common.policies.base import PolicyOutput
from multimodal.roma import corruptions as C

if TYPE_CHECKING:
    from common.loop import Loop

VIEW_KEYS = ("roma_views", "roma_kind", "roma_level", "roma_key", "roma_old_logprobs")


def worst_case_token_kl(lp_clean: Tensor, lp_views: Tensor, mask: Tensor,
                        worst: Literal["token", "sample", "mean"] = "token") -> tuple[Tensor, Tensor]:
    """Per-token k3 KL(p_clean ‖ p^(k)) on the clean policy's sampled tokens, reduced over the views.

    D^(k)_{b,t} = exp(δ) − δ − 1, δ = ℓ^(k) − sg ℓ^clean (clamped to ±10 as every KL of the library). ``worst``:
    ``"token"`` max_k per token; ``"sample"`` the view k*_b = argmax_k of the per-sample KL (mean over the row's
    tokens), all of its tokens; ``"mean"`` the mean over the views. Gradients reach ``lp_views`` only.
    Shapes: lp_clean (B, T), lp_views (B, K, T), mask (B, T) bool -> D (B, T), 0 off the mask; and (B,) long, the
    argmax over views of the per-sample KL (the view ``"sample"`` trains on; returned for every mode).
    """
    if lp_views.dim() != 3 or lp_views.shape[0] != lp_clean.shape[0] or lp_views.shape[2] != lp_clean.shape[1]:
        raise ValueError(f"lp_views must be (B, K, T) for lp_clean {tuple(lp_clean.shape)}, got {tuple(lp_views.shape)}")
    if mask.shape != lp_clean.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match lp_clean {tuple(lp_clean.shape)}")
    B, K, T = lp_views.shape
    clean = lp_clean.detach()[:, None].expand(B, K, T)
    per_view = kl_estimate(clean, lp_views, "k3") * mask[:, None]  # (B, K, T): δ = ℓ^(k) − sg ℓ^clean
    per_sample = per_view.sum(2) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
    chosen = per_sample.detach().argmax(1)  # (B,)
    if worst == "token":
        kl = per_view.max(1).values
    elif worst == "sample":
        kl = per_view.gather(1, chosen[:, None, None].expand(B, 1, T)).squeeze(1)
    elif worst == "mean":
        kl = per_view.mean(1)
    else:
        raise ValueError(f"worst must be 'token', 'sample' or 'mean', got {worst!r}")
    return kl, chosen


class ROMA(Method):
    """ROMA's dual forward pass and regularisers (module docstring). Listed under ``methods:`` beside a GRPO loss.

    Args:
        num_views: Kc, corrupted views per row (spec default 3).
        kl_coef: λ_KL of the worst-case token KL (0.1).
        aux_coef: λ_aux of the auxiliary PG term on a corrupted view (0.5); 0 = off.
        corruptions: the training corruptions' names, or ``"seen"`` (multimodal.roma.corruptions.SEEN).
        min_level, max_level: severity levels drawn uniformly in [min_level, max_level] (1..5).
        worst: ``"token"`` | ``"sample"`` | ``"mean"`` (``worst_case_token_kl``).
        gate_kl, gate_aux: apply the term to correct trajectories only.
        gate: ``"correct"`` (the batch's ``correct``, the task's verifier) or ``"reward"`` (``rewards > reward_threshold``).
        reward_threshold: the reward above which a row counts as correct when ``gate="reward"``.
        clip_eps: ε of the aux term's clip.
        aggregation: how the terms are reduced (``common.losses.aggregate``; the minibatch's normaliser).
        image_key: the key of the image in ``batch.inputs``.
        pixel_mean, pixel_std: the image is stored as (x − mean) / std of x in [0, 1] (per channel lists or floats).
        seed: the corruption sampler's seed (enters every key).
    """

    def __init__(self, num_views: int = 3, kl_coef: float = 0.1, aux_coef: float = 0.5,
                 corruptions: Sequence[str] | str = "seen", min_level: int = 1, max_level: int = C.NUM_LEVELS,
                 worst: Literal["token", "sample", "mean"] = "token", gate_kl: bool = True, gate_aux: bool = True,
                 gate: Literal["correct", "reward"] = "correct", reward_threshold: float = 0.5, clip_eps: float = 0.2,
                 aggregation: Aggregation = "token_mean", image_key: str = "pixel_values",
                 pixel_mean: float | Sequence[float] = 0.0, pixel_std: float | Sequence[float] = 1.0, seed: int = 0):
        super().__init__()
        problems = []
        if num_views < 1:
            problems.append(f"num_views must be >= 1, got {num_views}")
        if kl_coef < 0 or aux_coef < 0:
            problems.append(f"kl_coef and aux_coef must be >= 0, got {kl_coef}, {aux_coef}")
        if worst not in ("token", "sample", "mean"):
            problems.append(f"worst must be 'token', 'sample' or 'mean', got {worst!r}")
        if gate not in ("correct", "reward"):
            problems.append(f"gate must be 'correct' or 'reward', got {gate!r}")
        if aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not 0 < clip_eps < 1:
            problems.append(f"clip_eps must be in (0, 1), got {clip_eps}")
        std = torch.as_tensor(pixel_std, dtype=torch.float32)
        if bool((std <= 0).any()):
            problems.append(f"pixel_std must be > 0, got {pixel_std}")
        if problems:
            raise ValueError("ROMA: " + "; ".join(problems))
        self.allowed = C.kind_ids(corruptions, "corruptions")
        C.draw_views(torch.zeros(1, dtype=torch.long), self.allowed, min_level, max_level)  # checks the levels
        self.num_views, self.kl_coef, self.aux_coef = num_views, kl_coef, aux_coef
        self.min_level, self.max_level, self.worst = min_level, max_level, worst
        self.gate_kl, self.gate_aux, self.gate, self.reward_threshold = gate_kl, gate_aux, gate, reward_threshold
        self.clip_eps, self.aggregation, self.image_key, self.seed = clip_eps, aggregation, image_key, seed
        self.requires = ("correct",) if gate == "correct" else ()
        self.pixel_mean = torch.as_tensor(pixel_mean, dtype=torch.float32)
        self.pixel_std = std
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # enters every view's key; checkpointed

    # ------------------------------------------------------------------ views
    def _affine(self, images: Tensor) -> tuple[Tensor, Tensor]:
        C_ = images.shape[-3]
        shape = (C_, 1, 1) if self.pixel_mean.numel() > 1 or self.pixel_std.numel() > 1 else ()
        return self.pixel_mean.to(images).reshape(shape), self.pixel_std.to(images).reshape(shape)

    @torch.no_grad()
    def views(self, images: Tensor, samples: Tensor, step: int | Tensor) -> dict[str, Tensor]:
        """The Kc corrupted views of each row's image(s) and what made them: a pure function of (seed, sample,
        step, view). Shapes: images (B, C, H, W) or (B, N, C, H, W) normalised; samples (B,) long ->
        roma_views (B, Kc, *image shape), roma_kind / roma_level / roma_key (B, Kc) long."""
        if images.dim() not in (4, 5):
            raise ValueError(f"inputs[{self.image_key!r}] must be (B, C, H, W) or (B, N, C, H, W), got {tuple(images.shape)}")
        B, K = images.shape[0], self.num_views
        keys = C.view_keys(self.seed, samples, step, K)  # (B, K)
        kinds, levels = C.draw_views(keys, self.allowed, self.min_level, self.max_level)  # (B, K)
        mean, std = self._affine(images)
        pixels = (images.float() * std + mean)[:, None].expand(B, K, *images.shape[1:])  # (B, K, [N,] C, H, W) in [0, 1]
        per_image = pixels.shape[2] if images.dim() == 5 else 1  # every image of a row gets the row's view
        flat = pixels.reshape(B * K * per_image, *images.shape[-3:])
        rep = lambda t: t.reshape(-1).repeat_interleave(per_image)  # noqa: E731  (B*K*N,)
        out = C.corrupt(flat.clamp(0, 1), rep(kinds), rep(levels), rep(keys)).reshape(pixels.shape)
        return {"roma_views": ((out - mean) / std).to(images.dtype), "roma_kind": kinds, "roma_level": levels,
                "roma_key": keys}

    def sample_ids(self, batch: RolloutBatch) -> Tensor:
        """A row's identity in the view keys: its training prompt's uid (if the data record it) · 2^20 + its row
        in the step's rollout batch. (B,) long."""
        rows = torch.arange(batch.batch_size, device=batch.group_ids.device)
        return rows if batch.prompt_uid is None else batch.prompt_uid.long() * (1 << 20) + rows

    def corrupted_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """Each row repeated Kc times (row b·Kc + k) with view k as its image: the teacher-forced clean trajectories
        on the corrupted views (no generation)."""
        B, K = batch.batch_size, self.num_views
        views = batch.inputs["roma_views"]  # (B, K, ...)
        rows = torch.arange(B, device=views.device).repeat_interleave(K)
        inputs = {k: v[rows] for k, v in batch.inputs.items() if k not in VIEW_KEYS}
        inputs[self.image_key] = views.reshape(B * K, *views.shape[2:])
        plain = batch.replace(inputs={}, samples=[], completions=[]).select(rows)
        return plain.replace(inputs=inputs)

    def view_logprobs(self, loop: "Loop", batch: RolloutBatch) -> Tensor:
        """log π_θ of the clean trajectories' tokens under each corrupted view. Shapes: -> (B, Kc, T)."""
        out = loop.policy(self.corrupted_batch(batch))
        return out.logprobs.view(batch.batch_size, self.num_views, -1)

    # ------------------------------------------------------------------ hooks
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        """Draw and record the views; the corrupted views' log-probs before the update when the aux ratio needs them."""
        if self.image_key not in batch.inputs:
            raise ValueError(f"ROMA needs the image in batch.inputs[{self.image_key!r}] (image_key), got keys "
                             f"{sorted(batch.inputs)}")
        inputs = {**batch.inputs, **self.views(batch.inputs[self.image_key], self.sample_ids(batch), self.step)}
        batch = batch.replace(inputs=inputs)
        B = batch.batch_size
        if self.aux_coef > 0 and not (loop.mu == 1 and (loop.minibatch_size or B) >= B):
            size = max(1, (loop.micro_batch_size or B) // self.num_views)
            with torch.no_grad():
                old = torch.cat([self.view_logprobs(loop, micro) for micro in batch.split(size)])  # (B, K, T)
            batch = batch.replace(inputs={**batch.inputs, "roma_old_logprobs": old})
        return batch

    def gates(self, batch: RolloutBatch) -> Tensor:
        """g_i: 1 for a correct trajectory. (B,) float."""
        if self.gate == "correct":
            batch.require("ROMA (gate='correct')", "correct")
            return batch.correct.float()
        batch.require("ROMA (gate='reward')", "rewards")
        return (batch.rewards > self.reward_threshold).float()

    def extra_loss(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput:
        mask = micro.loss_mask  # (B, T)
        lp_views = self.view_logprobs(loop, micro)  # (B, K, T) the second forward pass, with gradient
        kl, chosen = worst_case_token_kl(out.logprobs, lp_views, mask, self.worst)  # (B, T), (B,)
        g = self.gates(micro)[:, None]  # (B, 1)
        ones = torch.ones_like(g)
        kl_term = aggregate(kl * (g if self.gate_kl else ones), mask, self.aggregation, normaliser)
        loss, metrics = self.kl_coef * kl_term, {}
        if self.aux_coef > 0:
            lp_aux = lp_views[:, 0]  # (B, T) view 0: an i.i.d. draw, so a uniformly random view
            old = micro.inputs.get("roma_old_logprobs")
            old = old[:, 0] if old is not None else lp_aux.detach()
            per_token, _, _ = clipped_surrogate(lp_aux, old, micro.advantages, mask, eps_low=self.clip_eps,
                                                eps_high=self.clip_eps)  # (B, T) clean advantages
            aux_term = aggregate(per_token * (g if self.gate_aux else ones), mask, self.aggregation, normaliser)
            loss = loss + self.aux_coef * aux_term
            metrics["roma/aux_loss"] = aux_term.detach()
        per_seq = normaliser.num_sequences
        metrics.update({
            "roma/kl": kl_term.detach(),  # the regulariser as trained (gated)
            "roma/kl_all": aggregate(kl.detach(), mask, self.aggregation, normaliser),  # every row, ungated
            "roma/gated_frac": g.sum() / per_seq,  # share of rows the gate lets through
            "roma/view_nll": aggregate(-lp_views.detach().mean(1), mask, self.aggregation, normaliser),
            "roma/clean_nll": aggregate(-out.logprobs.detach(), mask, self.aggregation, normaliser),
        })
        return LossOutput(loss, metrics)

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        self.step += 1
        return {}

    def extra_repr(self) -> str:
        return (f"num_views={self.num_views}, kl_coef={self.kl_coef}, aux_coef={self.aux_coef}, worst={self.worst}, "
                f"corruptions={[C.NAMES[i] for i in self.allowed.tolist()]}, gate={self.gate}")


__all__ = ["ROMA", "VIEW_KEYS", "worst_case_token_kl"]
