"""Evaluation metrics (torchmetrics, summed across processes): pass@k and maj@k over groups of sampled answers
(`P` prompts, `n` samples per prompt), and speculative decoding's mean acceptance length τ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per prompt (Chen et al. 2021, arXiv 2107.03374, eq. 1 and its numerically stable form):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    with `n` samples and `c` correct ones. When n - c < k the product has the factor i = k,
    which is 0, so pass@k = 1 with no special case.

    Shapes: correct (P, n) bool -> (P,) float64.
    """
    if correct.dim() != 2 or correct.dtype != torch.bool:
        raise ValueError(f"correct must be a (P, n) bool tensor, got {correct.dtype} of shape {tuple(correct.shape)}")
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per prompt, got k={k}, n={n}")
    c = correct.sum(dim=1, keepdim=True)  # (P, 1)
    i = torch.arange(1, n + 1, device=correct.device, dtype=torch.float64)  # (n,)
    factors = torch.where(i > n - c, 1.0 - k / i, torch.ones_like(i))  # (P, n)
    return 1.0 - factors.prod(dim=1)  # (P,)


class PassAtK(Metric):
    """Mean unbiased pass@k over prompts (see `pass_at_k`). `update(correct)` with correct (P, n) bool, n >= k."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        scores = pass_at_k(correct, self.k)  # (P,)
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer; ties go to the answer that appears first; None if there is none."""
    counts: dict[str, int] = {}  # insertion order = first occurrence
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equal maxima


class MajorityAtK(Metric):
    """maj@k: accuracy of the majority vote over the first `k` answers of each prompt.

    `update(answers, targets)`: answers[p] holds at least k answers (str, or None for "no
    answer", which never wins); targets[p] the reference. Answers are compared as strings,
    so normalise them first (e.g. with `common.rewards.math.last_number`).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str | None]], targets: Sequence[str]) -> None:
        if len(answers) != len(targets):
            raise ValueError(f"answers and targets must have the same length, got {len(answers)} and {len(targets)}")
        for p, prompt_answers in enumerate(answers):
            if len(prompt_answers) < self.k:
                raise ValueError(f"answers[{p}] has {len(prompt_answers)} answers, maj@{self.k} needs >= {self.k}")
        hits = sum(majority_vote(a[: self.k]) == t for a, t in zip(answers, targets))  # a None vote never equals a str
        self.correct += hits
        self.count += len(targets)

    def compute(self) -> Tensor:
        return self.correct.double() / self.count


class AcceptanceLength(Metric):
    """Mean acceptance length τ: tokens committed per verification cycle (accepted drafted tokens + 1).
    ``update(accepted)`` with accepted (C,) the drafted tokens accepted in C cycles."""

    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cycles", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accepted: Tensor) -> None:
        if accepted.dim() != 1 or bool((accepted < 0).any()):
            raise ValueError(f"accepted must be a (C,) tensor of non-negative counts, got shape {tuple(accepted.shape)}")
        self.tokens += (accepted + 1).sum().double()
        self.cycles += accepted.numel()

    def compute(self) -> Tensor:
        return self.tokens / self.cycles.clamp(min=1)


def sharpe_ratio_at_k(estimated: Tensor, true: Tensor, behaviour_value: float, k: int) -> Tensor:
    """SharpeRatio@k of an off-policy / offline estimator used to pick policies (Kiyohara et al., ICLR 2024, "Towards
    Assessing and Benchmarking Risk-Return Tradeoff of Off-Policy Evaluation"; agentic.md §15):

        Π_k      = the k candidate policies ranked highest by the estimates Ĵ
        best@k   = max_{π ∈ Π_k} J(π)          (J = the true, online value)
        std@k    = std_{π ∈ Π_k} J(π)          (population std, numpy's default; the paper's convention is unverified)
        SharpeRatio@k = (best@k − J(π_b)) / std@k

    A high value means the top-k shortlist holds a policy better than the behaviour policy π_b with little risk of
    deploying a bad one. Ties in Ĵ are broken by the lower index. ``std@k = 0`` (k = 1, or equal true values) gives 0
    (never inf or NaN). Shapes: estimated (P,), true (P,) -> () float64.
    """
    if estimated.dim() != 1 or true.shape != estimated.shape:
        raise ValueError(f"estimated and true must be (P,) tensors of one shape, got {tuple(estimated.shape)} and {tuple(true.shape)}")
    if not isinstance(k, int) or not 1 <= k <= estimated.numel():
        raise ValueError(f"k must be an integer in [1, P={estimated.numel()}], got {k!r}")
    if not (torch.isfinite(estimated).all() and torch.isfinite(true).all()):
        raise ValueError("estimated and true must be finite")
    order = torch.sort(estimated.double(), descending=True, stable=True).indices[:k]  # (k,)
    top = true.double()[order]  # (k,)
    best, std = top.max(), top.std(unbiased=False)
    return torch.where(std > 0, (best - behaviour_value) / std.clamp(min=1e-300), torch.zeros_like(std))


class SharpeRatioAtK(Metric):
    """SharpeRatio@k (see `sharpe_ratio_at_k`) over the candidate policies given so far: ``update(estimated, true)``
    adds candidates (P,), ``compute()`` ranks all of them."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, behaviour_value: float) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k, self.behaviour_value = k, float(behaviour_value)
        self.add_state("estimated", [], dist_reduce_fx="cat")
        self.add_state("true", [], dist_reduce_fx="cat")

    def update(self, estimated: Tensor, true: Tensor) -> None:
        if estimated.dim() != 1 or true.shape != estimated.shape:
            raise ValueError(f"estimated and true must be (P,) tensors of one shape, got {tuple(estimated.shape)} and {tuple(true.shape)}")
        self.estimated.append(estimated.double())
        self.true.append(true.double())

    def compute(self) -> Tensor:
        est = torch.cat(self.estimated) if isinstance(self.estimated, list) else self.estimated
        tru = torch.cat(self.true) if isinstance(self.true, list) else self.true
        return sharpe_ratio_at_k(est, tru, self.behaviour_value, self.k)
