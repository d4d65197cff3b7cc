"""DAPO (arXiv 2503.14476): four changes to GRPO. The spec's CPU checks (shared/methods/text.md §3 (e)) on the
library's components, plus a bandit for the clip-higher claim ("prevents entropy collapse").

(1) Clip-higher: A > 0, ρ = 1.25: the gradient passes with ε_high = 0.28 and is 0 with ε_high = 0.2.
(2) Dynamic sampling: after DynamicSampling every kept group has σ > 0 and zero_adv_frac == 0.
(3) Overlong shaping, L_max = 20, L_cache = 4: |y| = 16, 18, 20, 21 -> 0, −0.5, −1, −1.
(4) Token-mean: with lengths (10, 100) every token gets the same weight 1/110 (seq-mean-token-mean: 1/20 vs 1/200).
(5) Bandit: softmax over 20 answers, 5 of them correct; the policy starts peaked on one correct answer (P = 0.6).
G = 16, 4 groups a step, GRPO advantages, 4 PPO epochs per batch with SGD on the logits through the library's
clipped surrogate; ε_low = 0.2 with ε_high = 0.2 vs 0.28; 20 seeds, 60 steps. Claim: clip-higher keeps the
policy's entropy higher (low-probability correct answers may grow faster).

    python reproductions/dapo.py        # ~20 s on 2 cores; writes reproductions/reports/dapo.md
"""

from __future__ import annotations

from support.report import plt, save_plot, verdict, write_report  # the repository root on sys.path, Agg

import torch

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.losses.aggregate import aggregate
from common.losses.ppo_clip import clipped_surrogate
from common.rewards.length import overlong_penalty
from common.sampling.filters import DynamicSampling

K, GOOD, G, GROUPS, EPOCHS, STEPS, SEEDS, LR = 20, 5, 16, 4, 4, 60, 20, 0.3


def check_clip_higher() -> bool:
    grads = []
    for eps_high in (0.28, 0.2):
        lp = torch.log(torch.tensor([[1.25]])).requires_grad_(True)  # ρ = 1.25
        loss, _, _ = clipped_surrogate(lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1, dtype=torch.bool),
                                       eps_low=0.2, eps_high=eps_high)
        (g,) = torch.autograd.grad(loss.sum(), lp)
        grads.append(float(g))
    return grads[0] != 0.0 and grads[1] == 0.0


def check_dynamic_sampling() -> bool:
    gen = torch.Generator().manual_seed(0)
    g = torch.arange(50).repeat_interleave(8)
    correct = torch.rand(400, generator=gen) < torch.rand(50, generator=gen)[g] ** 3  # many all-wrong groups
    r = correct.float()
    B = len(g)
    batch = RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(B, 1, dtype=torch.long), completion_mask=torch.ones(B, 1, dtype=torch.bool),
                         group_ids=g, rewards=r, correct=correct, advantages=grpo(r, g))
    kept = DynamicSampling()(batch)
    return kept.batch_size > 0 and bool((kept.advantages != 0).all()) and bool((batch.advantages == 0).any())


def check_overlong() -> bool:
    return overlong_penalty(torch.tensor([16, 18, 20, 21]), 20, 4).tolist() == [0.0, -0.5, -1.0, -1.0]


def check_token_mean() -> bool:
    mask = torch.arange(100)[None, :] < torch.tensor([[10], [100]])  # (2, 100) lengths 10 and 100
    x = torch.zeros(2, 100, requires_grad=True)
    (g_tok,) = torch.autograd.grad(aggregate(x, mask, "token_mean"), x)
    (g_seq,) = torch.autograd.grad(aggregate(x, mask, "seq_mean_token_mean"), x)
    return (abs(g_tok[0, 0] - 1 / 110) < 1e-7 and abs(g_tok[1, 0] - 1 / 110) < 1e-7
            and abs(g_seq[0, 0] - 1 / 20) < 1e-7 and abs(g_seq[1, 0] - 1 / 200) < 1e-7)


