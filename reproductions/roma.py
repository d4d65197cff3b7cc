"""ROMA (arXiv 2605.09262) at CPU scale: GRPO vs naive augmentation vs ROMA on the red/blue squares task.

The claim, arms, matched budget and verdict rules are pre-registered in ``reproductions/reports/roma.md`` (committed
before any run; shared/methods/domains.md §4 (e)). Every arm of a seed starts from the same SFT checkpoint of the tiny
VLM (``multimodal/roma/toy.py``) and trains the same number of RL steps on the same prompts with G samples each
(matched samples); evaluation is greedy accuracy on one fixed held-out set, clean and under every seen / unseen
corruption at every severity level (fixed keys).

    python reproductions/roma.py                      # 3 seeds, arms grpo naive roma roma_nogate roma_mean
    python reproductions/roma.py --smoke              # 1 seed, grpo and roma, 30 steps (CI-sized; no verdict rules)
    python reproductions/roma.py --arms grpo naive roma --seeds 0 1 2

Per-run results are appended to ``reproductions/reports/roma_runs.jsonl`` as they finish (a rerun skips the runs
already there with the same settings), then the report's results section is rewritten below the pre-registration,
which is kept verbatim, and one verdict line is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

from support.report import REPORTS, plt, save_plot, table

import torch  # noqa: E402  (after support.report: the repository root on sys.path)

from common.advantages.group import GRPO  # noqa: E402
from common.loop import Loop, Stepper  # noqa: E402
from common.losses.ppo_clip import ClippedPolicyLoss  # noqa: E402
from multimodal.roma import corruptions as C  # noqa: E402
from multimodal.roma import toy  # noqa: E402
from multimodal.roma.augment import NaiveAugmentation  # noqa: E402
from multimodal.roma.method import ROMA  # noqa: E402

NAME = "roma"
MARKER = "<!-- results below: written by reproductions/roma.py; everything above is the pre-registration, kept verbatim -->"
ARMS = ("grpo", "naive", "roma", "roma_nogate", "roma_mean")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
EVAL_SEED = 12345


def methods_of(arm: str, seed: int) -> list:
    if arm == "grpo":
        return []
    if arm == "naive":
        return [NaiveAugmentation(prob=0.5, seed=seed)]
    kw = dict(num_views=3, kl_coef=0.1, aux_coef=0.5, seed=seed)
    if arm == "roma":
        return [ROMA(**kw)]
    if arm == "roma_nogate":
        return [ROMA(**kw, gate_kl=False, gate_aux=False)]
    if arm == "roma_mean":
        return [ROMA(**kw, worst="mean")]
    raise ValueError(f"--arms: unknown arm {arm!r}, expected some of {ARMS}")


def eval_sets(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation images: clean, and every corruption at every level (keys from EVAL_SEED)."""
    samples = [toy.render(1, i) for i in range(n)]
    clean = torch.stack([s["image"] for s in samples])
    answers = toy.answer_ids(samples)
    keys = C.view_keys(EVAL_SEED, torch.arange(n), 0, 1)[:, 0]
    sets = {"clean": (clean, answers)}
    for kind, name in enumerate(C.NAMES):
        for level in range(1, C.NUM_LEVELS + 1):
            imgs = C.corrupt(clean, torch.full((n,), kind), torch.full((n,), level), keys)
            sets[f"{name}@{level}"] = (imgs, answers)
    return sets


def evaluate(policy: toy.TinyVLMPolicy, sets: dict) -> dict[str, float]:
    acc = {k: float(toy.accuracy(policy, *v)) for k, v in sets.items()}
    seen = [v for k, v in acc.items() if k.split("@")[0] in C.SEEN]
    unseen = [v for k, v in acc.items() if k.split("@")[0] in C.UNSEEN]
    return {"clean": acc["clean"], "seen": statistics.fmean(seen), "unseen": statistics.fmean(unseen), "detail": acc}


