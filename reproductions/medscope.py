"""MedScope / GA-GRPO (arXiv 2602.13332) at CPU scale: grounding reward and evidence-weighted advantages on
synthetic long "videos" of frame features (shared/methods/domains.md §5 (e)).

Arms (every arm of a seed starts from the same SFT checkpoint, trains the same steps on the same prompts in the same
order with G samples each: matched samples), through the library's Loop (common/loop.py):

    nogr    GRPO, reward 0.5·accuracy + 0.2·format (no grounding reward)
    full    GRPO, reward 0.5·accuracy + 0.3·grounding + 0.2·format
    ga      GA-GRPO (multimodal.medscope.advantage.GAGRPO, multiplicative), the full reward

Policy: the 3-layer, d = 96 causal transformer over frame features and action tokens (multimodal/medscope/toy.py),
SFT warm start on expert tool trajectories with jittered crop windows (mean tIoU ≈ 0.4). Evaluation: greedy
episodes on one fixed held-out set of questions: answer accuracy, window mIoU (best tool window per episode) and
R@0.5.

    python reproductions/medscope.py                      # 3 seeds x 3 arms, report + verdict
    python reproductions/medscope.py --smoke              # 1 seed, nogr and ga, a few steps (CI-sized; no verdict)
    python reproductions/medscope.py --seeds 1 --no-report   # one seed (run seeds in parallel), then --report-only

Per-run results are appended to ``reproductions/reports/medscope_runs.jsonl`` as each arm finishes (a rerun skips
runs already there with the same settings); the report keeps the pre-registration block verbatim above the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from support.report import REPORTS, diff_ci, eval_record, fmt_ci, plt, preregistration, save_plot, split_hash, table, verdict

import torch  # noqa: E402  (after support.report: the repository root on sys.path)

from common.advantages.group import GRPO  # noqa: E402
from common.loop import Loop, Stepper  # noqa: E402
from common.losses.ppo_clip import ClippedPolicyLoss  # noqa: E402
from multimodal.medscope import toy  # noqa: E402
from multimodal.medscope.advantage import GAGRPO  # noqa: E402
from multimodal.medscope.env import MedScopeStats  # noqa: E402

NAME = "medscope"
MARKER = "<!-- results below: written by reproductions/medscope.py; everything above is the pre-registration, kept verbatim -->"
ARMS = ("nogr", "full", "ga")
SEEDS = (0, 1, 2)
EVAL_SEED, TRAIN_SEED = 99, 0

PREREGISTRATION = preregistration(
    claim=("GA-GRPO (full reward 0.5·acc + 0.3·tIoU + 0.2·format, multiplicative evidence weighting γ = 0.5, "
           "w ∈ [0.5, 1.5]) raises the greedy tool-window mIoU and R@0.5 on held-out questions by >= +5 points each "
           "over GRPO without the grounding reward (0.5·acc + 0.2·format), with answer accuracy not lower by more "
           "than 1 point (paper ablation: without the evidence reward R@0.5 40.1 -> 33.2, mIoU 43.8 -> 38.8)."),
    control=("arm `nogr`: the same SFT checkpoint, the same prompts in the same order, the same number of RL steps, "
             "prompts per step and G (matched samples), the same optimiser and loss; only the reward (no grounding "
             "term) and the advantage (plain GRPO) differ. Secondary (no verdict): `full` (GRPO, full reward) "
             "isolates the evidence weighting, GA-GRPO − full expected >= 0."),
    seeds=list(SEEDS),
    not_reproduced_if=("over the 3 paired seeds, the upper end of the 95% t interval of Δ mIoU (ga − nogr, points) "
                       "is below +5, or that of Δ R@0.5 is below +5, or the upper end of Δ accuracy's interval is "
                       "below −1. Reproduced if mean Δ mIoU >= +5 and mean Δ R@0.5 >= +5 with both intervals' lower "
                       "ends > 0, and mean Δ accuracy >= −1."),
    inconclusive_if="neither rule holds (or fewer than 3 paired seeds finished).",
)


def decide(d_iou, d_r, d_acc) -> str:
    if d_iou[2] < 5 or d_r[2] < 5 or d_acc[2] < -1:
        return "not reproduced"
    if d_iou[0] >= 5 and d_r[0] >= 5 and d_iou[1] > 0 and d_r[1] > 0 and d_acc[0] >= -1:
        return "reproduced"
    return "inconclusive"


def make_loop(policy: toy.FramePolicy, arm: str, args) -> Loop:
    weights = toy.NO_GROUNDING if arm == "nogr" else toy.FULL
    advantage = GAGRPO(gamma=0.5, low=0.5, high=1.5, mode="multiplicative") if arm == "ga" else GRPO()
    return Loop(policy, toy.score(weights, args.max_calls), advantage, ClippedPolicyLoss(aggregation="token_mean"),
                methods=[MedScopeStats(args.max_calls)], group_size=args.group_size, provided=("correct",))


def run(arm: str, seed: int, start: dict, args, train: list, evals: list) -> dict:
    torch.manual_seed(seed)
    policy = toy.FramePolicy(max_calls=args.max_calls, seed=seed)
    policy.net.load_state_dict(start)
    policy.generator = torch.Generator().manual_seed(10_000 + seed)  # the same sampling stream in every arm
    loop = make_loop(policy, arm, args)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=1.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))  # same for every arm
    t0, logs = time.process_time(), []
    for step in range(args.steps):
        idx = order[(step * args.prompts + torch.arange(args.prompts)) % len(train)]
        collected = loop.collect([train[i] for i in idx.tolist()])
        m = loop.update(collected.kept, stepper)
        logs.append({k: float(v) for k, v in m.items() if k in ("miou", "r_at_0.5", "answer_accuracy", "tool_calls", "frames_read")})
    train_s = time.process_time() - t0
    result = toy.evaluate(policy, evals)
    tail = logs[-max(1, args.steps // 5):]
    train_last = {k: statistics.fmean(x[k] for x in tail) for k in tail[0]} if tail and tail[0] else {}
    return {"arm": arm, "seed": seed, **result, "train_cpu_s": train_s, "train_last": train_last,
            "samples": args.steps * args.prompts * args.group_size}


def report(runs: list[dict], args, sft_evals: dict) -> tuple[str, str]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    rows = []
    for a in arms:
        rs = [by[(a, s)] for s in seeds if (a, s) in by]
        cell = lambda k: f"{100 * statistics.fmean(r[k] for r in rs):.1f} ± {100 * (statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0):.1f}"  # noqa: E731
        rows.append([a, len(rs), cell("accuracy"), cell("miou"), cell("r_at_0.5"),
                     f"{statistics.fmean(r['tool_calls'] for r in rs):.2f}", f"{statistics.fmean(r['frames_read'] for r in rs):.1f}",
                     f"{statistics.fmean(r['train_cpu_s'] for r in rs):.0f}"])
    if sft_evals:
        rs = list(sft_evals.values())
        rows.insert(0, ["SFT start", len(rs)] + [f"{100 * statistics.fmean(r[k] for r in rs):.1f}" for k in ("accuracy", "miou", "r_at_0.5")]
                    + [f"{statistics.fmean(r['tool_calls'] for r in rs):.2f}", f"{statistics.fmean(r['frames_read'] for r in rs):.1f}", "-"])
    lines = [MARKER, "", "## Results", "",
             f"Command: `{args.command}`; SFT {args.sft_steps} steps × 64 expert trajectories, then {args.steps} RL "
             f"steps × {args.prompts} questions × G = {args.group_size} ({args.steps * args.prompts * args.group_size} "
             f"episodes per arm-seed), lr {args.lr}, PPO clip 0.2, one optimiser step per rollout, KL 0; greedy "
             f"evaluation on {args.eval_size} held-out questions; seeds {seeds}.", "",
             "Greedy evaluation, points (mean ± sd over seeds):", "",
             table(["arm", "seeds", "answer accuracy", "window mIoU", "R@0.5", "tool calls / episode", "frames read", "train CPU s"], rows), ""]
    line = f"{NAME}: claim not run"
    paired = [s for s in seeds if ("ga", s) in by and ("nogr", s) in by]
    if len(paired) >= 2:
        d = {k: diff_ci([100 * by[("ga", s)][k] for s in paired], [100 * by[("nogr", s)][k] for s in paired])
             for k in ("miou", "r_at_0.5", "accuracy")}
        complete = len(paired) >= 3 and not args.smoke
        v = decide(d["miou"], d["r_at_0.5"], d["accuracy"]) if complete else "inconclusive"
        why = ("by the pre-registered rules" if complete else "smoke run, no verdict" if args.smoke
               else f"only {len(paired)} of the 3 pre-registered seeds finished")
        lines += ["Paired GA-GRPO − GRPO without grounding reward (points, mean [95% t interval]): "
                  f"mIoU {fmt_ci(d['miou'], 1, True)}, R@0.5 {fmt_ci(d['r_at_0.5'], 1, True)}, accuracy {fmt_ci(d['accuracy'], 1, True)}.", ""]
        sec = [s for s in paired if ("full", s) in by]
        if len(sec) >= 2:
            e = {k: diff_ci([100 * by[("ga", s)][k] for s in sec], [100 * by[("full", s)][k] for s in sec]) for k in ("miou", "r_at_0.5", "accuracy")}
            f = {k: diff_ci([100 * by[("full", s)][k] for s in sec], [100 * by[("nogr", s)][k] for s in sec]) for k in ("miou", "r_at_0.5", "accuracy")}
            lines += ["Secondary (no verdict): GA-GRPO − GRPO with the full reward: "
                      f"mIoU {fmt_ci(e['miou'], 1, True)}, R@0.5 {fmt_ci(e['r_at_0.5'], 1, True)}, accuracy {fmt_ci(e['accuracy'], 1, True)}; "
                      f"full − nogr: mIoU {fmt_ci(f['miou'], 1, True)}, R@0.5 {fmt_ci(f['r_at_0.5'], 1, True)}, accuracy {fmt_ci(f['accuracy'], 1, True)}.", ""]
        lines += [f"**Verdict: {v}** ({why}; {len(paired)} paired seeds).", ""]
        line = verdict(NAME, v, f"GA-GRPO - no-grounding GRPO: mIoU {fmt_ci(d['miou'], 1, True)} pts, R@0.5 "
                       f"{fmt_ci(d['r_at_0.5'], 1, True)} pts, accuracy {fmt_ci(d['accuracy'], 1, True)} pts ({len(paired)} seeds)", echo=False)
    if not args.smoke and runs:
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.4))
        for i, k in enumerate(("accuracy", "miou", "r_at_0.5")):
            for j, a in enumerate(arms):
                vals = [100 * by[(a, s)][k] for s in seeds if (a, s) in by]
                ax[i].scatter([j] * len(vals), vals, s=14)
                ax[i].errorbar([j], [statistics.fmean(vals)], fmt="k_", ms=14)
            ax[i].set_xticks(range(len(arms)), arms)
            ax[i].set_title(f"{k} (points)")
        fig.tight_layout()
        save_plot(fig, NAME)
        lines += [f"![greedy evaluation per arm]({NAME}.png)", ""]
    return "\n".join(lines), line


def header(args, evals) -> str:
    return "\n".join([
        "# MedScope / GA-GRPO — tool-window grounding at CPU scale", "",
        "Paper: MedScope, arXiv 2602.13332 (repo SII-WenjieLisjtu/MedScope, code not released); spec "
        "shared/methods/domains.md §5. Script: `reproductions/medscope.py`. The evidence-weighting formula and the "
        "grounding reward are the spec's [UNVERIFIED] design (the paper's exact formulas are not public).", "",
        PREREGISTRATION,
        eval_record(task="synthetic long videos (128 frames × 12-d features, 4-8-frame event, 6 colours; "
                         "multimodal/medscope/video.py)",
                    prompt_template="<bos> + 16 coarse frames (colour averaged out); turns of 3 action tokens + 8 "
                                    "observation frames (multimodal/medscope/toy.py)",
                    answer_extraction="the colour token of the ANS action; no answer within 4 turns = wrong",
                    eos_rule="ANS ends the episode; at most 3 tool calls answered (a 4th is refused)",
                    sampling="greedy (argmax under the grammar constraint)",
                    split=f"{len(evals)} questions of tasks(n, seed={EVAL_SEED}) (hash {split_hash([e['video_seed'] for e in evals])})",
                    seeds=list(SEEDS), reduced_scale=("SFT 300 steps, RL 150 steps × 16 × G 8 (spec: 300 steps); "
                                                      "KL 0 (spec 0.01); measured, 2 shared cores")),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--max-calls", type=int, default=3)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(REPORTS / f"{NAME}_runs.jsonl"))
    p.add_argument("--no-report", action="store_true", help="only append the runs")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already in --out")
    p.add_argument("--prereg-only", action="store_true", help="write the report's pre-registration and stop")
    args = p.parse_args()
    for a in args.arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}, expected some of {list(ARMS)}")
    for name in ("steps", "prompts", "group_size", "sft_steps", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.smoke:
        args.arms, args.seeds, args.steps, args.prompts, args.group_size = ["nogr", "ga"], args.seeds[:1], 2, 4, 4
        args.sft_steps, args.eval_size, args.train_size = 5, 32, 64
    args.command = "python reproductions/medscope.py " + ("--smoke" if args.smoke else
                                                            f"--arms {' '.join(args.arms)} --seeds {' '.join(map(str, args.seeds))}")
    torch.set_num_threads(1)
    evals = toy.tasks(args.eval_size, EVAL_SEED)
    path = REPORTS / f"{NAME}.md"
    if args.prereg_only:
        path.write_text(header(args, evals))
        print(f"wrote {path}")
        return
    settings = {k: getattr(args, k) for k in ("steps", "prompts", "group_size", "lr", "sft_steps", "eval_size", "max_calls",
                                                "train_size")}
    done = []
    try:
        with open(args.out) as f:
            done = [r for r in map(json.loads, f) if r.get("settings") == settings]
    except FileNotFoundError:
        pass
    train = toy.tasks(args.train_size, TRAIN_SEED)
    sft_evals = {r["seed"]: r["sft"] for r in done if "sft" in r}
    for seed in ([] if args.report_only else args.seeds):
        todo = [a for a in args.arms if not any(r["arm"] == a and r["seed"] == seed for r in done)]
        if not todo:
            continue
        start_policy = toy.FramePolicy(max_calls=args.max_calls, seed=seed)
        expert_iou = toy.sft(start_policy, train, args.sft_steps, batch_size=32 if args.smoke else 64, seed=seed)
        start = copy.deepcopy(start_policy.net.state_dict())
        sft_eval = toy.evaluate(start_policy, evals) | {"expert_tiou": expert_iou}
        sft_evals[seed] = sft_eval
        print(f"seed {seed}: SFT acc {sft_eval['accuracy']:.3f} mIoU {sft_eval['miou']:.3f} R@0.5 {sft_eval['r_at_0.5']:.3f} "
              f"(expert windows mean tIoU {expert_iou:.3f})", flush=True)
        for arm in todo:
            r = run(arm, seed, start, args, train, evals) | {"settings": settings, "sft": sft_eval}
            print(f"seed {seed} {arm}: acc {r['accuracy']:.3f} mIoU {r['miou']:.3f} R@0.5 {r['r_at_0.5']:.3f} calls "
                  f"{r['tool_calls']:.2f} frames {r['frames_read']:.1f} ({r['train_cpu_s']:.0f} CPU s)", flush=True)
            done.append(r)
            if not args.smoke:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if args.no_report:
        return
    runs = [r for r in done if r["arm"] in args.arms and r["seed"] in args.seeds]
    results, line = report(runs, args, {s: v for s, v in sft_evals.items() if s in args.seeds})
    if not args.smoke:
        text = path.read_text() if path.exists() else header(args, evals)
        head = text.split("\n" + MARKER + "\n")[0] if ("\n" + MARKER + "\n") in text else text.rstrip("\n")
        path.write_text(head + "\n" + results)
    print(line, flush=True)


if __name__ == "__main__":
    main()
