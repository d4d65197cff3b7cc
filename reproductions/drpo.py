"""DRPO (arXiv 2510.04474): a length penalty in GRPO's reward pushes correct-but-long answers down; DRPO keeps
every correct answer's gradient positive and still prefers short ones.

Part 1, the spec's exact check (shared/methods/text.md §6 (e)): one group, 4 correct answers of lengths
(100, 200, 400, 800) and 4 wrong, C = 1000. GRPO with r = 1 − L/C for correct answers gives the 800-token correct
answer A < 0; DRPO's ∂loss/∂s_i is < 0 for every correct answer, with weights decreasing in length.
Part 2, a bandit illustration: a softmax policy over 20 "answers" (10 correct of lengths 100..1000, 10 wrong),
trained by GRPO + length penalty (α = 1) and by DRPO (the library's DRPOLoss) with sampled groups, both through the
library's loop (`common.loop.Loop` + `Stepper`) on `LengthBandit`, a Policy whose answer i is L_i tokens. Reported:
P(correct) and the mean correct length after training. The headline (77% shorter at −1.1% GSM8K accuracy)
needs an LLM and is not tested.

    python reproductions/drpo.py        # ~15 s on 2 cores; writes reproductions/reports/drpo.md
"""

from __future__ import annotations

from support.report import plt, save_plot, verdict, write_report  # the repository root on sys.path, Agg

import torch

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.drpo import DRPOLoss
from common.losses.ppo_clip import ClippedPolicyLoss
from common.policies.base import Policy, PolicyOutput

C = 1000


def make_batch(mask: torch.Tensor, group_ids: torch.Tensor, correct: torch.Tensor) -> RolloutBatch:
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, correct=correct)


