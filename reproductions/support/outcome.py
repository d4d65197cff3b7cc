"""Outcome experiments shared by the reproductions whose old checks held by construction (HölderPO, HAPO, ADORA,
SPO single-stream, SSB, D³S, DRPO; issue 17): two small tasks on which a method can lose to its control, the
training loop around ``common.loop.Loop``, and the pre-registered decision rule.

- :class:`SeqTable` / :func:`seq_task`: P prompts, each with a reference answer y* of L_c tokens over V symbols;
  reward 1 iff the whole answer is right (sparse: a 4-token answer is right with probability V^-4 at the start, so
  many groups are all wrong). Position-wise logit table θ (P, T, V); exact pass@1 = mean_c Π_t π(y*_t | c, t).
- :class:`LengthTable` / :func:`length_task`: a "reasoning length" task. Token 0 of a completion is a plan a in
  [0, K) with length L_a; tokens 1..L_a−1 are filler tokens from a per-position table (they carry log-probs and
  entropy like the tokens of a chain of thought, but do not change the reward); the answer is correct with
  probability q_a. Exact accuracy = mean_c Σ_a π(a | c) q_a; mean length = mean_c Σ_a π(a | c) L_a.
- :func:`train`: steps of ``loop.collect`` + ``loop.update`` with a given stepper; a metric read before each step.
- :func:`run_arms`: every arm on every seed, the values saved after each seed.
- :func:`decide`: the rule every report pre-registers: with the paired 95% interval [lo, hi] of method − control
  over seeds, *not reproduced* if hi < ``margin`` (a gain of the claimed kind of at least ``margin`` is excluded),
  else *reproduced* if lo > 0, else *inconclusive*.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.policies.base import Policy, PolicyOutput

from support.report import REPORTS, diff_ci, fmt_ci, mean_ci, table

# ----------------------------------------------------------------------------------------- sequence task


def seq_task(seed: int, prompts: int = 8, lengths: Sequence[int] = (2, 2, 3, 3, 3, 4, 4, 4), vocab: int = 4) -> list[dict]:
    """``prompts`` prompts ``{"index": c, "answer": y*}`` with y* drawn from ``seed`` (lengths cycled)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [{"index": c, "answer": torch.randint(0, vocab, (lengths[c % len(lengths)],), generator=g).tolist()}
            for c in range(prompts)]


class SeqTable(Policy):
    """y_t ~ softmax(θ[c, t]) independently, θ (P, Lmax, V) from 0 (uniform). Prompts: ``{"index": c, "answer":
    y*}``. Shapes: completion_ids (B, Lmax), completion_mask (B, Lmax) = t < L_c, inputs["prompt"] (B,),
    prompt_uid (B,) = c (the SPO tracker's key). Row p·n + j is draw j of prompt p (``generator``)."""

    provides = ("prompt_uid",)

    def __init__(self, task: list[dict], vocab: int = 4, generator: torch.Generator | None = None):
        super().__init__()
        T = max(len(q["answer"]) for q in task)
        self.theta = torch.nn.Parameter(torch.zeros(len(task), T, vocab, dtype=torch.float64))  # (P, T, V)
        self.register_buffer("answers", torch.tensor([q["answer"] + [0] * (T - len(q["answer"])) for q in task]))  # (P, T)
        self.register_buffer("lengths", torch.tensor([len(q["answer"]) for q in task]))  # (P,)
        self.horizon, self.generator = T, generator

    @torch.no_grad()
    def rollout(self, prompts: list[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        c = torch.tensor([q["index"] for q in prompts]).repeat_interleave(n)  # (B,)
        probs = torch.softmax(self.theta[c], -1)  # (B, T, V)
        B, T, V = probs.shape
        y = torch.multinomial(probs.reshape(-1, V), 1, generator=self.generator).view(B, T)  # (B, T)
        return RolloutBatch(completion_ids=y, completion_mask=torch.arange(T)[None, :] < self.lengths[c][:, None],
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n), inputs={"prompt": c},
                            prompt_uid=c.clone(), samples=[{"index": q["index"]} for q in prompts for _ in range(n)])

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        logp = torch.log_softmax(self.theta[batch.inputs["prompt"]], -1)  # (B, T, V)
        m = batch.completion_mask  # (B, T)
        lp = logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1)  # (B, T)
        return PolicyOutput(lp * m, -(logp.exp() * logp).sum(-1) * m)

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """Reward 1 iff every answer token is right. Sets rewards (B,) and correct (B,)."""
        c = batch.inputs["prompt"]
        ok = ((batch.completion_ids == self.answers[c]) | ~batch.completion_mask).all(1)  # (B,)
        return batch.replace(rewards=ok.double(), correct=ok)

    @torch.no_grad()
    def pass1(self) -> float:
        """Exact hint-free pass@1: mean over prompts of Π_t π(y*_t)."""
        logp = torch.log_softmax(self.theta, -1).gather(-1, self.answers[..., None]).squeeze(-1)  # (P, T)
        m = torch.arange(self.horizon)[None, :] < self.lengths[:, None]
        return float((logp * m).sum(1).exp().mean())


