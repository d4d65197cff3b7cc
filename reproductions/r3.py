"""R³ (arXiv 2601.19620): replaying past opposite-outcome responses into uniform groups (CCR) gives all-wrong and
all-right groups a learning signal, and the entropy ranking reward (SERR) orders truncated wrong responses.

Checks of shared/methods/text.md §17 (e), on the library's ``serr_rewards`` / ``CrossContextReplay``:
(1) SERR on 4 responses with (E_peak, E_global) = (3,1), (2,2), (1,3), (2.5,0.5): dominance counts (2,1,0,2), ranks
    (0,2,3,1), rewards R_max·(1, 1/3, 0, 2/3);
(2) CCR: an all-wrong group gets all-zero advantages without replay and non-zero ones with one replayed positive;
(3) ISR: not implemented, not tested.
Plus bandits for the ablation's direction (paper: AIME24 47.50 with CCR vs 35.62 without), trained through the
library's loop (``common.loop.Loop`` over ``common.policies.toy.TabularPolicy``, CCR as the loop's selector), GRPO vs
GRPO + CCR (k = 2; Eq. 3 with α = 1, λ = 1e-6), paired by seed:
- *fresh*: 8 one-token bandits with 20 answers, one correct, P(correct) = 0.05 at start, G = 4 (an all-wrong group
  with probability 0.81), SGD lr 1.0, 150 steps, 20 seeds; steps to mean P(correct) >= 0.5;
- *stale replay* (the adversarial case): the verifier changed. Each bandit starts at P = 0.9 on its old answer, now
  wrong, and CCR's buffer holds the previous phase's responses labelled by the old verifier (old answer = correct):
  its replayed "correct" rows are stale. 100 steps, 20 seeds; mean P(new correct) over the steps. CCR with the
  library's per-prompt memory (8 rows) and with a long memory (64 rows, reported, not counted).
The pre-registered rule is ``PREREG``.

    python reproductions/r3.py          # ~3 min on 2 cores; writes reproductions/reports/r3.md and .png
    python reproductions/r3.py --smoke  # 2 seeds x 5 steps: the verdict line only, no report
"""

from __future__ import annotations


from support.report import (diff_ci, eval_record, fmt_ci, mean_ci, plt, preregistration, save_plot, smoke_args, table,
                            verdict, write_report)

import torch

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.policies.toy import TabularPolicy
from common.rewards.entropy_rank import serr_rewards
from common.sampling.replay import CrossContextReplay

PROMPTS, K, G, STEPS, SEEDS, LR, P0, LEVEL = 8, 20, 4, 150, 20, 1.0, 0.05, 0.5
STALE_STEPS, STALE_P, MEMORY = 100, 0.9, {"CCR (memory 8)": 8, "CCR (memory 64)": 64}

PREREG = preregistration(
    claim="cross-context replay (CCR) gives uniform groups a learning signal and so speeds up learning (paper, "
          "R1-Distill-1.5B: AIME24 47.50 with CCR vs 35.62 without, Table ablation; not tested). As a number here: "
          "steps until mean P(correct) >= 0.5, GRPO + CCR minus GRPO, paired by seed, < 0 — and CCR must not "
          "hurt when its replay is stale (the verifier changed: the buffer's 'correct' responses are now wrong).",
    control="GRPO (the library's grpo) through the same loop, policy, seeds, G, steps and learning rate, without "
            "the CCR selector; in the stale setting both arms start from the same policy (P = 0.9 on the old answer)",
    not_reproduced_if="the SERR or CCR exact checks fail; or in the fresh setting the 95% interval of the paired "
                      "difference (CCR − GRPO, steps to P >= 0.5) is not entirely below 0; or in the stale setting "
                      "the interval of CCR (library memory 8) − GRPO in mean P(new correct) over the steps lies "
                      "entirely below 0 (stale replay hurts)",
    inconclusive_if="never by this rule: reproduced otherwise (fresh interval below 0 and the stale interval not "
                    "entirely below 0); the long-memory arm (64) is reported, not counted",
    seeds=f"0..{SEEDS - 1} in each setting (paired)")


def rows(prompt: torch.Tensor, answers: torch.Tensor, correct: torch.Tensor) -> RolloutBatch:
    B = answers.shape[0]
    one = torch.ones(B, 1, dtype=torch.bool)
    return RolloutBatch(prompt_ids=prompt[:, None], prompt_mask=one, completion_ids=answers[:, None], completion_mask=one,
                        group_ids=prompt.clone(), rewards=correct.double(), correct=correct, advantages=torch.zeros(B, dtype=torch.float64),
                        samples=[{"prompt": f"q{int(p)}"} for p in prompt], completions=[str(int(a)) for a in answers])


