"""DUMP: a distribution-level curriculum by UCB over the windowed mean absolute advantage.

Paper: "DUMP: Automated Distribution-Level Curriculum Learning for RL-based LLM Post-training" (Wang et al.
2025, arXiv 2504.09710, Algorithm 1); constants from the authors' code (github ZhentingWang/DUMP,
``verl/utils/curriculum_learning.py``). shared/methods/text.md §10.

Training data mixes J distributions (sources, difficulty levels). The expected absolute advantage of a
distribution, L(d_j) = E_{x~d_j} E_{o~π(·|x)} |Â(o)|, measures how much the policy can still learn from it (0 when
the distribution is saturated or hopeless). Distributions are bandit arms:

    a_i   = |mean_t over valid tokens of A_{i,t}|            (sequence-level A: |A_i|)
    W_j   = the last ``window`` values a_i of distribution j  (FIFO)
    n_j   = samples of j seen so far,  N = Σ_j n_j
    L̂_j   = mean(W_j)                                        (0 while W_j is empty)
    UCB_j = L̂_j + c · sqrt(2 ln(N + 1) / (n_j + 1))
    P(j)  = softmax_j(UCB_j / τ)                             over the distributions that have prompts
    each prompt slot of a batch: j ~ P, then a prompt ~ Uniform(d_j)

The windows are updated once per training step, after advantages, from training rollouts only (the authors'
code also pushes validation *rewards* into them; the paper's algorithm does not, and neither do we: the
selector is called only by ``training_step``).

Data parallelism (DDP): every rank observes the rows of all ranks (gathered in rank order), so the windows, counts
and P(j) are one global state, equal on every rank (so rank 0's checkpoint is every rank's) and equal to one
process's trained on the same global batch. (Without the gather each rank's windows would follow its own rows only:
the ranks would draw from different P(j), no longer disjoint slices of one draw, and a resume would give every rank
rank 0's windows.)

State (in the Lightning checkpoint, as buffers): ``windows (J, W)``, ``counts (J,)``. The draw for a batch is a pure
function of that state, the data seed and the batch number (``text_reasoning.curriculum.CurriculumData``), so a
resumed run draws what the uninterrupted one would have. Each row's distribution is the declared field
``RolloutBatch.distribution`` (the data module tags its samples; ``common.methods.sample_fields.SampleFields``
copies the tag into the field).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.batch import RolloutBatch
from common.distributed import all_gather_cat
from common.ops import masked_mean
from common.sampling.base import Selector


def ucb_scores(window_mean: Tensor, counts: Tensor, *, c: float) -> Tensor:
    """DUMP's UCB score per distribution: ``UCB_j = L̂_j + c·sqrt(2 ln(N + 1) / (n_j + 1))``, N = Σ_j n_j.

    Shapes: window_mean (J,) float, counts (J,) -> (J,).
    """
    n = counts.to(window_mean.dtype)  # (J,)
    bonus = torch.sqrt(2.0 * torch.log1p(n.sum()) / (n + 1.0))  # (J,)
    return window_mean + c * bonus


def curriculum_probs(scores: Tensor, *, temperature: float, available: Tensor | None = None) -> Tensor:
    """``P(j) = softmax_j(UCB_j / τ)`` over the available distributions (the others get exactly 0).

    Shapes: scores (J,), available (J,) bool -> (J,).
    """
    logits = scores / temperature  # (J,)
    if available is not None:
        logits = logits.masked_fill(~available, float("-inf"))
    return torch.softmax(logits, dim=0)


def distribution_ids(batch: RolloutBatch, num_distributions: int, owner: str) -> Tensor:
    """``batch.distribution`` (B,) long, checked to be set and to lie in [0, J)."""
    if batch.distribution is None:
        raise ValueError(f"{owner} needs RolloutBatch.distribution (an int in [0, num_distributions) per row): use "
                         "text_reasoning.curriculum.CurriculumData as the data module and "
                         "common.methods.sample_fields.SampleFields with {distribution: distribution}")
    ids = batch.distribution.long()  # (B,)
    if ids.numel() and bool(((ids < 0) | (ids >= num_distributions)).any()):  # ok: one check per step
        raise ValueError(f"RolloutBatch.distribution must be in [0, {num_distributions}) (num_distributions), "
                         f"got values {sorted(set(ids.tolist()))}")
    return ids


class Curriculum(Selector, torch.nn.Module):
    """Base class of distribution-level curricula: a selector that watches training rollouts (keeping every row)
    and a ``probs(available)`` the data module draws each batch's distributions from."""

    requires = ("distribution",)
    num_distributions: int

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)

    def probs(self, available: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class DUMP(Curriculum):
    """DUMP's UCB curriculum (arXiv 2504.09710; see the module docstring for the equations).

    Use as ``model.selector`` together with ``data: text_reasoning.curriculum.CurriculumData`` (which tags every
    sample with its distribution and draws each batch from :meth:`probs`) and the method part
    ``common.methods.sample_fields.SampleFields`` with ``fields: {distribution: distribution}``. It keeps every row.

    Args:
        num_distributions: J, one per task source of the data module (in its order).
        window: FIFO length per distribution (authors' code: 300).
        c: exploration coefficient of the UCB bonus (paper: 1).
        temperature: τ of the softmax over UCB scores (authors' code: 0.1).
    """

    def __init__(self, num_distributions: int, window: int = 300, c: float = 1.0, temperature: float = 0.1):
        super().__init__()
        problems = []
        if num_distributions < 1:
            problems.append(f"num_distributions must be >= 1, got {num_distributions}")
        if window < 1:
            problems.append(f"window must be >= 1, got {window}")
        if c < 0:
            problems.append(f"c must be >= 0, got {c}")
        if temperature <= 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if problems:
            raise ValueError("DUMP: " + "; ".join(problems))
        self.num_distributions, self.window, self.c, self.temperature = num_distributions, window, c, temperature
        self.register_buffer("windows", torch.zeros(num_distributions, window))  # (J, W) last |A| values, ring
        self.register_buffer("counts", torch.zeros(num_distributions, dtype=torch.long))  # (J,) n_j

    def window_mean(self) -> Tensor:
        """``L̂_j``: mean of the filled part of each window (unfilled slots are 0). Shapes: -> (J,)."""
        filled = self.counts.clamp(max=self.window).to(self.windows.dtype)  # (J,)
        return self.windows.sum(1) / filled.clamp(min=1.0)

    def probs(self, available: Tensor | None = None) -> Tensor:
        """``P(j)`` for the next batch. Shapes: available (J,) bool -> (J,)."""
        scores = ucb_scores(self.window_mean(), self.counts, c=self.c)  # (J,)
        if available is not None:
            available = available.to(scores.device)
        return curriculum_probs(scores, temperature=self.temperature, available=available)

    @torch.no_grad()
    def observe(self, values: Tensor, distribution: Tensor) -> None:
        """Push ``values`` (B,) into the windows of ``distribution`` (B,) in row order; counts grow by the rows.

        Vectorised ring-buffer write: row i of distribution j goes to slot (n_j + rank_i) mod W, rank_i its
        position among this batch's rows of j; only each distribution's last W rows are written, so no slot is
        written twice.
        """
        J, W = self.num_distributions, self.window
        onehot = F.one_hot(distribution, J)  # (B, J)
        rank = (onehot.cumsum(0) - 1).gather(1, distribution[:, None]).squeeze(1)  # (B,) position within j
        per_j = onehot.sum(0)  # (J,) rows of each distribution in this batch
        keep = rank >= per_j[distribution] - W  # (B,) the last W rows of each distribution
        slot = (self.counts[distribution] + rank) % W  # (B,)
        self.windows[distribution[keep], slot[keep]] = values[keep].to(self.windows.dtype)
        self.counts += per_j

    def __call__(self, rollouts: RolloutBatch) -> RolloutBatch:
        if rollouts.advantages is None:
            raise ValueError("DUMP needs rollouts.advantages; it runs after the advantage estimator")
        adv = rollouts.advantages  # (B,) or (B, T)
        if adv.dim() == 2:
            adv = masked_mean(adv, rollouts.completion_mask, 1)  # (B,) mean over valid tokens; 0 if none
        ids = distribution_ids(rollouts, self.num_distributions, type(self).__name__).to(adv.device)  # (B,)
        # every rank's rows in rank order (the identity on one process): each rank's curriculum makes the update
        # one process would make on the global batch, so all ranks hold the same state and draw the same batch
        self.observe(all_gather_cat(adv.abs()), all_gather_cat(ids))  # (Σ_r B_r,)
        return rollouts