def sign_check() -> dict[str, list[float]]:
    L = torch.tensor([100, 200, 400, 800, 300, 300, 300, 300])
    correct = torch.tensor([True] * 4 + [False] * 4)
    r = torch.where(correct, 1 - L / C, torch.zeros(8)).double()
    A = grpo(r, torch.zeros(8, dtype=torch.long))
    mask = torch.arange(C)[None, :] < L[:, None]
    lp = (-torch.rand(8, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    out = DRPOLoss(max_len=C)(lp, lp.detach(), torch.zeros(8), mask, batch=make_batch(mask, torch.zeros(8, dtype=torch.long), correct))
    out.loss.backward()
    lp_inf = lp.detach().clone().requires_grad_(True)
    DRPOLoss(lam=float("inf"), max_len=C)(lp_inf, lp_inf.detach(), torch.zeros(8), mask,
                                           batch=make_batch(mask, torch.zeros(8, dtype=torch.long), correct)).loss.backward()
    return {"grpo_A": A[:4].tolist(), "drpo_grad": lp.grad.sum(1)[:4].tolist(), "drpo_grad_inf": lp_inf.grad.sum(1)[:4].tolist()}


class LengthBandit(Policy):
    """A softmax policy over ``len(lengths)`` answers (free logits θ (K,), from uniform) whose answer i is a
    completion of L_i tokens that all carry log π(i), so the mean token log-prob is s_i = log π(i) and the
    length is L_i. A prompt is ``{}``. Shapes: completion_ids (B, C) the answer id on every token, mask (B, C)."""

    def __init__(self, lengths: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(len(lengths), dtype=torch.float64))  # (K,)
        self.register_buffer("lengths", lengths)  # (K,)
        self.horizon = int(lengths.max())

    @torch.no_grad()
    def rollout(self, prompts: list[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        p = torch.softmax(self.logits, 0)
        arms = torch.multinomial(p.expand(len(prompts), -1), n, replacement=True).flatten()  # (B,) row g·n + j
        mask = torch.arange(self.horizon)[None, :] < self.lengths[arms][:, None]  # (B, C)
        return RolloutBatch(completion_ids=arms[:, None].expand(-1, self.horizon).clone(), completion_mask=mask,
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
                            samples=[dict(q) for q in prompts for _ in range(n)])

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        logp = torch.log_softmax(self.logits, 0)  # (K,)
        m = batch.completion_mask  # (B, C)
        entropy = -(logp.exp() * logp).sum().expand(m.shape)  # (B, C)
        return PolicyOutput(logp[batch.completion_ids] * m, entropy * m)


def bandit(method: str, seed: int, steps: int = 150, groups: int = 4, G: int = 8, lr: float = 0.5):
    """Softmax policy over 20 answers trained through the library's loop (``common.loop.Loop``, one SGD step per
    batch of ``groups`` x G samples); returns P(correct) and E[L | correct] before each step."""
    torch.manual_seed(seed)
    lengths = torch.tensor([100 * (i % 10 + 1) for i in range(20)])  # (20,)
    correct = torch.arange(20) < 10  # (20,)
    policy = LengthBandit(lengths)

    def score(b: RolloutBatch) -> RolloutBatch:
        arms = b.completion_ids[:, 0]  # (B,)
        ok = correct[arms]
        r = torch.where(ok, 1 - lengths[arms] / C, 0.0) if method == "grpo_len" else ok  # GRPO: length-penalised
        return b.replace(rewards=r.double(), correct=ok)

    if method == "grpo_len":  # on-policy clipped surrogate, seq-mean-token-mean: −mean_i A_i log π(i)
        loop = Loop(policy, score, lambda b: grpo(b.rewards, b.group_ids), ClippedPolicyLoss(), group_size=G)
    else:  # DRPO's loss reads batch.correct; its advantages argument is unused (GRPO's, for logging)
        loop = Loop(policy, score, lambda b: grpo(b.rewards, b.group_ids), DRPOLoss(lam=0.1, tau=10.0, beta=0.0, max_len=C),
                    group_size=G, provided=("correct",))
    stepper = Stepper(torch.optim.SGD(policy.trainable_parameters(), lr=lr), policy.trainable_parameters(), max_grad_norm=0.0)
    acc, length = [], []
    for _ in range(steps):
        p = torch.softmax(policy.logits.detach(), 0)
        acc.append(p[correct].sum().item())
        length.append((p[correct] * lengths[correct]).sum().item() / p[correct].sum().item())
        loop.update(loop.collect([{}] * groups).kept, stepper)
    return acc, length


def main() -> None:
    torch.set_num_threads(1)
    signs = sign_check()
    seeds = range(10)
    runs = {m: [bandit(m, s) for s in progress(seeds, f"drpo: {m}, seeds")] for m in ("grpo_len", "drpo")}
    final = {m: (sum(r[0][-1] for r in runs[m]) / len(seeds), sum(r[1][-1] for r in runs[m]) / len(seeds)) for m in runs}
    start_len = runs["drpo"][0][1][0]
    sign_ok = signs["grpo_A"][3] < 0 and all(x < 0 for x in signs["drpo_grad"]) and all(
        a < b for a, b in zip(signs["drpo_grad"], signs["drpo_grad"][1:]))
    uniform_ok = max(abs(x + 0.25) for x in signs["drpo_grad_inf"]) < 1e-12
    outcome = "reproduced" if sign_ok and uniform_ok else "not reproduced"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m, color in (("grpo_len", "C0"), ("drpo", "C1")):
        for i, (acc, length) in enumerate(runs[m]):
            axes[0].plot(acc, color=color, alpha=0.4, label=m if i == 0 else None)
            axes[1].plot(length, color=color, alpha=0.4, label=m if i == 0 else None)
    axes[0].set(xlabel="step", ylabel="P(correct)", title="bandit: accuracy")
    axes[1].set(xlabel="step", ylabel="E[length | correct]", title="bandit: correct-answer length")
    axes[0].legend()
    fig.tight_layout()
    save_plot(fig, "drpo")
    fmt = lambda xs: ", ".join(f"{x:+.4f}" for x in xs)  # noqa: E731
    write_report("drpo", f"""# DRPO (arXiv 2510.04474): correct answers keep a positive gradient under a length preference

Setup: `reproductions/drpo.py`, implementation `common/losses/drpo.py`. Spec: shared/methods/text.md §6 (e).

## 1. Sign check (exact): one group, correct lengths (100, 200, 400, 800), 4 wrong, C = 1000

| correct answer length | 100 | 200 | 400 | 800 |
|---|---|---|---|---|
| GRPO advantage, r = 1 − L/C | {" | ".join(f"{x:+.4f}" for x in signs["grpo_A"])} |
| DRPO ∂loss/∂s_i (λ = 0.1) | {" | ".join(f"{x:+.4f}" for x in signs["drpo_grad"])} |
| DRPO ∂loss/∂s_i (λ = ∞, DisCO) | {" | ".join(f"{x:+.4f}" for x in signs["drpo_grad_inf"])} |

GRPO with the length penalty gives the 800-token correct answer a negative advantage (it is pushed down like a
wrong answer); DRPO pushes every correct answer up (negative loss gradient), more for shorter ones, and λ = ∞
gives the uniform −1/|P| = −0.25.

## 2. Bandit illustration (not a claim of the paper at this scale)

20 answers (10 correct of lengths 100…1000, 10 wrong), softmax policy from uniform, 4 groups x G = 8 per step,
SGD lr 0.5, 150 steps, 10 seeds; DRPO with λ = 0.1, τ = 10, β = 0 (no old policy to stay near in a bandit). Both
train through the library's loop (`common.loop.Loop` + `Stepper`) on `LengthBandit`, a Policy whose answer i is a
completion of L_i tokens each carrying log π(i); GRPO + penalty uses `ClippedPolicyLoss` (on-policy, ratio 1).

| method | final P(correct) | final E[L \\| correct] (start {start_len:.0f}) |
|---|---|---|
| GRPO + length penalty (α = 1) | {final["grpo_len"][0]:.3f} | {final["grpo_len"][1]:.0f} |
| DRPO | {final["drpo"][0]:.3f} | {final["drpo"][1]:.0f} |

![bandit curves](drpo.png)

Verdict: **{outcome}** (the decoupling property of part 1). Part 2 only illustrates the dynamics; the headline
(−77% length at −1.1% GSM8K accuracy on R1-Distill-1.5B) needs an LLM and is not tested.
""")
    verdict("drpo", sign_ok and uniform_ok, f"GRPO+len-penalty A(800-token correct)={signs['grpo_A'][3]:+.3f} < 0; "
          f"DRPO dloss/ds(correct)=({fmt(signs['drpo_grad'])}) all < 0; bandit P(correct) GRPO-len {final['grpo_len'][0]:.3f} "
          f"vs DRPO {final['drpo'][0]:.3f}, E[L|correct] {final['grpo_len'][1]:.0f} vs {final['drpo'][1]:.0f}")


if __name__ == "__main__":
    main()
