"""SPO (single-stream): a persistent per-prompt Beta value tracker as the baseline, batch-global normalisation.

Paper: "Single-stream Policy Optimization" (Xu & Ding, Tencent, 2025, arXiv 2509.13232). shared/methods/text.md §11.
Equations as summarised there (the paper body was not readable; the tracker logic was not located in verl's
``recipe/spo``):

    tracker per prompt x:  α(x), β(x);  v̂(x) = α / (α + β);  N_eff(x) = α + β
    one response y ~ π(·|x), reward r ∈ [0, 1]
    A(x, y) = r − v̂₋₁(x)                                      baseline from *before* this observation
    Ã = (A − mean_B A) / (std_B A + ε)                         global normalisation over the batch (under DDP:
                                                               every rank's rows, gathered)
    ρ(x) = clamp(2^(−D(x) / D_half), ρ_min, ρ_max)             KL-adaptive forgetting
    α(x) ← ρ(x)·α(x) + r ;  β(x) ← ρ(x)·β(x) + (1 − r)        (= v̂ ← v̂ + (r − v̂) / (ρ N_eff + 1))

D(x) [UNVERIFIED, the spec's proposal]: the policy's KL drift since x was last sampled, ``K_total − K_at_visit(x)``,
where ``K_total`` sums a per-step KL(π_before ‖ π_after) estimate of each update (fed by :meth:`SPOTracker.observe_kl`;
the method part ``common.methods.spo_stream.SPOStream`` does it). Unseen prompts start at v̂ = 0.5 with
N_0 = 1 / (1 − ρ_min) pseudo-counts (the spec's proposal; the paper's offline estimation with n_0 samples per prompt
is not done). Rewards outside [0, 1] are rejected: the Beta update is an EMA of v̂ only for rewards in [0, 1]. Several
rows of one prompt in a batch all use the baseline from before the batch, and the prompt's counts take one decay plus
all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator, check_rewards
from common.batch import RolloutBatch
from common.distributed import all_gather_cat


def spo_advantage(rewards: Tensor, baseline: Tensor, *, eps: float = 1e-6,
                  all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> Tensor:
    """SPO's advantage ``Ã = (A − mean_B A) / (std_B A + eps)`` with ``A = r − v̂₋₁`` (unbiased batch std).

    ``all_gather`` (every rank's rows in rank order and this rank's start, a collective; e.g.
    ``common.distributed.all_gather_rows``): mean_B and std_B are the global batch's, over every data-parallel
    rank's A, computed on the gathered A exactly as one process on the global batch; None: this batch's.
    Shapes: rewards (B,), baseline (B,) -> (B,). A batch whose A are all equal (or a batch of one) gives exactly 0.
    """
    check_rewards(rewards)
    if baseline.shape != rewards.shape:
        raise ValueError(f"baseline must have the shape of rewards {tuple(rewards.shape)}, got {tuple(baseline.shape)}")
    a = rewards - baseline.to(rewards.dtype)  # (B,)
    if all_gather is not None:
        every, start = all_gather(a)  # (Σ_r B_r,) every rank's A
        return _normalise(every, eps)[start:start + a.numel()]  # (B,) this rank's rows
    return _normalise(a, eps)


def _normalise(a: Tensor, eps: float) -> Tensor:
    """SPO's global normalisation of A (B,) -> (B,) (see :func:`spo_advantage`)."""
    a = a - a[:1]  # shift by a member: all-equal A become exact zeros (the normalised value is shift-invariant)
    centred = a - a.mean()  # (B,)
    if a.numel() < 2:
        return torch.zeros_like(a)
    return centred / (a.std(unbiased=True) + eps)


def kl_forgetting(divergence: Tensor, *, d_half: float, rho_min: float, rho_max: float) -> Tensor:
    """``ρ = clamp(2^(−D / D_half), ρ_min, ρ_max)``: the tracker keeps less of its memory the more the policy moved.
    Shapes: divergence (U,) -> (U,)."""
    return torch.exp2(-divergence / d_half).clamp(rho_min, rho_max)


