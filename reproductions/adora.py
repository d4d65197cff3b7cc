"""ADORA (arXiv 2602.10019; authors' code ShadeCloak/ADORA): does attenuating "temporarily disadvantageous" groups
(longest correct answer not longer than the mean wrong one) make GRPO learn more accurate (longer) reasoning?

Outcome experiment (the verdict; issue 17): paper (Logic-RL K&K) AMC 40 vs 35 (+5 points) over GRPO. Here
``support.outcome.LengthTable``: 4 prompts, a plan token picks a reasoning length L = 8 ... 80 tokens (then filler
tokens), the answer is right with probability q = 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1, 1, 1, 1 (longer reasoning
helps: the paper's premise). Arms at the same samples (4 prompts x G = 8 a step, 100 steps, Adam lr 0.05, 8
seeds), through the library's loop: GRPO (control) and ADORA around GRPO (λ = 0.1). Metric: mean exact accuracy
Σ_a π(a) q_a over the 100 steps (a fixed budget; both arms approach 1 at the end). Adversarial case (reported, not
judged): q reversed (short reasoning is better), where ADORA's premise is false. The pre-registration (``PREREG``)
is below, before any result.

Component checks (not the verdict; they hold by construction of the rule), shared/methods/text.md §15 (e): (1) the rule on hand groups: correct (50, 80) vs wrong (100, 120) -> 0.1;
correct (150) vs wrong (100, 120) -> 1; a truncated wrong answer is ignored. (2) The property, exact for 0/1
rewards: for every group the length-weighted advantage Σ_i L_i A_i under ADORA (the library's ADORA around GRPO)
is >= GRPO's, on 10^4 random groups (G in 2..16, lengths 1..4096, some truncated). Reported: the fraction of groups
where it holds, the fraction attenuated, and the mean length-weighted advantage per group. The paper's benchmark
results (AMC 40 vs 35 on Logic-RL) need an LLM.

    python reproductions/adora.py           # ~1 min of CPU; writes reproductions/reports/adora.md, .json
    python reproductions/adora.py --smoke   # seconds: 2 seeds x 3 steps, the verdict line, no report
"""

from __future__ import annotations


from support.report import (diff_ci, fmt_ci, plt, preregistration,  # root, Agg
                            save_plot, smoke_args, verdict, write_report)
from support.outcome import LengthTable, arms_table, auc, decide, length_prompts, save_json, train

import torch

from common.advantages.adora import ADORA, adora_weights
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss

GROUPS, MAX_LEN = 10_000, 4096
LENGTHS, Q = [8 * (a + 1) for a in range(10)], [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0, 1.0, 1.0, 1.0]
Q_GENTLE = [0.5 + 0.05 * a for a in range(10)]  # 0.5 ... 0.95: length helps, but short answers are often right too
CASES = {"gentle (primary, second registration)": Q_GENTLE, "steep (first registration; the rule never fired)": Q,
         "reversed gentle (adversarial)": Q_GENTLE[::-1]}
PROMPTS, G, OUT_STEPS, OUT_SEEDS, LR, MARGIN = 4, 8, 100, 8, 0.05, 0.01

PREREG = preregistration(
    claim="ADORA beats GRPO: AMC 40 vs 35 (+5 points, Logic-RL). Here: mean exact accuracy over 100 steps, "
          "ADORA − GRPO > 0, on a task where longer reasoning is more accurate.",
    control=f"GRPO on the same task, seeds, samples ({PROMPTS} prompts x G = {G} a step), loss (`ClippedPolicyLoss`), "
            f"optimiser (Adam lr {LR}) and steps ({OUT_STEPS}).",
    seeds=f"{OUT_SEEDS} seeds (0..{OUT_SEEDS - 1}), paired 95% t interval of the difference",
    not_reproduced_if=f"the interval's upper end is below +{MARGIN} (a gain of one accuracy point or more is excluded)",
    inconclusive_if="the upper end is at least +0.01 and the lower end at most 0. The reversed-q case is adversarial, "
                    "reported with its interval and not judged")

# Written after the first run (q steep: 0.2 ... 1 by 56 tokens) showed that ADORA's rule never fired there (0 of 1344
# informative rows attenuated in seed 0; the arms were identical), and before the run below:
PREREG2 = preregistration(
    claim="as above, on a task where ADORA's rule can fire: q = 0.5, 0.55, ..., 0.95 (longer reasoning helps, but "
          "short answers are often right, so groups whose correct answers are shorter than the wrong ones occur).",
    control="as above (GRPO, same seeds, samples, loss, optimiser, 100 steps); the share of informative rows ADORA "
            "attenuates is reported, so that a comparison in which the rule never fires is seen as vacuous.",
    seeds=f"{OUT_SEEDS} seeds (0..{OUT_SEEDS - 1}), paired 95% t interval of the difference",
    not_reproduced_if=f"the interval's upper end is below +{MARGIN}, with the rule attenuating >= 5% of informative rows",
    inconclusive_if="the upper end is at least +0.01 and the lower end at most 0, or the rule attenuates < 5% of the "
                    "informative rows (vacuous). The steep-q case is reported (vacuous) and the reversed case is "
                    "adversarial; neither is judged")


