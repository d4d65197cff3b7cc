"""DUMP (arXiv 2504.09710): a UCB curriculum over mean |advantage| puts the samples where the policy can still learn,
so a learnable distribution is learned in fewer steps than with uniform sampling.

Toy bandit curriculum of shared/methods/text.md §10 (e), two environments:
- *original*: three distributions with simulated success probabilities: saturated (p = 1), impossible (p = 0) and
  learnable (p starts at 0.1 and grows by 0.002 per sampled prompt, capped at 0.95);
- *adversarial*: the same three plus a noisy, unlearnable one (p = 0.5 forever, whatever is sampled): the largest
  |advantage| of all arms and nothing to learn, where the paper's assumption "high |A| = learnable" breaks.
Each step draws 32 prompts from the curriculum, G = 8 binary rewards per prompt, GRPO advantages (the library's
``grpo``), and the library's ``DUMP`` selector observes them (window 300, c = 1, τ = 0.1); uniform sampling over
the same arms is the control. 300 steps, 10 seeds (paired: one seed per pair). The pre-registered rule is
``PREREG``. Also a unit check: the hand-computed 2-arm UCB/softmax state.

    python reproductions/dump.py          # ~30 s on 2 cores; writes reproductions/reports/dump.md and .png
    python reproductions/dump.py --smoke  # 2 seeds x 40 steps: the verdict line only, no report
"""

from __future__ import annotations

import math

from support.report import (diff_ci, fmt_ci, mean_ci, plt, preregistration, save_plot, smoke_args, table, verdict,
                            write_report)

import torch

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.sampling.curriculum import DUMP

PROMPTS, G, STEPS, SEEDS, P0, GAIN, CAP, TARGET, WARMUP, NOISY = 32, 8, 300, 10, 0.1, 0.002, 0.95, 0.9, 30, 0.5
# environment -> success probabilities of the fixed arms (the learnable arm is appended last)
ENVS = {"original": (1.0, 0.0), "adversarial (+ noisy p = 0.5 arm)": (1.0, 0.0, NOISY)}

PREREG = preregistration(
    claim="DUMP's UCB curriculum over windowed mean |advantage| learns a learnable distribution faster than "
          "uniform sampling (paper: faster convergence and higher test reward on K&K with 12 distributions, "
          "Qwen2.5-7B; numbers unverified). As a number here: steps until the learnable arm's p >= 0.9, DUMP minus "
          "uniform, paired by seed, < 0 — in the original toy and in the adversarial one with a noisy, "
          "unlearnable arm.",
    control="uniform sampling over the same arms, the same seeds, prompts per step, G and steps (the same number "
            "of sampled prompts per step in both arms)",
    not_reproduced_if="in either environment the 95% interval of the paired difference (DUMP − uniform, steps to "
                      "p >= 0.9) lies entirely above 0 (DUMP slower), or in the original toy it does not lie "
                      "entirely below 0",
    inconclusive_if="the original toy's interval lies below 0 and the adversarial one's straddles 0; "
                    "reproduced needs both intervals entirely below 0",
    seeds=f"0..{SEEDS - 1} (paired)")


def rows(adv: torch.Tensor, dist: torch.Tensor) -> RolloutBatch:
    B = adv.shape[0]
    z = torch.zeros(B, 1, dtype=torch.long)
    return RolloutBatch(prompt_ids=z, prompt_mask=z.bool(), completion_ids=z, completion_mask=~z.bool(),
                        group_ids=torch.arange(B), advantages=adv, distribution=dist.long())