def beta_update(alpha: Tensor, beta: Tensor, successes: Tensor, trials: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """Discounted Beta posterior: ``α ← ρα + Σr``, ``β ← ρβ + Σ(1 − r)``. Shapes: all (U,) -> (U,), (U,)."""
    return rho * alpha + successes, rho * beta + (trials - successes)


class SPOTracker(AdvantageEstimator, torch.nn.Module):
    """SPO's per-prompt value tracker as the advantage estimator (group-free: use ``group_size: 1``).

    Reads ``RolloutBatch.prompt_uid``, every row's prompt index in ``[0, num_prompts)`` (the data module's
    ``"uid"``, e.g. ``text_reasoning.spo.PrioritisedData``, copied by ``common.methods.sample_fields.SampleFields``).
    State (buffers, checkpointed): ``alpha``, ``beta``,
    ``kl_at_visit`` (N,), ``visits`` (N,), ``kl_total`` ().

    Args:
        num_prompts: capacity N, at least the number of training prompts.
        d_half: D_half, the KL drift that halves the memory [UNVERIFIED; tune].
        rho_min: smallest discount ρ [UNVERIFIED, recollection 0.875].
        rho_max: largest discount ρ, used while the policy does not move [UNVERIFIED, recollection 0.96].
        prior_count: N_0, pseudo-counts of an unseen prompt at v̂ = 0.5 (None: 1 / (1 − ρ_min)).
        eps: ε of the batch normalisation.
    """

    min_group_size = 1  # group-free: the baseline is the tracked value, so G = 1 works
    # every rank's rows, set by the Loop under data parallelism: the normalisation is over the global batch
    all_gather: Callable[[Tensor], tuple[Tensor, int]] | None = None

    requires = ("prompt_uid",)

    def __init__(self, num_prompts: int, d_half: float = 0.01, rho_min: float = 0.875, rho_max: float = 0.96,
                 prior_count: float | None = None, eps: float = 1e-6):
        torch.nn.Module.__init__(self)
        problems = []
        if num_prompts < 1:
            problems.append(f"num_prompts must be >= 1, got {num_prompts}")
        if d_half <= 0:
            problems.append(f"d_half must be > 0, got {d_half}")
        if not 0 < rho_min <= rho_max <= 1:
            problems.append(f"need 0 < rho_min <= rho_max <= 1, got rho_min={rho_min}, rho_max={rho_max}")
        if prior_count is None and rho_min >= 1:
            problems.append("prior_count must be given when rho_min = 1 (N_0 = 1 / (1 − ρ_min) is infinite)")
        if prior_count is not None and prior_count <= 0:
            problems.append(f"prior_count must be > 0, got {prior_count}")
        if problems:
            raise ValueError("SPOTracker: " + "; ".join(problems))
        self.num_prompts, self.d_half, self.rho_min, self.rho_max, self.eps = num_prompts, d_half, rho_min, rho_max, eps
        n0 = prior_count if prior_count is not None else 1.0 / (1.0 - rho_min)
        self.register_buffer("alpha", torch.full((num_prompts,), n0 / 2, dtype=torch.float64))  # (N,)
        self.register_buffer("beta", torch.full((num_prompts,), n0 / 2, dtype=torch.float64))  # (N,)
        self.register_buffer("kl_at_visit", torch.zeros(num_prompts, dtype=torch.float64))  # (N,) K_total at last visit
        self.register_buffer("visits", torch.zeros(num_prompts, dtype=torch.long))  # (N,)
        self.register_buffer("kl_total", torch.zeros((), dtype=torch.float64))  # () Σ per-step KL drift

    def value(self) -> Tensor:
        """v̂(x) = α / (α + β). Shapes: -> (N,)."""
        return self.alpha / (self.alpha + self.beta)

    def uids(self, batch: RolloutBatch) -> Tensor:
        """The rows' prompt indices (B,), checked to lie in [0, num_prompts)."""
        if batch.prompt_uid is None:
            raise ValueError("SPOTracker needs RolloutBatch.prompt_uid (the prompt's index in [0, num_prompts)); use "
                             "text_reasoning.spo.PrioritisedData as the data module and "
                             "common.methods.sample_fields.SampleFields to copy its 'uid' into prompt_uid")
        uid = batch.prompt_uid.to(self.alpha.device)  # (B,)
        if bool(((uid < 0) | (uid >= self.num_prompts)).any()):  # ok: one check per step
            raise ValueError(f"prompt_uid must be in [0, {self.num_prompts}) (num_prompts); got max "
                             f"{int(uid.max())}: raise num_prompts to at least the number of training prompts")
        return uid

    @torch.no_grad()
    def observe(self, uid: Tensor, rewards: Tensor) -> None:
        """Fold rewards (B,) of prompts ``uid`` (B,) into the tracker with the KL-adaptive discount.

        Under data parallelism every rank's rows are folded in (gathered in rank order; the identity on one
        process), so each rank's tracker is the one global tracker of the global batch: equal on every rank, as the
        prioritised draw (``text_reasoning.spo.PrioritisedData``) needs. A collective: every rank calls it."""
        uid, rewards = all_gather_cat(uid), all_gather_cat(rewards)  # (Σ_r B_r,)
        uniq, inv = torch.unique(uid, return_inverse=True)  # (U,), (B,)
        r = rewards.to(self.alpha.dtype)
        successes = torch.zeros(uniq.numel(), dtype=r.dtype, device=r.device).index_add_(0, inv, r)  # (U,)
        trials = torch.zeros_like(successes).index_add_(0, inv, torch.ones_like(r))  # (U,)
        rho = kl_forgetting(self.kl_total - self.kl_at_visit[uniq], d_half=self.d_half, rho_min=self.rho_min,
                            rho_max=self.rho_max)  # (U,)
        self.alpha[uniq], self.beta[uniq] = beta_update(self.alpha[uniq], self.beta[uniq], successes, trials, rho)
        self.kl_at_visit[uniq] = self.kl_total
        self.visits[uniq] += trials.long()

    @torch.no_grad()
    def observe_kl(self, kl: Tensor) -> None:
        """Add one update's KL(π_before ‖ π_after) estimate (a scalar; negative values count as 0) to K_total."""
        self.kl_total += kl.detach().to(self.kl_total).clamp(min=0)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        rewards = batch.rewards
        check_rewards(rewards)
        if bool(((rewards < 0) | (rewards > 1)).any()):  # ok: one check per step
            raise ValueError(f"SPOTracker needs rewards in [0, 1] (a Beta tracker of the success rate), got range "
                             f"[{float(rewards.min())}, {float(rewards.max())}]")
        uid = self.uids(batch)  # (B,)
        baseline = self.value()[uid].to(rewards.dtype)  # (B,) v̂₋₁: before this batch
        advantages = spo_advantage(rewards, baseline, eps=self.eps, all_gather=self.all_gather)  # (B,)
        self.observe(uid, rewards)
        return advantages