class Counting:
    """Wraps an estimator and counts the informative rows (GRPO A != 0) and those ADORA changed."""

    def __init__(self, inner):
        self.inner, self.min_group_size, self.rows, self.changed = inner, inner.min_group_size, 0, 0

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        a, g = self.inner(batch), GRPO()(batch)  # (B,) each
        self.rows += int((g != 0).sum())
        self.changed += int(((a != g) & (g != 0)).sum())
        return a


def outcome_run(arm: str, seed: int, steps: int, q: list[float]) -> tuple[float, float]:
    """One arm, one seed: (mean exact accuracy over the steps, share of informative rows ADORA attenuated) of
    ``LengthTable`` trained through the library's loop."""
    policy = LengthTable(PROMPTS, LENGTHS, q, generator=torch.Generator().manual_seed(seed))
    adv = Counting(ADORA(lam=0.1) if arm == "ADORA" else GRPO())
    loop = Loop(policy, policy.score, adv, ClippedPolicyLoss(), group_size=G, provided=("correct",))
    params = policy.trainable_parameters()
    acc = auc(train(loop, Stepper(torch.optim.Adam(params, lr=LR), params, max_grad_norm=0.0),
                    lambda s: length_prompts(PROMPTS), steps, {"acc": policy.accuracy})["acc"])
    return acc, adv.changed / max(adv.rows, 1)


def outcome(seeds: int, steps: int, save: bool) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    res = {case: {"GRPO": [], "ADORA": []} for case in CASES}
    fired: dict[str, list[float]] = {case: [] for case in CASES}
    for s in range(seeds):
        for case, arms in res.items():
            for arm in arms:
                acc, share = outcome_run(arm, s, steps, CASES[case])
                arms[arm].append(acc)
                if arm == "ADORA":
                    fired[case].append(share)
        if save:
            save_json("adora", {"metric": "mean exact accuracy over the steps", "steps": steps, **res,
                                "attenuated_share_of_informative_rows": fired})
    return res, fired


def batch_of(rewards: torch.Tensor, lengths: torch.Tensor, group_ids: torch.Tensor, truncated: torch.Tensor) -> RolloutBatch:
    B = len(rewards)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]  # (B, T)
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, MAX_LEN, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, rewards=rewards, truncated=truncated)