def check_serr() -> tuple[bool, list[float]]:
    peak, glob = torch.tensor([3.0, 2.0, 1.0, 2.5]), torch.tensor([1.0, 2.0, 3.0, 0.5])
    r = serr_rewards(peak, glob, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), r_max=1.0)
    return bool(torch.allclose(r, torch.tensor([1.0, 1 / 3, 0.0, 2 / 3]))), r.tolist()


def check_ccr() -> tuple[bool, list[float], list[float]]:
    q = torch.zeros(4, dtype=torch.long)
    ccr = CrossContextReplay(k=1)
    ccr(rows(torch.zeros(1, dtype=torch.long), torch.tensor([7]), torch.tensor([True])))  # history: one correct answer
    without = grpo(torch.zeros(4, dtype=torch.float64), q)
    out = ccr(rows(q, torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.bool)))
    ok = bool((without == 0).all()) and out.batch_size == 5 and bool((out.advantages != 0).all())
    return ok, without.tolist(), out.advantages.tolist()


def run(memory: int | None, seed: int, steps: int = STEPS, stale: bool = False, prefill: bool = True) -> torch.Tensor:
    """GRPO (``memory`` None) or GRPO + CCR keeping ``memory`` rows per prompt (the step-5 selector) through the
    library's loop (``common.loop.Loop``) on a ``TabularPolicy``: G samples for each prompt, on-policy clipped
    surrogate (ratio 1: gradient −mean A ∇log π over the rows, replayed rows included), one SGD step. ``stale``:
    the policy starts at P = 0.9 on an old answer that is now wrong, and CCR's buffer is filled with ``memory``
    responses per prompt from that policy, labelled by the old verifier (``prefill`` False: the buffer starts
    empty, the control that isolates the stale rows). Returns the mean P(correct) before each
    step and after the last (steps + 1,)."""
    gen = torch.Generator().manual_seed(seed)
    correct_answer = torch.randint(0, K, (PROMPTS,), generator=gen)
    old_answer = (correct_answer + torch.randint(1, K, (PROMPTS,), generator=gen)) % K  # != correct_answer
    start, p_start = (old_answer, STALE_P) if stale else (correct_answer, P0)
    logits = torch.zeros(PROMPTS, K, dtype=torch.float64)
    logits[torch.arange(PROMPTS), start] = torch.log(torch.tensor(p_start / ((1 - p_start) / (K - 1)), dtype=torch.float64))
    policy = TabularPolicy(PROMPTS, K).double()
    policy.generator = gen
    with torch.no_grad():
        policy.logits.copy_(logits)

    def score(b: RolloutBatch) -> RolloutBatch:
        correct = b.completion_ids[:, 0] == correct_answer[b.inputs["prompt"]]  # (B,)
        return b.replace(rewards=correct.double(), correct=correct)

    ccr = CrossContextReplay(k=2, alpha=1.0, lam=1e-6, per_prompt=memory) if memory is not None else None
    loop = Loop(policy, score, lambda b: grpo(b.rewards, b.group_ids), ClippedPolicyLoss(), selector=ccr, group_size=G,
                provided=("correct",))
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=LR)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=0.0)
    prompts = [{"prompt": f"q{i}", "index": i} for i in range(PROMPTS)]
    if stale and prefill and ccr is not None:  # the previous phase's responses, judged by the old verifier
        past = policy.rollout(prompts, memory)
        was_right = past.completion_ids[:, 0] == old_answer[past.inputs["prompt"]]  # (P·memory,)
        ccr.store(past.replace(rewards=was_right.double(), correct=was_right), [s["prompt"] for s in past.samples])
    acc = []
    for _ in range(steps):
        probs = torch.softmax(policy.logits.detach(), 1)
        acc.append(float(probs[torch.arange(PROMPTS), correct_answer].mean()))
        loop.update(loop.collect(prompts).kept, stepper)
    probs = torch.softmax(policy.logits.detach(), 1)
    acc.append(float(probs[torch.arange(PROMPTS), correct_answer].mean()))
    return torch.tensor(acc)


def steps_to(acc: torch.Tensor) -> int:
    hit = (acc >= LEVEL).nonzero()
    return int(hit[0]) if hit.numel() else STEPS