def run(arm: str, seed: int, start: dict, args, sets: dict, train: list) -> dict:
    torch.manual_seed(seed)
    policy = toy.TinyVLMPolicy(seed=seed)
    policy.net.load_state_dict(start)
    policy.generator = torch.Generator().manual_seed(seed)
    loop = Loop(policy, toy.score, GRPO(), ClippedPolicyLoss(aggregation="token_mean"), methods=methods_of(arm, seed),
                group_size=args.group_size, provided=("correct",))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=1.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))  # same for every arm
    t0, rewards, curve = time.process_time(), [], []
    for step in range(args.steps):
        idx = order[(step * args.prompts + torch.arange(args.prompts)) % len(train)]
        collected = loop.collect([train[i] for i in idx.tolist()])
        loop.update(collected.kept, stepper)
        rewards.append(float(collected.seen.correct.float().mean()))
        if args.curve_every and (step + 1) % args.curve_every == 0:
            curve.append((step + 1, float(toy.accuracy(policy, *sets["clean"]))))
    train_s = time.process_time() - t0
    result = evaluate(policy, sets)
    return {"arm": arm, "seed": seed, **result, "train_cpu_s": train_s, "train_accuracy_last50": statistics.fmean(rewards[-50:]),
            "samples": args.steps * args.prompts * args.group_size, "curve": curve}


