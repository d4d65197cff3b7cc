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

import argparse

from support.report import diff_ci, fmt_ci, plt, preregistration, save_plot, verdict, write_report  # root, Agg
from support.outcome import LengthTable, arms_table, auc, decide, length_prompts, save_json, train

import torch

from common.advantages.adora import ADORA, adora_weights
from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss

GROUPS, MAX_LEN = 10_000, 4096
LENGTHS, Q = [8 * (a + 1) for a in range(10)], [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0, 1.0, 1.0, 1.0]
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


def outcome_run(arm: str, seed: int, steps: int, q: list[float]) -> float:
    """One arm, one seed: mean exact accuracy over the steps of ``LengthTable`` trained through the library's loop."""
    policy = LengthTable(PROMPTS, LENGTHS, q, generator=torch.Generator().manual_seed(seed))
    adv = ADORA(lam=0.1) if arm == "ADORA" else GRPO()
    loop = Loop(policy, policy.score, adv, ClippedPolicyLoss(), group_size=G, provided=("correct",))
    params = policy.trainable_parameters()
    return auc(train(loop, Stepper(torch.optim.Adam(params, lr=LR), params, max_grad_norm=0.0),
                     lambda s: length_prompts(PROMPTS), steps, {"acc": policy.accuracy})["acc"])


def outcome(seeds: int, steps: int, save: bool) -> dict[str, dict[str, list[float]]]:
    res = {case: {"GRPO": [], "ADORA": []} for case in ("length helps", "reversed (adversarial)")}
    for s in range(seeds):
        for case, arms in res.items():
            for arm in arms:
                arms[arm].append(outcome_run(arm, s, steps, Q if case == "length helps" else Q[::-1]))
        if save:
            save_json("adora", {"metric": "mean exact accuracy over the steps", "steps": steps, **res})
    return res


def batch_of(rewards: torch.Tensor, lengths: torch.Tensor, group_ids: torch.Tensor, truncated: torch.Tensor) -> RolloutBatch:
    B = len(rewards)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]  # (B, T)
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, MAX_LEN, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, rewards=rewards, truncated=truncated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 seeds x 3 steps, print the verdict line, write no report")
    args = ap.parse_args()
    torch.set_num_threads(1)
    global GROUPS
    if args.smoke:
        GROUPS = 300  # the component checks' random groups
    res = outcome(2 if args.smoke else OUT_SEEDS, 3 if args.smoke else OUT_STEPS, save=not args.smoke)
    d = diff_ci(res["length helps"]["ADORA"], res["length helps"]["GRPO"])
    d_rev = diff_ci(res["reversed (adversarial)"]["ADORA"], res["reversed (adversarial)"]["GRPO"])
    word = decide(d, MARGIN)
    m = lambda v: sum(v) / len(v)  # noqa: E731
    head = (f"mean accuracy over {OUT_STEPS if not args.smoke else 3} steps ADORA − GRPO {fmt_ci(d, signed=True)} over "
            f"{len(res['length helps']['GRPO'])} seeds (GRPO {m(res['length helps']['GRPO']):.3f}, ADORA "
            f"{m(res['length helps']['ADORA']):.3f}); reversed q (adversarial) {fmt_ci(d_rev, signed=True)}")
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
## Outcome (the verdict)

Task `support.outcome.LengthTable`: {PROMPTS} prompts; a plan token picks L = 8, 16, …, 80 tokens, then L − 1 filler
tokens; the answer is right with probability q = {", ".join(f"{x:g}" for x in Q)} (reversed in the adversarial
case). {PROMPTS} prompts x G = {G} a step, {OUT_STEPS} steps, Adam lr {LR}, `ClippedPolicyLoss`, through
`common.loop.Loop`; ADORA = the library's `ADORA` around GRPO (λ = 0.1, the authors' length rule). Metric: exact
accuracy Σ_a π(a) q_a averaged over the {OUT_STEPS} steps (learning speed at a fixed budget).

Length helps (the paper's premise):

{arms_table(res["length helps"], "GRPO")}

Reversed q (short reasoning better; adversarial, not judged):

{arms_table(res["reversed (adversarial)"], "GRPO")}

Verdict: `{line}`

Reading: ADORA only re-weights groups whose correct answers are not longer than the wrong ones, so where length
helps those groups are rare and the rule changes little; where short answers are better it slows learning by
down-weighting exactly the informative groups. The paper's Difficulty-Advantage criterion and amplification are
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