# ----------------------------------------------------------------------------------------- length task


class LengthTable(Policy):
    """Plan a ~ softmax(φ[c]) (K,), then filler tokens f_t ~ softmax(ψ[c, t]) (t = 1..L_a−1) over ``filler`` symbols;
    the completion is [a, f_1, ..., f_{L_a−1}] (ids of fillers offset by K). φ, ψ from 0. The answer is correct with
    probability q_a (drawn in :meth:`score` with ``generator``). Shapes: completion_ids, completion_mask (B, Lmax);
    inputs["prompt"] (B,)."""

    provides = ("prompt_uid",)

    def __init__(self, prompts: int, lengths: Sequence[int], q: Sequence[float], filler: int = 4,
                 generator: torch.Generator | None = None):
        super().__init__()
        K, T = len(lengths), max(lengths)
        self.phi = torch.nn.Parameter(torch.zeros(prompts, K, dtype=torch.float64))  # (P, K)
        self.psi = torch.nn.Parameter(torch.zeros(prompts, T, filler, dtype=torch.float64))  # (P, T, F)
        self.register_buffer("L", torch.tensor(list(lengths)))  # (K,)
        self.register_buffer("q", torch.tensor(list(q), dtype=torch.float64))  # (K,)
        self.K, self.horizon, self.generator = K, T, generator

    @torch.no_grad()
    def rollout(self, prompts: list[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        c = torch.tensor([q["index"] for q in prompts]).repeat_interleave(n)  # (B,)
        B, T = c.shape[0], self.horizon
        a = torch.multinomial(torch.softmax(self.phi[c], -1), 1, generator=self.generator)[:, 0]  # (B,)
        pf = torch.softmax(self.psi[c], -1)  # (B, T, F)
        f = torch.multinomial(pf.reshape(B * T, -1), 1, generator=self.generator).view(B, T) + self.K  # (B, T)
        ids = torch.cat([a[:, None], f[:, 1:]], 1)  # (B, T)
        mask = torch.arange(T)[None, :] < self.L[a][:, None]  # (B, T)
        return RolloutBatch(completion_ids=ids, completion_mask=mask, group_ids=torch.arange(len(prompts)).repeat_interleave(n),
                            inputs={"prompt": c}, prompt_uid=c.clone(),
                            samples=[{"index": q["index"]} for q in prompts for _ in range(n)])

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        c, ids, m = batch.inputs["prompt"], batch.completion_ids, batch.completion_mask
        lp_a = torch.log_softmax(self.phi[c], -1)  # (B, K)
        lp_f = torch.log_softmax(self.psi[c], -1)  # (B, T, F)
        first = lp_a.gather(1, ids[:, :1])  # (B, 1)
        rest = lp_f[:, 1:].gather(-1, (ids[:, 1:] - self.K).clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
        H = torch.cat([-(lp_a.exp() * lp_a).sum(-1, keepdim=True), -(lp_f[:, 1:].exp() * lp_f[:, 1:]).sum(-1)], 1)  # (B, T)
        return PolicyOutput(torch.cat([first, rest], 1) * m, H * m)

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        a = batch.completion_ids[:, 0]  # (B,)
        ok = torch.rand(a.shape[0], generator=self.generator, dtype=torch.float64) < self.q[a]  # (B,)
        return batch.replace(rewards=ok.double(), correct=ok)

    @torch.no_grad()
    def accuracy(self) -> float:
        return float((torch.softmax(self.phi, -1) * self.q).sum(1).mean())

    @torch.no_grad()
    def mean_length(self) -> float:
        return float((torch.softmax(self.phi, -1) * self.L).sum(1).mean())


def length_prompts(prompts: int) -> list[dict]:
    return [{"index": c} for c in range(prompts)]


# ----------------------------------------------------------------------------------------- training and the rule


def adam_stepper(policy: Policy, lr: float) -> Stepper:
    params = policy.trainable_parameters()
    return Stepper(torch.optim.Adam(params, lr=lr), params, max_grad_norm=0.0)


def train(loop: Loop, stepper: Stepper, prompts: Callable[[int], list[dict]], steps: int,
          metrics: dict[str, Callable[[], float]], before_step: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """``steps`` of ``loop.collect(prompts(step))`` + ``loop.update``; each metric read before every step and once
    after the last (``steps + 1`` values each). ``before_step(step)`` runs before each collect (a loss's schedule)."""
    out: dict[str, list[float]] = {k: [] for k in metrics}
    for s in range(steps):
        for k, f in metrics.items():
            out[k].append(f())
        if before_step is not None:
            before_step(s)
        loop.update(loop.collect(prompts(s)).kept, stepper)
    for k, f in metrics.items():
        out[k].append(f())
    return out


def auc(curve: Sequence[float]) -> float:
    """Mean of a per-step curve (the area under it per step: rewards both speed and the final value)."""
    return float(sum(curve) / len(curve))


def decide(ci: tuple[float, float, float], margin: float) -> str:
    """The pre-registered rule: ``not reproduced`` if hi < margin, else ``reproduced`` if lo > 0, else
    ``inconclusive`` (ci = (mean, lo, hi) of method − control)."""
    _, lo, hi = ci
    if hi < margin:
        return "not reproduced"
    return "reproduced" if lo > 0 else "inconclusive"


def run_arms(name: str, arms: Sequence[str], run: Callable[[str, int, int], float], seeds: int, steps: int, save: bool,
             metric: str) -> dict[str, list[float]]:
    """Seeds 0..seeds−1, each arm in order: ``run(arm, seed, steps)`` (one number per run); after every seed, with
    ``save``, the values so far in ``reports/<name>.json`` (with ``metric`` and ``steps``)."""
    res: dict[str, list[float]] = {arm: [] for arm in arms}
    for s in range(seeds):
        for arm in arms:
            res[arm].append(run(arm, s, steps))
        if save:
            save_json(name, {"metric": metric, "steps": steps, **res})
    return res


def save_json(name: str, data: dict, out: Path = REPORTS) -> Path:
    """Write ``reports/<name>.json`` (called after every seed, so partial results survive a stop)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def arms_table(values: dict[str, list[float]], control: str, digits: int = 3) -> str:
    """A markdown table: per arm the mean [95% CI] over seeds, and the paired difference to ``control``."""
    rows = []
    for arm, v in values.items():
        d = "—" if arm == control else fmt_ci(diff_ci(v, values[control]), digits, signed=True)
        rows.append((arm, fmt_ci(mean_ci(v), digits), d))
    return table(("arm", "mean [95% CI] over seeds", f"paired − {control} [95% CI]"), rows)