def interval(diffs: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    h = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - h, m + h


def decide(d_seen, d_unseen, d_clean) -> str:
    (ms, ls, us), (mu, lu, uu), (mc, lc, uc) = d_seen, d_unseen, d_clean
    if ms >= 2.0 and mu >= 1.0 and ls > 0 and lu > 0 and -1.0 <= mc <= 1.0:
        return "reproduced"
    if us < 2.0 or uu < 1.0 or uc < -1.0:
        return "not reproduced"
    return "inconclusive"


def report(runs: list[dict], args) -> str:
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for a in arms:
        rs = [by[(a, s)] for s in seeds if (a, s) in by]
        cell = lambda k: f"{100 * statistics.fmean(r[k] for r in rs):.1f} ± {100 * (statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0):.1f}"  # noqa: E731
        rows.append([a, len(rs), cell("clean"), cell("seen"), cell("unseen"), f"{statistics.fmean(r['train_cpu_s'] for r in rs):.0f}"])
    lines = [MARKER, "", "## Results", "",
             f"Command: `{args.command}`; {args.steps} RL steps × {args.prompts} prompts × G = {args.group_size} "
             f"({args.steps * args.prompts * args.group_size} samples per run), SFT {args.sft_steps} steps, "
             f"{args.eval_size} evaluation images per condition, seeds {seeds}.", "",
             "Accuracy in points (mean ± sd over seeds):", "",
             table(["arm", "seeds", "clean", "seen (4 × 5 levels)", "unseen (4 × 5 levels)", "train CPU s"], rows), ""]
    verdict_line = f"{NAME}: claim not run"
    paired = [s for s in seeds if ("grpo", s) in by and ("roma", s) in by]
    if paired:
        d = {k: interval([100 * (by[("roma", s)][k] - by[("grpo", s)][k]) for s in paired]) for k in ("seen", "unseen", "clean")}
        fmt = lambda t: f"{t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}]"  # noqa: E731
        complete = len(paired) >= 3 and not args.smoke
        v = decide(d["seen"], d["unseen"], d["clean"]) if complete else "inconclusive"
        why = ("by the pre-registered rules" if complete else
               "smoke run, no verdict" if args.smoke else f"only {len(paired)} of the 3 pre-registered seeds finished")
        lines += ["Paired ROMA − GRPO over seeds (points, mean [95 % t-interval]): "
                  f"seen {fmt(d['seen'])}, unseen {fmt(d['unseen'])}, clean {fmt(d['clean'])}.", "",
                  f"**Verdict: {v}** ({why}; {len(paired)} paired seeds).", ""]
        verdict_line = (f"{NAME}: claim {v}: seen {fmt(d['seen'])} pp, unseen {fmt(d['unseen'])} pp, "
                        f"clean {fmt(d['clean'])} pp (ROMA - GRPO, {len(paired)} seeds)")
    detail_rows = []
    for a in arms:
        rs = [by[(a, s)] for s in seeds if (a, s) in by]
        per_kind = {n: statistics.fmean(statistics.fmean(r["detail"][f"{n}@{lv}"] for lv in range(1, 6)) for r in rs) for n in C.NAMES}
        detail_rows.append([a] + [f"{100 * per_kind[n]:.1f}" for n in C.NAMES])
    lines += ["Per corruption (mean over levels and seeds, points):", "", table(["arm", *C.NAMES], detail_rows), "",
              "Training accuracy of the rollouts, last 50 steps (mean over seeds): "
              + ", ".join(f"{a} {100 * statistics.fmean(by[(a, s)]['train_accuracy_last50'] for s in seeds if (a, s) in by):.1f}"
                          for a in arms), ""]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.5))
    for i, k in enumerate(("clean", "seen", "unseen")):
        for j, a in enumerate(arms):
            vals = [100 * by[(a, s)][k] for s in seeds if (a, s) in by]
            ax[i].scatter([j] * len(vals), vals, s=14)
            ax[i].errorbar([j], [statistics.fmean(vals)], fmt="k_", ms=14)
        ax[i].set_xticks(range(len(arms)), arms, rotation=30)
        ax[i].set_title(f"{k} accuracy (points)")
    fig.tight_layout()
    save_plot(fig, NAME) if not args.smoke else plt.close(fig)
    lines += [f"![accuracy per arm]({NAME}.png)", ""]
    return "\n".join(lines), verdict_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--curve-every", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(REPORTS / f"{NAME}_runs.jsonl"))
    p.add_argument("--no-report", action="store_true", help="only append the runs")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already in --out")
    args = p.parse_args()
    for a in args.arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}, expected some of {list(ARMS)}")
    if args.smoke:
        args.arms, args.seeds, args.steps, args.eval_size = ["grpo", "roma"], args.seeds[:1], 30, 200
    args.command = "python reproductions/roma.py " + ("--smoke" if args.smoke else
                                                        f"--arms {' '.join(args.arms)} --seeds {' '.join(map(str, args.seeds))}")
    torch.set_num_threads(1)
    settings = {k: getattr(args, k) for k in ("steps", "prompts", "group_size", "lr", "sft_steps", "eval_size")}
    done = []
    try:
        with open(args.out) as f:
            done = [r for r in map(json.loads, f) if r.get("settings") == settings]
    except FileNotFoundError:
        pass
    train = [toy.render(0, i) for i in range(4096)]
    sets = eval_sets(args.eval_size) if not args.report_only else {}
    for seed in ([] if args.report_only else args.seeds):
        todo = [a for a in args.arms if not any(r["arm"] == a and r["seed"] == seed for r in done)]
        if not todo:
            continue
        torch.manual_seed(seed)
        start_policy = toy.TinyVLMPolicy(seed=seed)
        toy.sft(start_policy, train, args.sft_steps, seed=seed)
        start = copy.deepcopy(start_policy.net.state_dict())
        sft_eval = evaluate(start_policy, sets)
        print(f"seed {seed}: SFT clean {sft_eval['clean']:.3f} seen {sft_eval['seen']:.3f} unseen {sft_eval['unseen']:.3f}", flush=True)
        for arm in todo:
            r = run(arm, seed, start, args, sets, train) | {"settings": settings, "sft": {k: sft_eval[k] for k in ("clean", "seen", "unseen")}}
            print(f"seed {seed} {arm}: clean {r['clean']:.3f} seen {r['seen']:.3f} unseen {r['unseen']:.3f} "
                  f"({r['train_cpu_s']:.0f} CPU s)", flush=True)
            done.append(r)
            if not args.smoke:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if args.no_report:
        return
    runs = [r for r in done if r["arm"] in args.arms and r["seed"] in args.seeds]
    results, line = report(runs, args)
    path = REPORTS / f"{NAME}.md"
    text = path.read_text()
    head = text.split("\n" + MARKER + "\n")[0] if ("\n" + MARKER + "\n") in text else text.rstrip("\n")
    if not args.smoke:
        path.write_text(head + "\n" + results)
    print(line, flush=True)


if __name__ == "__main__":
    main()