def main() -> None:
    args = smoke_args(__doc__, "2 seeds x 3 steps, print the verdict line, write no report")
    global GROUPS
    if args.smoke:
        GROUPS = 300  # the component checks' random groups
    res, fired = outcome(2 if args.smoke else OUT_SEEDS, 3 if args.smoke else OUT_STEPS, save=not args.smoke)
    PRIMARY, STEEP, REV = CASES
    d = diff_ci(res[PRIMARY]["ADORA"], res[PRIMARY]["GRPO"])
    d_steep = diff_ci(res[STEEP]["ADORA"], res[STEEP]["GRPO"])
    d_rev = diff_ci(res[REV]["ADORA"], res[REV]["GRPO"])
    avg = lambda v: sum(v) / len(v)  # noqa: E731
    word = decide(d, MARGIN) if avg(fired[PRIMARY]) >= 0.05 else "inconclusive"
    head = (f"mean accuracy over {OUT_STEPS if not args.smoke else 3} steps ADORA − GRPO {fmt_ci(d, signed=True)} over "
            f"{len(res[PRIMARY]['GRPO'])} seeds, gentle q (GRPO {avg(res[PRIMARY]['GRPO']):.3f}, ADORA "
            f"{avg(res[PRIMARY]['ADORA']):.3f}; rule fired on {avg(fired[PRIMARY]):.0%} of informative rows); steep q "
            f"{fmt_ci(d_steep, signed=True)} (fired {avg(fired[STEEP]):.0%}); reversed q (adversarial) {fmt_ci(d_rev, signed=True)}")
    c = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    L = torch.tensor([50, 80, 100, 120, 150, 100, 120, 10, 5, 999])
    trunc = torch.tensor([0] * 9 + [1], dtype=torch.bool)
    w = adora_weights(c, L, torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), truncated=trunc)
    hand_ok = w.tolist() == [w[0].item()] * 4 + [1.0] * 6 and abs(w[0].item() - 0.1) < 1e-7

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 17, (GROUPS,), generator=gen)
    g = torch.repeat_interleave(torch.arange(GROUPS), sizes)  # (B,)
    p = torch.rand(GROUPS, generator=gen)[g]  # per-group accuracy
    r = (torch.rand(len(g), generator=gen) < p).float()
    lengths = torch.randint(1, MAX_LEN + 1, (len(g),), generator=gen)
    truncated = lengths > MAX_LEN - 40  # as the code's L_trunc = max length − ~40
    batch = batch_of(r, lengths, g, truncated)
    base, adora = GRPO()(batch), ADORA()(batch)
    lw = lambda a: torch.zeros(GROUPS, dtype=torch.float64).index_add_(0, g, (lengths * a).double())  # noqa: E731
    lw_base, lw_adora = lw(base), lw(adora)
    holds = (lw_adora >= lw_base - 1e-3).double().mean().item()
    informative = (torch.zeros(GROUPS).index_add_(0, g, base.abs()) > 0)
    attenuated = (torch.zeros(GROUPS).index_add_(0, g, (adora != base).float()) > 0)
    reproduced = hand_ok and holds == 1.0  # the component checks
    if args.smoke:
        verdict("adora", word, f"{head}; component checks {'pass' if reproduced else 'FAIL'}")
        return

    fig, ax = plt.subplots(figsize=(5, 4))
    m = informative
    ax.scatter(lw_base[m].numpy(), lw_adora[m].numpy(), s=2, alpha=0.4)
    lim = float(lw_base[m].abs().max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlabel("Σ L·A per group, GRPO")
    ax.set_ylabel("Σ L·A per group, ADORA (λ = 0.1)")
    fig.tight_layout()
    save_plot(fig, "adora")
    line = verdict("adora", word, f"{head}; component checks {'pass' if reproduced else 'FAIL'} (Σ L·A(ADORA) >= "
                   f"Σ L·A(GRPO) in {holds:.4f} of {GROUPS} groups)", echo=False)
    write_report("adora", f"""# ADORA (arXiv 2602.10019): attenuating temporarily disadvantageous groups vs GRPO

{PREREG}
{PREREG2}
## Outcome (the verdict)

Task `support.outcome.LengthTable`: {PROMPTS} prompts; a plan token picks L = 8, 16, …, 80 tokens, then L − 1 filler
tokens; the answer is right with probability q = {", ".join(f"{x:g}" for x in Q_GENTLE)} (primary, second registration),
{", ".join(f"{x:g}" for x in Q)} (the first registration) or the gentle q reversed (adversarial). {PROMPTS} prompts x G = {G} a step, {OUT_STEPS} steps, Adam lr {LR}, `ClippedPolicyLoss`, through
`common.loop.Loop`; ADORA = the library's `ADORA` around GRPO (λ = 0.1, the authors' length rule). Metric: exact
accuracy Σ_a π(a) q_a averaged over the {OUT_STEPS} steps (learning speed at a fixed budget).

Gentle q (the verdict; ADORA attenuated {avg(fired[PRIMARY]):.1%} of the informative rows):

{arms_table(res[PRIMARY], "GRPO")}

Steep q (the first registration; attenuated {avg(fired[STEEP]):.1%}: a vacuous comparison, reported, not judged):

{arms_table(res[STEEP], "GRPO")}

Gentle q reversed (short reasoning better; adversarial, not judged; attenuated {avg(fired[REV]):.1%}):

{arms_table(res[REV], "GRPO")}

Verdict: `{line}`

Reading: ADORA only re-weights groups whose correct answers are not longer than the wrong ones. Where accuracy rises
steeply with length such groups never occurred, and the first registration compared two identical runs; the
gentle case is where the rule acts while its premise (longer is better) still holds. Where short answers are
better it down-weights exactly the informative groups. The paper's Difficulty-Advantage criterion and amplification are
not implemented; its K&K / MathVista numbers need an LLM.

## Component checks (not the verdict: they hold by construction of the rule)

Setup: {GROUPS:,} random groups (G = 2..16, per-group accuracy ~ U(0, 1), 0/1 rewards, lengths ~ U(1, {MAX_LEN}),
wrong answers longer than {MAX_LEN - 40} treated as truncated), GRPO advantages re-weighted by `ADORA` (λ = 0.1).

| check | result |
|---|---|
| hand groups: (50, 80) vs (100, 120) -> 0.1; (150) vs (100, 120) -> 1; truncated wrong ignored | {hand_ok} |
| groups with Σ L·A (ADORA) >= Σ L·A (GRPO) | {holds:.4f} |
| informative groups (some A != 0) | {informative.double().mean().item():.3f} |
| groups attenuated (TDS, weight 0.1) | {attenuated.double().mean().item():.3f} |
| mean Σ L·A per group, GRPO | {lw_base.mean().item():+.1f} |
| mean Σ L·A per group, ADORA | {lw_adora.mean().item():+.1f} |

![length-weighted advantage](adora.png)
""")
    print(line)


if __name__ == "__main__":
    main()