def bandit(eps_high: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.zeros(K, dtype=torch.float64)
    logits[0] = torch.log(torch.tensor(0.6 / (0.4 / (K - 1))))  # P(answer 0) = 0.6; answers 0..4 are correct
    gid = torch.arange(GROUPS).repeat_interleave(G)
    entropy = []
    for _ in range(STEPS):
        probs = torch.softmax(logits, 0)
        entropy.append(float(-(probs * probs.log()).sum()))
        actions = torch.multinomial(probs, GROUPS * G, replacement=True, generator=gen)  # (B,)
        adv = grpo((actions < GOOD).double(), gid)
        old = torch.log_softmax(logits, 0)[actions][:, None]  # (B, 1)
        for _ in range(EPOCHS):
            lg = logits.clone().requires_grad_(True)
            lp = torch.log_softmax(lg, 0)[actions][:, None]
            loss, _, _ = clipped_surrogate(lp, old, adv, torch.ones_like(lp, dtype=torch.bool), eps_low=0.2, eps_high=eps_high)
            (grad,) = torch.autograd.grad(loss.mean(), lg)
            logits = logits - LR * grad
    return torch.tensor(entropy)


def main() -> None:
    checks = {"clip-higher gradient at ρ = 1.25": check_clip_higher(), "dynamic sampling: no zero advantage kept": check_dynamic_sampling(),
              "overlong 16/18/20/21 -> 0/−0.5/−1/−1": check_overlong(), "token-mean weights (10, 100) equally": check_token_mean()}
    curves = {e: torch.stack([bandit(e, s) for s in progress(range(SEEDS), f"dapo: eps_high {e}, seeds")]) for e in (0.2, 0.28)}
    final = {e: c[:, -1] for e, c in curves.items()}
    diff = final[0.28] - final[0.2]  # paired by seed
    se = (diff.std() / SEEDS**0.5).item()
    higher = diff.mean().item() > 2 * se
    reproduced = all(checks.values()) and higher
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for e, c in curves.items():
        ax.plot(c.mean(0).numpy(), label=f"ε_low 0.2, ε_high {e}")
    ax.set_xlabel("step")
    ax.set_ylabel("policy entropy (nats)")
    ax.legend()
    fig.tight_layout()
    save_plot(fig, "dapo")
    outcome = "reproduced" if reproduced else "not reproduced"
    rows = "\n".join(f"| {k} | {v} |" for k, v in checks.items())
    write_report("dapo", f"""# DAPO (arXiv 2503.14476): component checks and clip-higher entropy

| check | passes |
|---|---|
{rows}

Bandit: {K} answers ({GOOD} correct), start P(answer 0) = 0.6, G = {G}, {GROUPS} groups a step, GRPO advantages,
{EPOCHS} PPO epochs per batch (SGD lr {LR} on the logits, the library's `clipped_surrogate`), {SEEDS} seeds, {STEPS} steps.

| ε_high | entropy at start | entropy after {STEPS} steps (mean of {SEEDS} seeds) |
|---|---|---|
| 0.2 | {curves[0.2][:, 0].mean():.3f} | {final[0.2].mean():.3f} |
| 0.28 | {curves[0.28][:, 0].mean():.3f} | {final[0.28].mean():.3f} |

Paired difference (0.28 − 0.2): {diff.mean():+.3f} ± {se:.3f} (s.e.); counted as higher when > 2 s.e.: {higher}.

![entropy](dapo.png)

Verdict: claim **{outcome}**. The AIME 2024 result (50 vs 47 with Qwen2.5-32B) needs a large model and is not tested.
""")
    verdict("dapo", reproduced, f"checks {sum(checks.values())}/4 pass; bandit entropy after {STEPS} steps "
          f"eps_high 0.2 {final[0.2].mean():.3f} vs 0.28 {final[0.28].mean():.3f} (diff {diff.mean():+.3f}±{se:.3f})")


if __name__ == "__main__":
    main()