def run(fixed: tuple[float, ...], curriculum: bool, seed: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the per-step share of prompts of every arm (steps, A) and the learnable arm's p at the start of each
    step (steps,); the learnable arm is the last of the A = len(fixed) + 1 arms."""
    gen = torch.Generator().manual_seed(seed)
    A = len(fixed) + 1
    dump = DUMP(num_distributions=A, window=300, c=1.0, temperature=0.1)
    p_learn, shares, ps = P0, [], []
    gid = torch.arange(PROMPTS).repeat_interleave(G)
    for _ in range(steps):
        probs = dump.probs() if curriculum else torch.full((A,), 1 / A)
        arms = torch.multinomial(probs, PROMPTS, replacement=True, generator=gen)  # (S,)
        p = torch.tensor([*fixed, p_learn])[arms].repeat_interleave(G)  # (S*G,)
        rewards = (torch.rand(PROMPTS * G, generator=gen) < p).float()  # (S*G,)
        dump(rows(grpo(rewards, gid), arms.repeat_interleave(G)))
        counts = torch.bincount(arms, minlength=A)
        shares.append(counts / PROMPTS)
        ps.append(p_learn)
        p_learn = min(CAP, p_learn + GAIN * int(counts[-1]))
    return torch.stack(shares), torch.tensor(ps)


def steps_to(ps: torch.Tensor) -> int:
    hit = (ps >= TARGET).nonzero()
    return int(hit[0]) if hit.numel() else len(ps)


def unit_check() -> tuple[bool, float]:
    d = DUMP(num_distributions=2, window=4)
    d(rows(torch.tensor([1.0, -0.2, -0.5]), torch.tensor([0, 1, 0])))
    u0, u1 = 0.75 + math.sqrt(2 * math.log(4) / 3), 0.2 + math.sqrt(2 * math.log(4) / 2)
    expected = 1 / (1 + math.exp(-(u0 - u1) / 0.1))  # 0.965756
    got = float(d.probs()[0])
    return abs(got - expected) < 1e-6, got


def decide(d: dict) -> str:
    """The pre-registered rule on the paired intervals (DUMP − uniform steps) per environment."""
    orig, adv = d["original"], d["adversarial (+ noisy p = 0.5 arm)"]
    if orig[1] > 0 or adv[1] > 0 or not orig[2] < 0:
        return "not reproduced"
    return "reproduced" if adv[2] < 0 else "inconclusive"


def main() -> None:
    args = smoke_args(__doc__, "2 seeds x 40 steps, print the verdict line, write no report")
    steps, seeds = (40, 2) if args.smoke else (STEPS, SEEDS)
    unit_ok, p0 = unit_check()
    res = {env: {name: [run(fixed, name == "DUMP", s, steps) for s in progress(range(seeds), f"dump: {env}, {name}, seeds")]
                 for name in ("DUMP", "uniform")} for env, fixed in ENVS.items()}
    reach = {env: {k: [steps_to(q) for _, q in v] for k, v in r.items()} for env, r in res.items()}
    diffs = {env: diff_ci(r["DUMP"], r["uniform"]) for env, r in reach.items()}
    share = {env: {k: [float(sh[WARMUP:, -1].mean()) for sh, _ in v] for k, v in r.items()} for env, r in res.items()}
    noisy_share = {k: [float(sh[WARMUP:, 2].mean()) for sh, _ in v] for k, v in res["adversarial (+ noisy p = 0.5 arm)"].items()}
    outcome = decide(diffs) if unit_ok else "not reproduced"
    details = ("steps to p>=0.9, DUMP − uniform (95% CI, " f"{seeds} seeds): "
               + "; ".join(f"{env} {fmt_ci(d, 1, signed=True)} (DUMP {sum(reach[env]['DUMP']) / seeds:.1f} vs uniform "
                           f"{sum(reach[env]['uniform']) / seeds:.1f})" for env, d in diffs.items())
               + f"; noisy-arm share after step {WARMUP} DUMP {sum(noisy_share['DUMP']) / seeds:.2f} vs uniform "
               f"{sum(noisy_share['uniform']) / seeds:.2f}; 2-arm P_0 = {p0:.6f} (hand 0.965756)")
    line = verdict("dump", outcome, details, echo=False)
    if args.smoke:
        print(line)
        return

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = torch.arange(steps)
    for j, env in enumerate(ENVS):
        for k, c in (("DUMP", "C0"), ("uniform", "C1")):
            p = torch.stack([q for _, q in res[env][k]]).mean(0)
            ax[j].plot(x, p, color=c, label=k)
        ax[j].axhline(TARGET, ls=":", color="gray")
        ax[j].set(xlabel="step", ylabel="p(learnable)", title=env, xlim=(0, 150))
    ax[0].legend()
    fig.tight_layout()
    save_plot(fig, "dump", dpi=110)

    trows = []
    for env in ENVS:
        for k in ("DUMP", "uniform"):
            trows.append((env, k, fmt_ci(mean_ci(share[env][k])), fmt_ci(mean_ci(reach[env][k]), 1),
                          f"{min(reach[env][k])}–{max(reach[env][k])}",
                          fmt_ci(mean_ci(noisy_share[k])) if env != "original" else "–"))
        trows.append((env, "DUMP − uniform (paired)", "", fmt_ci(diffs[env], 1, signed=True), "", ""))
    write_report("dump", f"""# DUMP — UCB curriculum over distributions (arXiv 2504.09710)

{PREREG}
## Setup

A toy bandit curriculum (shared/methods/text.md §10 (e)): a saturated arm (p = 1), an impossible arm (p = 0) and a
learnable arm (p = {P0}, +{GAIN} per sampled prompt, capped at {CAP}); the adversarial environment adds a noisy,
unlearnable arm (p = {NOISY} forever). {PROMPTS} prompts a step, G = {G} binary rewards, GRPO advantages, the
library's `DUMP` selector (window 300, c = 1, τ = 0.1), {steps} steps, {seeds} seeds. The learnable arm improves
by a fixed amount per sampled prompt (a stand-in for learning), so the comparison is about where each sampler
puts the prompts. Intervals: 95% Student-t over seeds (`support.report`).

{table(["environment", "sampler", f"learnable share after step {WARMUP}", "steps to p ≥ 0.9", "range", f"noisy-arm share after step {WARMUP}"], trows)}

Unit check: 2-arm state (|A| = 1.0, 0.5 on arm 0; 0.2 on arm 1) gives P_0 = {p0:.6f}; by hand 0.965756.

![p of the learnable arm](dump.png)

Verdict: claim **{outcome}**.

`{line}`

Reading: in the original toy the only arm with non-zero |A| is the learnable one, so any sampler that follows |A|
must win — the toy is built so. A distribution whose rewards are noisy but cannot be learned (here p = 0.5: the
largest possible group variance) draws DUMP's samples instead: the UCB score tracks |A|, not learnability, and the
learnable arm is starved. Real curricula hold such distributions (ambiguous or mislabelled problems, answers
checked by a noisy verifier). Not tested: the paper's Knights-and-Knaves runs with a 7B model;
`configs/text_reasoning/dump.yaml` runs the same curriculum on K&K + arithmetic with SmolLM2-135M, too slow for
this report on 2 cores.
""")
    print(line)


if __name__ == "__main__":
    main()
