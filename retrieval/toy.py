"""A tiny generate-and-rank policy for CPU-scale checks of F-GRPO (arXiv 2605.12995, the spec's §7(e)).

The policy reads the candidates of a recommendation pool as feature vectors and writes, one choice per step,
a slate of ``n_slate`` distinct candidates and then a ranking of ``rank_k`` distinct slate members: an
autoregressive pointer policy (Plackett-Luce without replacement) whose two phases share one backbone

    h_c = MLP([x̄ ⊙ v_c, v_c])               x̄ the history mean, v_c the candidate's latent vector
    π_gen(c | chosen)  ∝ exp(w_gen · h_c)    over the pool minus what is already in the slate
    π_rank(c | chosen) ∝ exp(w_rank · h_c)   over the slate minus what is already ranked

so a sequence has ``S = n_slate + rank_k`` actions, phase masks are spans ``[0, n_slate)`` and
``[n_slate, S)``, and the log-probs (B, S) feed the same advantage and loss code as a language model.
Rewards are the tensor forms of :mod:`retrieval.rewards` (coverage of the slate, NDCG@k of the ranking).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def toy_features(samples: list[dict], vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Features and graded relevance of recommendation samples. Shapes: -> (N, C, 2d), (N, C)."""
    items = torch.tensor([s["items"] for s in samples])  # (N, C) catalogue ids
    hist = vectors[torch.tensor([s["history"] for s in samples])].mean(1)  # (N, d)
    v = vectors[items]  # (N, C, d)
    return torch.cat([hist[:, None, :] * v, v], dim=-1), torch.tensor([s["relevance"] for s in samples])


def coverage_t(slate: Tensor, rel: Tensor) -> Tensor:
    """|slate ∩ Rel| / |Rel|. Shapes: slate (B, n) pool indices, rel (B, C) grades -> (B,); 0 if nothing is relevant."""
    hit = (rel.gather(1, slate) > 0).float().sum(1)  # (B,)
    return hit / (rel > 0).float().sum(1).clamp(min=1)


def ndcg_t(ranking: Tensor, rel: Tensor, k: int) -> Tensor:
    """NDCG@k with linear gain. Shapes: ranking (B, m) pool indices, rel (B, C) -> (B,)."""
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=rel.dtype))  # (k,)
    dcg = (rel.gather(1, ranking[:, :k]) * disc[: min(k, ranking.shape[1])]).sum(1)  # (B,)
    idcg = (rel.sort(1, descending=True).values[:, :k] * disc).sum(1)  # (B,)
    return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg))


class PointerPolicy(nn.Module):
    """Shared backbone, one pointer head per phase (see the module docstring).

    Args:
        in_dim: candidate feature size (2d).
        hidden: backbone width.
        n_slate: slate length n.
        rank_k: ranking length k (<= n).
    """

    def __init__(self, in_dim: int, hidden: int = 64, n_slate: int = 8, rank_k: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.Linear(hidden, 2)  # column 0: gen, column 1: rank
        self.n_slate, self.rank_k = n_slate, rank_k

    def logits(self, x: Tensor) -> Tensor:  # (B, C, F) -> (B, 2, C)
        return self.heads(self.backbone(x)).transpose(1, 2)

    def _available(self, actions: Tensor, C: int) -> Tensor:
        """Which candidates each step may choose, given the earlier actions. Shapes: (B, S) -> (B, S, C) bool."""
        B, S = actions.shape
        onehot = torch.nn.functional.one_hot(actions, C).bool()  # (B, S, C)
        before = (onehot.cumsum(1) - onehot.long()) > 0  # (B, S, C) chosen at an earlier step (either phase)
        n = self.n_slate
        in_slate = onehot[:, :n].any(1, keepdim=True)  # (B, 1, C)
        step = torch.arange(S)[None, :, None]  # (1, S, 1)
        ranked_before = (onehot[:, n:].cumsum(1) - onehot[:, n:].long()) > 0  # (B, S - n, C)
        gen_ok = ~before  # slate steps: not yet in the slate
        rank_ok = in_slate & ~torch.cat([torch.zeros_like(onehot[:, :n]), ranked_before], 1)
        return torch.where(step < n, gen_ok, rank_ok)

    def log_probs(self, x: Tensor, actions: Tensor) -> Tensor:
        """Log-prob of each action under the policy. Shapes: x (B, C, F), actions (B, S) -> (B, S)."""
        B, C, _ = x.shape
        lg = self.logits(x)  # (B, 2, C)
        phase = (torch.arange(actions.shape[1]) >= self.n_slate).long()  # (S,)
        per_step = lg[:, phase, :]  # (B, S, C)
        per_step = per_step.masked_fill(~self._available(actions, C), float("-inf"))
        return per_step.log_softmax(-1).gather(2, actions[:, :, None]).squeeze(2)

    @torch.no_grad()
    def sample(self, x: Tensor, greedy: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Slate then ranking, one choice per step. Shapes: x (B, C, F) -> actions (B, n + k) pool indices."""
        B, C, _ = x.shape
        lg = self.logits(x)  # (B, 2, C)
        chosen = torch.zeros(B, C, dtype=torch.bool)
        actions = []
        for s in range(self.n_slate + self.rank_k):  # ok: autoregressive steps (S = 13), vectorised over B
            if s == self.n_slate:
                in_slate, chosen = chosen, torch.zeros(B, C, dtype=torch.bool)
            allowed = ~chosen if s < self.n_slate else in_slate & ~chosen
            logits = lg[:, int(s >= self.n_slate)].masked_fill(~allowed, float("-inf"))  # (B, C)
            a = logits.argmax(1) if greedy else torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
            chosen = chosen | torch.nn.functional.one_hot(a, C).bool()
            actions.append(a)
        return torch.stack(actions, 1)
