"""NGRPO (arXiv 2509.18851): a virtual maximum-reward sample in each group's statistics turns all-wrong groups
(zero advantage under GRPO) into a learning signal, so a policy that rarely answers correctly moves probability
off wrong answers sooner.

Part 1 (shared/methods/text.md §5 (e)): exact values for G = 8 (one correct: GRPO +2.475/−0.354, NGRPO
+1.764/−0.504 as in the paper's case study; all wrong −1/3; all right 0) and the property NGRPO <= GRPO for every
binary group with G <= 16, exhaustively over the number of correct answers.
Part 2, a softmax bandit where all-wrong groups are common: 10 answers, one correct, P(correct) = 0.02 at start,
G = 4 (P(all wrong) = 0.92), 4 groups a step, plain policy gradient (on-policy, one step per batch, so clipping
does not act), SGD lr 0.5 on the logits, 40 seeds. Reported: steps until P(correct) >= 0.5 and P(correct) after
40 steps, GRPO vs NGRPO (the library's grpo / ngrpo). Claim reproduced when part 1 holds and NGRPO reaches 0.5
in fewer steps on average, by more than two standard errors of the difference.

    python reproductions/ngrpo.py       # ~2 min on 2 cores; writes reproductions/reports/ngrpo.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import math  # noqa: E402

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo, ngrpo  # noqa: E402
from common.loop import Loop, Stepper  # noqa: E402
from common.losses.ppo_clip import ClippedPolicyLoss  # noqa: E402
from common.policies.toy import CategoricalPolicy  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
K, G, GROUPS, STEPS, SEEDS, LR, P0 = 10, 4, 4, 200, 40, 0.5, 0.02


def exact_values() -> tuple[bool, dict]:
    g8 = torch.zeros(8, dtype=torch.long)
    one = torch.tensor([1.0] + [0.0] * 7, dtype=torch.float64)
    vals = {"grpo": grpo(one, g8)[[0, 1]].tolist(), "ngrpo": ngrpo(one, g8)[[0, 1]].tolist(),
            "all_wrong": ngrpo(torch.zeros(8, dtype=torch.float64), g8)[0].item(),
            "all_right": ngrpo(torch.ones(8, dtype=torch.float64), g8).abs().max().item()}
    ok = (abs(vals["grpo"][0] - 2.475) < 1e-3 and abs(vals["grpo"][1] + 0.354) < 1e-3 and abs(vals["ngrpo"][0] - 1.764) < 1e-3
          and abs(vals["ngrpo"][1] + 0.504) < 1e-3 and abs(vals["all_wrong"] + 1 / 3) < 1e-6 and vals["all_right"] == 0.0)
    cases = 0
    for n in range(2, 17):
        for k in range(n + 1):
            r = torch.tensor([1.0] * k + [0.0] * (n - k), dtype=torch.float64)
            gid = torch.zeros(n, dtype=torch.long)
            ok &= bool((ngrpo(r, gid) <= grpo(r, gid) + 1e-12).all())
            cases += 1
    vals["property_cases"] = cases
    return ok, vals


def train(estimator, seed: int) -> torch.Tensor:
    """The library's loop (``common.loop.Loop``) on a context-free ``CategoricalPolicy`` (free logits): G samples
    for each of GROUPS prompts, the estimator's advantages, the clipped surrogate (ratio 1 on-policy, so the
    gradient is −A ∇log π averaged over rows), one SGD step. Returns P(correct) before each step (STEPS,)."""
    torch.manual_seed(seed)
    policy = CategoricalPolicy(context_dim=0, num_actions=K).double()
    with torch.no_grad():
        policy.net.logits.zero_()
        policy.net.logits[0] = math.log(P0 / ((1 - P0) / (K - 1)))  # answer 0 is correct, P = P0
    score = lambda b: b.replace(rewards=(b.completion_ids[:, 0] == 0).double())  # noqa: E731
    loop = Loop(policy, score, lambda b: estimator(b.rewards, b.group_ids), ClippedPolicyLoss(), group_size=G)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=LR)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=0.0)
    prompts = [{"context": []}] * GROUPS
    history = []
    for _ in range(STEPS):
        history.append(float(torch.softmax(policy.net.logits.detach(), 0)[0]))
        loop.update(loop.collect(prompts).kept, stepper)
    return torch.tensor(history)


def main() -> None:
    torch.set_num_threads(1)  # (16, 10) tensors: threads only add overhead
    REPORTS.mkdir(exist_ok=True)
    ok, vals = exact_values()
    curves = {name: torch.stack([train(fn, s) for s in progress(range(SEEDS), f"ngrpo: {name}, seeds")]) for name, fn in (("GRPO", grpo), ("NGRPO", ngrpo))}
    reached = {n: (c < 0.5).sum(1).double() for n, c in curves.items()}  # (SEEDS,) STEPS if never
    steps_to_half = {n: v.mean().item() for n, v in reached.items()}
    sem = {n: (v.std() / SEEDS**0.5).item() for n, v in reached.items()}
    at40 = {n: c[:, 40].mean().item() for n, c in curves.items()}
    margin = 2 * (sem["GRPO"] ** 2 + sem["NGRPO"] ** 2) ** 0.5  # two standard errors of the difference
    faster = steps_to_half["GRPO"] - steps_to_half["NGRPO"] > margin
    reproduced = ok and faster
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n, c in curves.items():
        ax.plot(c.mean(0).numpy(), label=f"{n} (mean of {SEEDS} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("P(correct answer)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPORTS / "ngrpo.png", dpi=100)
    verdict = "reproduced" if reproduced else "not reproduced"
    (REPORTS / "ngrpo.md").write_text(f"""# NGRPO (arXiv 2509.18851): negative signal from all-wrong groups

