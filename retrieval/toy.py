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

The pointer policy is a ``common.policies.base.Policy``, so RL runs through the shared step
(``common.loop.Loop`` + ``Stepper``, :func:`train_rl`) with the project's estimators and loss: F-GRPO is
``FactorisedGRPO`` + ``seq_mean_token_sum``, the joint-reward baseline ``GRPO(scale="none")`` +
``seq_mean_token_mean``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.advantages.factorised import FactorisedGRPO
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.policies.base import Policy, PolicyOutput


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


class PointerPolicy(Policy):
    """Shared backbone, one pointer head per phase (see the module docstring).

    As a Policy, a prompt batch is a dict of per-prompt tensors: ``x`` (P, C, F) candidate features and ``rel``
    (P, C) graded relevance (carried in ``RolloutBatch.inputs`` for the rewards); the actions are pool indices
    (B, S) and every row has two phases starting at 0 and ``n_slate`` (``phase_starts``).

    Args:
        in_dim: candidate feature size (2d).
        hidden: backbone width.
        n_slate: slate length n.
        rank_k: ranking length k (<= n).
    """

    provides = ("phase_starts",)

    def __init__(self, in_dim: int, hidden: int = 64, n_slate: int = 8, rank_k: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.Linear(hidden, 2)  # column 0: gen, column 1: rank
        self.n_slate, self.rank_k = n_slate, rank_k
        self.generator: torch.Generator | None = None  # the sampler's random stream (None: torch's global RNG)

    @property
    def horizon(self) -> int:  # S, actions per sequence
        return self.n_slate + self.rank_k

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
        return self._step_logits(x, actions).log_softmax(-1).gather(2, actions[:, :, None]).squeeze(2)

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

    def _step_logits(self, x: Tensor, actions: Tensor) -> Tensor:
        """Per-step logits over the allowed candidates (-inf elsewhere). Shapes: (B, C, F), (B, S) -> (B, S, C)."""
        B, C, _ = x.shape
        phase = (torch.arange(actions.shape[1]) >= self.n_slate).long()  # (S,)
        return self.logits(x)[:, phase, :].masked_fill(~self._available(actions, C), float("-inf"))

    # ------------------------------------------------------------------ the Policy interface
    def rollout(self, prompts: dict[str, Tensor], n: int, *, greedy: bool = False) -> RolloutBatch:
        """``n`` slates-and-rankings per prompt (group id = prompt). ``prompts``: ``x`` (P, C, F), ``rel`` (P, C)."""
        P = prompts["x"].shape[0]
        inputs = {k: v.repeat_interleave(n, 0) for k, v in prompts.items()}  # each (B, ...)
        actions = self.sample(inputs["x"], greedy=greedy, generator=self.generator)  # (B, S)
        B = actions.shape[0]
        return RolloutBatch(completion_ids=actions, completion_mask=torch.ones_like(actions, dtype=torch.bool),
                            group_ids=torch.arange(P).repeat_interleave(n), inputs=inputs,
                            phase_starts=torch.tensor([[0, self.n_slate]]).expand(B, 2))

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """Log-probs and entropies of the actions. Shapes: -> (B, S), (B, S)."""
        if reference:
            raise NotImplementedError("PointerPolicy has no reference policy (train with beta = 0)")
        logp = self._step_logits(batch.inputs["x"], batch.completion_ids).log_softmax(-1)  # (B, S, C)
        lp = logp.gather(2, batch.completion_ids[:, :, None]).squeeze(2)  # (B, S)
        entropy = -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)  # (B, S)
        return PolicyOutput(lp, entropy)


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


def score(batch: RolloutBatch) -> RolloutBatch:
    """Per-phase rewards (B, 2) = (slate coverage, NDCG@k of the ranking) and their sum, from ``inputs["rel"]``."""
    n, rel = int(batch.phase_starts[0, 1]), batch.inputs["rel"]  # every row: slate of n, then the ranking
    k = batch.completion_ids.shape[1] - n
    comps = torch.stack([coverage_t(batch.completion_ids[:, :n], rel), ndcg_t(batch.completion_ids[:, n:], rel, k)], 1)
    return batch.replace(rewards=comps.sum(1), reward_components=comps, reward_names=("coverage", "ndcg"))


def train_rl(policy: PointerPolicy, x: Tensor, rel: Tensor, *, factorised: bool, swap_phases: bool = False, steps: int,
             g: torch.Generator, prompts: int = 32, G: int = 8, lr: float = 3e-3, log_every: int = 10) -> list[tuple]:
    """RL through the shared step (``Loop.collect`` + ``Loop.update``), one optimiser step per rollout batch:
    F-GRPO (``factorised``: per-phase advantages with ``seq_mean_token_sum``, the two-phase objective) or
    joint-reward GRPO (Dr.GRPO centring of R_gen + R_rank on every action, ``seq_mean_token_mean``). ``g`` draws
    the prompts and the samples. Returns [(step, mean R_gen, mean R_rank)] of the sampled rollouts."""
    advantage = FactorisedGRPO(scale="none", swap_phases=swap_phases) if factorised else GRPO(scale="none")
    loss = ClippedPolicyLoss(aggregation="seq_mean_token_sum" if factorised else "seq_mean_token_mean")
    loop = Loop(policy, score, advantage, loss, group_size=G)
    stepper = Stepper(torch.optim.Adam(policy.trainable_parameters(), lr=lr), policy.trainable_parameters(), max_grad_norm=0.0)
    policy.generator, curve = g, []
    try:
        for step in range(steps):
            idx = torch.randint(len(x), (prompts,), generator=g)  # (P,)
            got = loop.collect({"x": x[idx], "rel": rel[idx]})
            if step % log_every == 0 or step == steps - 1:
                r = got.seen.reward_components.mean(0)
                curve.append((step, float(r[0]), float(r[1])))
            loop.update(got.kept, stepper)
    finally:
        policy.generator = None
    return curve


def greedy_rankings(policy: PointerPolicy, x: Tensor) -> list[list[int]]:
    """The greedy ranking of each prompt as candidate ids 1..C. Shapes: x (N, C, F) -> N lists of k ids."""
    with torch.no_grad():
        actions = policy.sample(x, greedy=True)
    return (actions[:, policy.n_slate :] + 1).tolist()
