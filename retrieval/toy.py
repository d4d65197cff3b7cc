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

from common.advantages.factorised import factorised_advantages, span_masks
from common.advantages.group import grpo
from common.losses.aggregate import aggregate
from common.losses.ppo_clip import clipped_surrogate


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


def teacher_sft(policy: PointerPolicy, x: Tensor, first: Tensor, steps: int, g: torch.Generator, lr: float = 3e-3,
                noise: float = 1.5, batch_size: int = 64) -> None:
    """Warm start on a noisy teacher (the spec's "mediocre" SFT policy): slate = top-n by ``first`` + noise,
    ranking = top-k of the slate by another noisy score. Shapes: x (N, C, F), first (N, C)."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    sd = first.std()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        s1 = first[idx] + noise * sd * torch.randn(first[idx].shape, generator=g)
        slate = s1.topk(policy.n_slate, 1).indices  # (b, n)
        s2 = (first[idx] + noise * sd * torch.randn(first[idx].shape, generator=g)).gather(1, slate)
        ranking = slate.gather(1, s2.topk(policy.rank_k, 1).indices)  # (b, k)
        loss = -policy.log_probs(x[idx], torch.cat([slate, ranking], 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_rl(policy: PointerPolicy, x: Tensor, rel: Tensor, *, factorised: bool, swap_phases: bool = False, steps: int,
             g: torch.Generator, prompts: int = 32, G: int = 8, lr: float = 3e-3, log_every: int = 10) -> list[tuple]:
    """RL with one optimiser step per rollout batch: F-GRPO (``factorised``: per-phase advantages with
    ``seq_mean_token_sum``, the two-phase objective) or joint-reward GRPO (Dr.GRPO centring of R_gen + R_rank on
    every action, ``seq_mean_token_mean``). Returns [(step, mean R_gen, mean R_rank)] of the sampled rollouts."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    n, k = policy.n_slate, policy.rank_k
    B = prompts * G
    mask = torch.ones(B, n + k, dtype=torch.bool)  # (B, S)
    phases = span_masks(torch.tensor([[0, n]]).expand(B, 2), mask)  # (B, 2, S) slate actions, then ranking actions
    if swap_phases:
        phases = phases.flip(1)
    gids = torch.arange(prompts).repeat_interleave(G)  # (B,)
    curve = []
    for step in range(steps):
        idx = torch.randint(len(x), (prompts,), generator=g).repeat_interleave(G)  # (B,)
        xb, rb = x[idx], rel[idx]
        actions = policy.sample(xb, generator=g)  # (B, S)
        r_gen, r_rank = coverage_t(actions[:, :n], rb), ndcg_t(actions[:, n:], rb, k)  # (B,) each
        if step % log_every == 0 or step == steps - 1:
            curve.append((step, float(r_gen.mean()), float(r_rank.mean())))
        if factorised:
            adv = factorised_advantages(torch.stack([r_gen, r_rank], 1), phases, gids)  # (B, S)
        else:
            adv = grpo(r_gen + r_rank, gids, scale="none")  # (B,)
        logp = policy.log_probs(xb, actions)  # (B, S)
        pg, _, _ = clipped_surrogate(logp, logp.detach(), adv, mask)
        loss = aggregate(pg, mask, "seq_mean_token_sum" if factorised else "seq_mean_token_mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def greedy_rankings(policy: PointerPolicy, x: Tensor) -> list[list[int]]:
    """The greedy ranking of each prompt as candidate ids 1..C. Shapes: x (N, C, F) -> N lists of k ids."""
    with torch.no_grad():
        actions = policy.sample(x, greedy=True)
    return (actions[:, policy.n_slate :] + 1).tolist()