def main() -> None:
    args = smoke_args(__doc__, "2 seeds x 5 steps, print the verdict line, write no report")
    steps, stale_steps, seeds = (5, 5, 2) if args.smoke else (STEPS, STALE_STEPS, SEEDS)
    serr_ok, serr_vals = check_serr()
    ccr_ok, without, with_replay = check_ccr()
    fresh = {name: torch.stack([run(mem, s, steps) for s in progress(range(seeds), f"r3: fresh, {name}, seeds")])
             for name, mem in (("GRPO", None), ("GRPO + CCR", 8))}
    stale = {name: torch.stack([run(mem, s, stale_steps, stale=True) for s in progress(range(seeds), f"r3: stale, {name}, seeds")])
             for name, mem in (("GRPO", None), *MEMORY.items())}
    empty = {f"{name}, empty buffer": torch.stack([run(mem, s, stale_steps, stale=True, prefill=False)
                                                   for s in progress(range(seeds), f"r3: stale, {name} empty, seeds")])
             for name, mem in MEMORY.items()} if not args.smoke else {}  # post hoc: the stale rows' own effect
    reach = {k: [float(steps_to(a)) for a in v] for k, v in fresh.items()}
    d_fresh = diff_ci(reach["GRPO + CCR"], reach["GRPO"])
    auc = {k: v[:, :-1].mean(1).tolist() for k, v in stale.items()}  # mean P(new correct) over the steps
    final = {k: v[:, -1].tolist() for k, v in stale.items()}
    d_stale = {k: diff_ci(auc[k], auc["GRPO"]) for k in MEMORY}
    outcome = ("not reproduced" if not (serr_ok and ccr_ok) or d_fresh[2] >= 0 or d_stale["CCR (memory 8)"][2] < 0
               else "reproduced")
    avg = lambda x: sum(x) / len(x)  # noqa: E731
    details = (f"SERR rewards {[round(v, 4) for v in serr_vals]} (expected [1, 0.3333, 0, 0.6667]); all-wrong group "
               f"advantages {without[0]:.1f} without replay, non-zero with one replayed positive: {ccr_ok}; fresh: steps to "
               f"P(correct) >= {LEVEL} GRPO {avg(reach['GRPO']):.1f} vs CCR {avg(reach['GRPO + CCR']):.1f}, CCR − GRPO "
               f"{fmt_ci(d_fresh, 1, signed=True)}; stale replay: mean P(new correct) over {stale_steps} steps GRPO "
               f"{avg(auc['GRPO']):.3f}, " + ", ".join(f"{k} {avg(auc[k]):.3f} (− GRPO {fmt_ci(d, signed=True)})"
                                                      for k, d in d_stale.items())
               + f" ({seeds} seeds, 95% CI); ISR not tested")
    line = verdict("r3", outcome, details, echo=False)
    if args.smoke:
        print(line)
        return

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    for k, c in (("GRPO", "C1"), ("GRPO + CCR", "C0")):
        ax[0].plot(torch.arange(steps + 1), fresh[k].mean(0), color=c, label=k)
    ax[0].axhline(LEVEL, ls=":", color="gray")
    ax[0].set(xlabel="step", ylabel="mean P(correct)", title=f"fresh: P0 = {P0}, G = {G}")
    ax[0].legend()
    for k, c in (("GRPO", "C1"), ("CCR (memory 8)", "C0"), ("CCR (memory 64)", "C2")):
        ax[1].plot(torch.arange(stale_steps + 1), stale[k].mean(0), color=c, label=k)
    ax[1].set(xlabel="step", ylabel="mean P(new correct)", title="stale replay: verifier changed, old answer at P = 0.9")
    ax[1].legend()
    ax[2].bar(["(3,1)", "(2,2)", "(1,3)", "(2.5,0.5)"], serr_vals, color="C0")
    ax[2].set(xlabel="(E_peak, E_global)", ylabel="SERR reward / R_max", title="SERR on the spec's 4 responses")
    fig.tight_layout()
    save_plot(fig, "r3", dpi=110)

    frows = [(k, fmt_ci(mean_ci(reach[k]), 1), fmt_ci(mean_ci(fresh[k][:, -1].tolist()))) for k in fresh]
    frows.append(("CCR − GRPO (paired)", fmt_ci(d_fresh, 1, signed=True),
                  fmt_ci(diff_ci(fresh["GRPO + CCR"][:, -1].tolist(), fresh["GRPO"][:, -1].tolist()), signed=True)))
    auc_e = {k: v[:, :-1].mean(1).tolist() for k, v in empty.items()}
    srows = [(k, fmt_ci(mean_ci(auc[k])), fmt_ci(mean_ci(final[k])), fmt_ci(d_stale[k], signed=True) if k in d_stale else "–",
              fmt_ci(diff_ci(auc[k], auc_e[f"{k}, empty buffer"]), signed=True) if k in d_stale else "–") for k in stale]
    srows += [(f"{k} (post hoc)", fmt_ci(mean_ci(auc_e[k])), fmt_ci(mean_ci(v[:, -1].tolist())),
               fmt_ci(diff_ci(auc_e[k], auc["GRPO"]), signed=True), "–") for k, v in empty.items()]
    record = eval_record(task=f"{PROMPTS} one-token bandits, {K} answers, one correct each", prompt_template="none (prompt index)",
                         answer_extraction="the sampled answer index equals the prompt's correct one",
                         eos_rule="one token", sampling="none: P(correct) = softmax(logits)[correct], exact, mean over prompts",
                         split=f"the {PROMPTS} training prompts; answers drawn per seed", seeds=list(range(seeds)))
    write_report("r3", f"""# R³ — Replay, Reflection and Ranking Rewards (arXiv 2601.19620)

Claim (paper): cross-context replay (CCR), in-context self-reflection (ISR) and the structural entropy ranking reward
(SERR) each help; R³-1.5B averages 60.59 pass@1 over five math sets, and removing CCR drops AIME24 from 47.50 to
35.62 (SERR: 36.88, ISR: 41.25). Checks of shared/methods/text.md §17 (e) on the library's code, and bandits for the
direction of the CCR ablation, with stale replay as the adversarial case.

{PREREG}
## Exact checks

| check | result | expected | pass |
|---|---|---|---|
| (1) SERR rewards / R_max for (3,1), (2,2), (1,3), (2.5,0.5) | {', '.join(f'{v:.4f}' for v in serr_vals)} | 1, 1/3, 0, 2/3 | {serr_ok} |
| (2) all-wrong group of 4: advantages without replay | {', '.join(f'{v:.1f}' for v in without)} | all 0 | {ccr_ok} |
| (2) same group + 1 replayed positive (Eq. 3, α = 1) | {', '.join(f'{v:.3f}' for v in with_replay)} | all non-zero | {ccr_ok} |
| (3) ISR | not implemented | – | not tested |

## Fresh replay

{PROMPTS} one-token bandits, {K} answers, one correct, P(correct) = {P0} at start, G = {G} (all wrong with
probability {(1 - P0) ** G:.2f}), policy gradient through the library's loop (`common.loop.Loop`, a tabular
`common.policies.toy.TabularPolicy`, CCR as its selector, `ClippedPolicyLoss` on-policy), SGD lr {LR}, {steps} steps,
{seeds} seeds; CCR with k = 2 injects the two most recent past responses of the opposite outcome into each uniform
group. Intervals: 95% Student-t over seeds.

{table(["arm", f"steps to mean P(correct) ≥ {LEVEL}", f"P(correct) after {steps} steps"], frows)}

## Stale replay (adversarial)

The verifier changed: each bandit starts at P = {STALE_P} on its old answer, which is now wrong (the new correct answer
starts at P = {(1 - STALE_P) / (K - 1):.4f}). CCR's buffer starts with the previous phase's responses (memory rows per
prompt sampled from the starting policy), labelled by the old verifier, so the "correct" responses it replays into
all-wrong groups are the old answer. As new responses arrive they push the stale rows out (memory 8: after two steps;
memory 64: after sixteen). {stale_steps} steps, {seeds} seeds.

{table(["arm", f"mean P(new correct) over {stale_steps} steps", f"P(new correct) after {stale_steps} steps", "− GRPO (paired, mean over steps)",
        "stale − empty buffer, same memory (post hoc)"], srows)}

The "empty buffer" arms (added after the first run, not part of the rule) run the same CCR from the same starting
policy with no stale rows, so "stale − empty buffer" is the effect of the stale rows themselves; "− GRPO" mixes it
with what a longer memory does for fresh successes.

![bandits and SERR](r3.png)

Verdict: claim **{outcome}**.

`{line}`

{record}
What was tested: SERR's dominance ranking and CCR's replay with Eq. 3 exactly as the library runs them; that replay
speeds up learning when most groups are all wrong; and what stale replay does. Reading (written after the run): a
stale "correct" row of the old answer, replayed into an all-wrong group whose fresh rows are mostly that same answer,
gets a positive advantage while its fresh copies get negative ones, so on that answer they largely cancel; once any
fresh response finds the new answer it is the most recent correct row and replaces the stale ones in the replay.
With the library's memory (8 rows per prompt) the stale rows leave after two steps and CCR stays slightly ahead of
GRPO. With a long memory (64) CCR is far ahead, because a rare fresh success stays in the buffer for sixteen steps
and is replayed at every one; the empty-buffer column separates that from the stale rows' own effect: none with
memory 8 (they leave before a success arrives), and with memory 64 they cost −0.021 [−0.038, −0.005] of mean
P(new correct) against the same CCR started empty (about a sixth of its gain over GRPO) — stale replay does harm,
in proportion to how long the buffer keeps it, but not enough here to fall behind GRPO, which gets no signal at all
from the all-wrong groups.
Not tested: ISR (not implemented), the length bonus, the paper's math benchmarks; k, α,
λ, p, R_max are not in the sections of the paper we could read (proposals). In the bandit a replayed row's
probability is recomputed exactly; with a language model replayed rows are off-policy (their old log-probs are
recomputed under the current policy, our reading), which this bandit cannot show.
""")
    print(line)


if __name__ == "__main__":
    main()