## Part 1: exact values and the <= property
G = 8, one correct: GRPO ({vals['grpo'][0]:+.3f}, {vals['grpo'][1]:+.3f}); NGRPO ({vals['ngrpo'][0]:+.3f}, {vals['ngrpo'][1]:+.3f})
(paper: 2.47 -> 1.76, −0.35 -> −0.50). All wrong: {vals['all_wrong']:+.4f} (−1/3). All right: {vals['all_right']}.
NGRPO <= GRPO in all {vals['property_cases']} binary groups with 2 <= G <= 16: {ok}.

## Part 2: softmax bandit with mostly all-wrong groups
{K} answers, one correct, P(correct) = {P0} at start; G = {G} ({GROUPS} groups a step, P(all wrong) = {(1 - P0) ** G:.2f}
at start); on-policy policy gradient through the library's loop (`common.loop.Loop`, a context-free
`CategoricalPolicy`, `ClippedPolicyLoss`), SGD lr {LR} on the logits; {SEEDS} seeds, {STEPS} steps.

| estimator | mean steps to P(correct) >= 0.5 | P(correct) at step 40 |
|---|---|---|
| GRPO | {steps_to_half['GRPO']:.1f} ± {sem['GRPO']:.1f} (s.e.) | {at40['GRPO']:.3f} |
| NGRPO | {steps_to_half['NGRPO']:.1f} ± {sem['NGRPO']:.1f} (s.e.) | {at40['NGRPO']:.3f} |

![P(correct)](ngrpo.png)

NGRPO faster by more than 2 s.e. ({margin:.1f} steps): {faster}.

Verdict: claim **{verdict}**. Part 2 tests the mechanism (learning from all-wrong groups), not the paper's
MATH500/AMC23/AIME2025 results.
""")
    print(f"ngrpo: claim {verdict}: G=8 one-correct NGRPO {vals['ngrpo'][0]:+.3f}/{vals['ngrpo'][1]:+.3f}, all-wrong "
          f"{vals['all_wrong']:+.3f}, <= GRPO in {vals['property_cases']} groups: {ok}; bandit steps to P(correct)>=0.5 "
          f"GRPO {steps_to_half['GRPO']:.1f}±{sem['GRPO']:.1f} vs NGRPO {steps_to_half['NGRPO']:.1f}±{sem['NGRPO']:.1f}")


if __name__ == "__main__":
    main()
