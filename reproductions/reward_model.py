"""A neural reward model on a verifiable task, end to end: train it, check how it ranks held-out pairs, then GRPO on
its scores against a matched control, and measure held-out accuracy with the task's verifier (InstructGPT's recipe,
arXiv 2203.02155 §3.5, with GRPO, arXiv 2402.03300 eq. 3, as the RL step).

Claims checked (the pre-registration below, PREREG, is written into the report before any result):
  1. the reward model ranks held-out pairs (prompts never seen in training) correctly >= 90% of the time (issue 16);
  2. GRPO on its scores raises the held-out greedy accuracy (verifier-measured) more than the matched control: the
     same GRPO steps, prompts, G, lr and seed with the same RM's scores permuted among each prompt's G completions
     (``support.controls.ShuffledRewardModelReward``: the same rewards in every group, no ranking information).

Stages, each a real ``advlab`` process (the README's commands, with the overrides printed):
  rm             advlab fit --config configs/text_reasoning/reward_model.yaml         (pairs sampled + RM trained; one
                 RM, seed 0, shared by the GRPO seeds)
  rank           score the held-out pairs with common.rewards.model.RewardModelReward, plus two diagnostics
  before         advlab validate --config configs/text_reasoning/grpo_arithmetic.yaml  (the untrained policy; greedy,
                 so seed-independent: run once and shared)
  grpo           advlab fit --config configs/text_reasoning/grpo_reward_model.yaml     (GRPO on the RM's scores)
  after          advlab validate ... --ckpt_path <GRPO's last.ckpt>
  control        the grpo stage with the rewards of support.controls.ShuffledRewardModelReward
  control_after  advlab validate ... --ckpt_path <the control's last.ckpt>

Results are kept in ``<out>/rm/results.json`` and ``<out>/seed<S>/results.json``; a stage whose result is there is
not run again (``--fresh`` reruns). Seeds may run in parallel processes (``--seeds 1``, ``--seeds 2``); the report is
written by the process that finds every seed complete. ``--smoke`` runs every stage of one seed with a tiny random
model in one folder (a slow test runs it); it writes no report.

    .venv/bin/python reproductions/reward_model.py [--seeds 0 1 2] [--grpo-steps 2] [--val-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from support.report import (ROOT, diff_ci, eval_record, fmt_ci, mean_ci, overall, preregistration, split_hash, table,
                            verdict, wilson, write_report)

RM_CONFIG = ROOT / "configs/text_reasoning/reward_model.yaml"
GRPO_CONFIG = ROOT / "configs/text_reasoning/grpo_reward_model.yaml"
BASE_CONFIG = ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"
SMOKE_RM = ["--model.init_args.backbone", "common.models.TinyLlama", "--data.init_args.build.policy", "common.models.TinyLlama",
            "--data.init_args.build.sampling.max_new_tokens", "4", "--data.init_args.train_prompts", "4",
            "--data.init_args.val_prompts", "4", "--data.init_args.prompts.init_args.train_size", "32",
            "--data.init_args.prompts.init_args.val_size", "8", "--trainer.max_epochs", "1"]
SMOKE_POLICY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "4",
                "--data.init_args.train_size", "32"]


def advlab(*args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "common.cli", *args]
    print("$ advlab " + " ".join(str(a).replace(str(ROOT) + "/", "") for a in args), flush=True)
    t0 = time.perf_counter()
    path = os.pathsep.join(p for p in (str(ROOT / "reproductions"), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode != 0:
        raise SystemExit(f"advlab {args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.stdout + proc.stderr


def val_accuracy(output: str) -> float:
    found = re.findall(r"val/accuracy\s*[│|]\s*([0-9.]+)", output)
    if not found:
        raise SystemExit(f"no val/accuracy in the output:\n{output[-2000:]}")
    return float(found[-1])


def rank(out: Path, smoke: bool) -> dict:
    """Held-out pair accuracy, and two diagnostics: sampled-only pairs and same-form pairs (reference vs off-by-d)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from common.reward_model import read_pairs
    from common.rewards.model import RewardModelReward

    _, pairs = read_pairs(out / "runs/reward_model/pairs.jsonl")
    held = [p for p in pairs if p.get("split") == "val"]
    train_prompts = {p["prompt"] for p in pairs if p.get("split") != "val"}
    assert not train_prompts & {p["prompt"] for p in held}
    reward = RewardModelReward(str(out / "runs/reward_model/export"))

    def accuracy(rows: list[dict]) -> tuple[float, int]:
        if not rows:
            return 0.0, 0  # no pairs of this kind: the report prints "—"
        samples = [{"prompt": r["prompt"]} for r in rows]
        rw, rl = reward([r["chosen"] for r in rows], samples), reward([r["rejected"] for r in rows], samples)
        return float((rw > rl).float().mean()), len(rows)

    sampled = [p for p in held if not p["chosen"].startswith("The answer is ")]
    same_form = [{"prompt": p["prompt"], "chosen": f"The answer is {p['answer']}.",
                  "rejected": f"The answer is {int(p['answer']) + d}."}
                 for p in {q["prompt"]: q for q in held}.values() for d in (-10, -1, 1, 10) if p["answer"].lstrip("-").isdigit()]
    with torch.no_grad():
        acc, n = accuracy(held)
        acc_sampled, n_sampled = accuracy(sampled)
        acc_form, n_form = accuracy(same_form)
    return {"held_out": acc, "n_held_out": n, "n_train": len(pairs) - len(held), "sampled_only": acc_sampled,
            "n_sampled_only": n_sampled, "same_form": acc_form, "n_same_form": n_form,
            "held_out_prompts": len({p["prompt"] for p in held})}


SEED_STAGES = ("before", "grpo", "after", "control", "control_after")
STAGES = ("rm", "rank", *SEED_STAGES)
RM_SEED = 0  # one reward model, shared by the GRPO seeds (see PREREG["seeds"])
MARGIN = 2 / 32  # the smallest gain the claim must show to count: 2 of the 32 held-out prompts
PREREG = dict(
    claim="(1) the Bradley-Terry RM ranks >= 90% of held-out pairs (prompts never seen in training) correctly (issue "
          "16's threshold); (2) GRPO on its scores raises the held-out greedy accuracy (the task's verifier, 32 "
          "validation prompts) more than the matched control after the same K = 2 GRPO steps: accuracy(RM arm) − "
          f"accuracy(control) > 0 over seeds, a gain of at least {MARGIN:.4f} (2 of 32 prompts) being the claim's size",
    control="GRPO from the same untrained policy with the same seed, prompts, K steps, G, lr and sampling, rewarded by the "
            "same RM's scores permuted uniformly among each prompt's G completions "
            "(`support.controls.ShuffledRewardModelReward`): every group gets the same rewards, hence the same advantage "
            "magnitudes, but not the RM's ranking. Also reported: both arms' change from the untrained policy",
    seeds="GRPO seeds 0, 1, 2 (both arms per seed), all with one RM (pairs sampled and RM trained with seed 0). Amended "
          "2026-12-08 02:00 and 02:06 UTC, before any result: the first version trained one RM per seed and took K = 4; "
          "on the shared 2-core machine (load ~16) one RM fit took > 15 min and one greedy evaluation ~5 min, so the RM "
          "is shared (claim (1) is one RM's measurement) and K = 2 (the steps of the 2026-12-07 seed-0 report)",
    not_reproduced_if="(1) the held-out pair accuracy is < 0.9; or (2) the upper end of the paired 95% "
                      "t-interval of accuracy(RM arm) − accuracy(control) is below "
                      f"{MARGIN:.4f} (a gain of the claim's size is excluded)",
    inconclusive_if=f"(2) the interval reaches above {MARGIN:.4f} and its lower end is <= 0. Overall: not reproduced if "
                    "either part is, reproduced if both are, else inconclusive")


def decide_rank(acc: float) -> str:
    return "reproduced" if acc >= 0.9 else "not reproduced"


def decide_gain(ci: tuple[float, float, float]) -> str:
    if ci[2] < MARGIN:
        return "not reproduced"
    return "reproduced" if ci[1] > 0 else "inconclusive"


class Results:
    """A stage's results in a JSON file, merged with what is on disk at every save (stages may run in parallel
    processes)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.update({k: v for k, v in on_disk.items() if k not in self.data})
        self.path.write_text(json.dumps(self.data, indent=1))


def run_rm(rm_dir: Path, args: argparse.Namespace, stages: set[str], res: Results) -> None:
    """Stages rm and rank in ``rm_dir`` (its runs/reward_model/{pairs.jsonl,export})."""
    rm_dir.mkdir(parents=True, exist_ok=True)
    if "rm" not in res.data and "rm" in stages:
        advlab("fit", "--config", str(RM_CONFIG), "--seed_everything", str(RM_SEED), *(SMOKE_RM if args.smoke else []),
               cwd=rm_dir)
        res.data["rm"] = True
        res.save()
    if "rank" not in res.data and "rank" in stages:
        res.data["rank"] = rank(rm_dir, args.smoke)
        print(f"  held-out pair accuracy {res.data['rank']['held_out']:.3f} ({res.data['rank']['n_held_out']} pairs)", flush=True)
        res.save()


def run_seed(seed: int, out: Path, export: Path, args: argparse.Namespace, stages: set[str], res: Results,
             before_path: Path) -> None:
    """Stages before, grpo, after, control and control_after of one GRPO seed in ``out`` (its runs/lightning_logs)."""
    out.mkdir(parents=True, exist_ok=True)
    results = res.data
    seed_args = ["--seed_everything", str(seed)]
    steps, group = (1, 2) if args.smoke else (args.grpo_steps, args.group_size)
    val = ["--data.init_args.val_size", str(4 if args.smoke else args.val_size),
           "--data.init_args.val_batch_size", str(4 if args.smoke else args.val_size)]
    policy = SMOKE_POLICY if args.smoke else []
    if "before" not in results and "before" in stages:
        if before_path.exists():  # greedy decoding of the same untrained policy on the same prompts: seed-independent
            results["before"] = json.loads(before_path.read_text())["before"]
        else:
            results["before"] = val_accuracy(advlab("validate", "--config", str(BASE_CONFIG), *seed_args, *policy, *val, cwd=out))
            before_path.write_text(json.dumps({"before": results["before"], "seed": seed}))
        print(f"  held-out accuracy before: {results['before']:.3f}", flush=True)
        res.save()
    arms = {"grpo": "common.rewards.model.RewardModelReward", "control": "support.controls.ShuffledRewardModelReward"}
    for arm, cls in arms.items():
        extra = {"seed": seed} if arm == "control" else {}
        reward = json.dumps([{"class_path": cls, "init_args": {"path": str(export), "batch_size": 32, **extra}}])
        if arm not in results and arm in stages:
            where = out / arm  # one folder per arm: the arms of a seed may run in parallel processes
            where.mkdir(parents=True, exist_ok=True)
            root = where / "runs/lightning_logs"  # the CLI's TensorBoard logger writes runs/lightning_logs/version_N
            existing = set(root.glob("version_*"))
            advlab("fit", "--config", str(GRPO_CONFIG), *seed_args, *policy, *val, "--model.init_args.rewards", reward,
                   "--trainer.max_steps", str(steps), "--model.init_args.group_size", str(group), cwd=where)
            (run,) = set(root.glob("version_*")) - existing
            results[arm] = str(run / "checkpoints/last.ckpt")
            results["grpo_steps"], results["group_size"] = steps, group
            res.save()
        key = "after" if arm == "grpo" else "control_after"
        if key not in results and key in stages and arm in results:
            results[key] = val_accuracy(advlab("validate", "--config", str(BASE_CONFIG), *seed_args, *policy, *val,
                                               "--ckpt_path", results[arm], cwd=out / arm))
            print(f"  seed {seed}: held-out accuracy after {arm}: {results[key]:.3f}", flush=True)
            res.save()


def record(val_size: int, seeds: list[int]) -> str:
    from text_reasoning.data import Arithmetic, ReasoningData

    data = ReasoningData(tasks=[Arithmetic(digits=2, ops="+")], train_size=2048, val_size=200)
    data.setup("validate")
    held = data.val_set[:val_size]
    return eval_record(task="two-digit addition (text_reasoning.data.Arithmetic(digits=2, ops='+')), "
                            "ReasoningData(train_size=2048, val_size=200) validation split",
                       prompt_template="SmolLM2's chat template, one user turn = the problem (no system prompt, no "
                                       "instruction), assistant header appended",
                       answer_extraction="common.rewards.math.NumericAnswerReward via text_reasoning.rewards.TaskReward: "
                                         "the completion's last number equals the answer",
                       eos_rule="generation stops at the chat template's <\\|im_end\\|> or after 32 new tokens",
                       sampling="evaluation greedy (val/accuracy of advlab validate); GRPO rollouts T = 1, 32 new tokens",
                       split=f"the first {val_size} validation prompts, hash {split_hash(held)}", seeds=seeds,
                       metric="val/accuracy = fraction of the prompts whose greedy completion is right")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one seed, a tiny random model, seconds per stage; no report")
    ap.add_argument("--out", type=Path, default=None,
                    help="where seed<S>/runs/ and results go (default runs/reward_model_repro; --smoke: a folder to give)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run now (the report needs 0 1 2)")
    ap.add_argument("--grpo-steps", type=int, default=2, help="GRPO optimiser steps (both arms)")
    ap.add_argument("--group-size", type=int, default=4, help="GRPO's G")
    ap.add_argument("--val-size", type=int, default=32, help="held-out prompts for the accuracy (the first of the recipe's)")
    ap.add_argument("--fresh", action="store_true", help="rerun every stage")
    ap.add_argument("--note", default="", help="a note on how this run went, appended to the report")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run now ('report': none, "
                    "only the report from the results on disk)")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    if stages - {*STAGES, "report"}:
        raise SystemExit(f"--stages: expected names from {','.join(STAGES)},report, got {args.stages!r}")
    if args.smoke:
        if args.out is None:
            raise SystemExit("--smoke needs --out (a scratch folder)")
        out = args.out.resolve()
        res = Results(out / "results_smoke.json", args.fresh)  # one folder and one file for every stage
        run_rm(out, args, stages, res)
        run_seed(args.seeds[0], out, out / "runs/reward_model/export", args, stages, res, out / "before.json")
        r, d = res.data["rank"], res.data
        print(f"reward_model (smoke): held-out pair accuracy {r['held_out']:.3f} ({r['n_held_out']} pairs); held-out "
              f"greedy accuracy {d['before']:.3f} -> {d['after']:.3f} (RM) / {d['control_after']:.3f} (control) after "
              f"{d['grpo_steps']} GRPO step(s)")
        return
    root = (args.out or ROOT / "runs/reward_model_repro").resolve()
    root.mkdir(parents=True, exist_ok=True)
    report_seeds = [0, 1, 2]
    (root / "preregistration.md").write_text(preregistration(**PREREG))  # fixed before any result of this script
    rm = Results(root / "rm/results.json", args.fresh)
    run_rm(root / "rm", args, stages, rm)
    for seed in args.seeds:
        run_seed(seed, root / f"seed{seed}", root / "rm/runs/reward_model/export", args, stages,
                 Results(root / f"seed{seed}/results.json", args.fresh), root / "before.json")
    found = {s: json.loads(p.read_text()) for s in report_seeds if (p := root / f"seed{s}/results.json").exists()}
    missing = {s: [k for k in SEED_STAGES if k not in found.get(s, {})] for s in report_seeds}
    if "rank" not in rm.data or any(missing.values()):
        print(f"stages missing for the report: rm {'rank' not in rm.data}, seeds { {s: m for s, m in missing.items() if m} }",
              flush=True)
        return
    extra = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in root.glob("seed*/results.json")}
    extra = {k: v for k, v in sorted(extra.items()) if k not in report_seeds and all(x in v for x in SEED_STAGES)}
    write(rm.data["rank"], found, report_seeds, args, extra)


def explore(found: dict[int, dict], seeds: list[int], extra: dict[int, dict], steps: int) -> str:
    """The post hoc section: every finished seed, pre-registered and added, and their paired interval."""
    if not extra:
        return ""
    every = {**{s: found[s] for s in seeds}, **extra}
    rows = [[s, f"{x['after']:.3f}", f"{x['control_after']:.3f}", f"{x['after'] - x['control_after']:+.3f}"]
            for s, x in every.items()]
    after, ctrl = [x["after"] for x in every.values()], [x["control_after"] for x in every.values()]
    return f"""## Exploratory, post hoc (not the verdict)

GRPO seeds {', '.join(map(str, extra))} were added after the pre-registered run (the same RM, steps and settings),
because all three pre-registered seeds favoured the RM arm while t = 4.303 left the interval wide. Over all
{len(every)} seeds: RM − control {fmt_ci(diff_ci(after, ctrl), signed=True)} ({sum(a > c for a, c in zip(after, ctrl))} of
{len(every)} seeds favour the RM arm); RM − before {fmt_ci(diff_ci(after, [x['before'] for x in every.values()]), signed=True)},
control − before {fmt_ci(diff_ci(ctrl, [x['before'] for x in every.values()]), signed=True)}.

{table(["GRPO seed", f"after {steps} steps (RM)", f"after {steps} steps (control)", "RM − control"], rows)}

"""


def write(r: dict, found: dict[int, dict], seeds: list[int], args: argparse.Namespace,
          extra: dict[int, dict] | None = None) -> None:
    """The report from the RM's ranking ``r`` and the pre-registered seeds' results ``found`` (the verdict), plus
    the exploratory seeds ``extra`` run after it (a post hoc section, not the verdict)."""
    res = [found[s] for s in seeds]
    steps, group = res[0]["grpo_steps"], res[0]["group_size"]
    before = [x["before"] for x in res]
    after = [x["after"] for x in res]
    ctrl = [x["control_after"] for x in res]
    v_rank, gain = decide_rank(r["held_out"]), diff_ci(after, ctrl)
    v_gain = decide_gain(gain)
    word = overall([v_rank, v_gain])
    rm_change, ctrl_change = diff_ci(after, before), diff_ci(ctrl, before)
    lo, hi = wilson(r["held_out"], r["n_held_out"])
    details = (f"(1) held-out pair accuracy {r['held_out']:.3f} ({r['n_held_out']} pairs, Wilson [{lo:.3f}, {hi:.3f}]; "
               f"{v_rank}); (2) held-out greedy accuracy after {steps} GRPO steps RM {sum(after) / len(after):.3f} vs "
               f"shuffled-RM control {sum(ctrl) / len(ctrl):.3f}, RM − control {fmt_ci(gain, signed=True)} ({v_gain}); "
               f"before {before[0]:.3f}; GRPO seeds {', '.join(map(str, seeds))}")
    line = verdict("reward_model", word, details)
    per_seed = [[s, f"{x['before']:.3f}", f"{x['after']:.3f}", f"{x['control_after']:.3f}",
                 f"{x['after'] - x['control_after']:+.3f}"] for s, x in zip(seeds, res)]
    rank_rows = [["held-out pairs (sampled incorrect vs correct: sampled or the reference) — claim 1", r["n_held_out"],
                  f"{r['held_out']:.3f} (Wilson [{lo:.3f}, {hi:.3f}])"],
                 ["  of which sampled correct vs sampled incorrect", r["n_sampled_only"],
                  f"{r['sampled_only']:.3f}" if r["n_sampled_only"] else "— (no such pair)"],
                 ["diagnostic: 'The answer is N.' vs same form, N off by ±1/±10", r["n_same_form"], f"{r['same_form']:.3f}"]]
    summary = [[f"accuracy after {steps} steps, RM arm", fmt_ci(mean_ci(after)), ""],
               [f"accuracy after {steps} steps, shuffled-RM control", fmt_ci(mean_ci(ctrl)), ""],
               ["RM arm − control (claim 2, paired by seed)", fmt_ci(gain, signed=True), v_gain],
               ["RM arm − before", fmt_ci(rm_change, signed=True), "diagnostic"],
               ["control − before", fmt_ci(ctrl_change, signed=True), "diagnostic"]]
    ahead = sum(a > c for a, c in zip(after, ctrl))
    worse = (" (the shuffled scores make the policy worse: part of the gap is the control's loss, not only the RM "
             "arm's gain)" if ctrl_change[2] < 0 else "")
    report = f"""# Neural reward model: Bradley-Terry RM on verifiable pairs, then GRPO on its scores vs a shuffled-score control

InstructGPT (arXiv 2203.02155 §3.5) trains a reward model on comparisons and optimises the policy against it; here the
comparisons are labelled by a verifier, so the policy's accuracy can be measured by the same verifier, and GRPO
(arXiv 2402.03300, eq. 3) is the RL step.

{preregistration(**PREREG)}
Setup (CPU, reduced scale: every stage shares two CPU cores with other jobs; one RM, {steps} GRPO steps per arm):
- task: two-digit addition (`text_reasoning.data.Arithmetic`), policy the bundled SmolLM2-135M-Instruct;
- pairs (`configs/text_reasoning/reward_model.yaml`, seed {RM_SEED}): 2 completions per prompt sampled from the policy at
  its GRPO sampling settings (T = 1, 32 tokens), labelled by the verifier; the reference answer written "The answer
  is N." is one more correct completion (the base policy is right on only a few % of samples). {r['n_train']}
  training pairs from 32 training prompts; held-out pairs from {r['held_out_prompts']} of ReasoningData's
  validation prompts, none seen in training;
- RM: SmolLM2-135M backbone + scalar head, LoRA r = 8 on the last 4 layers, Bradley-Terry loss, 2 epochs;
- GRPO (`configs/text_reasoning/grpo_reward_model.yaml`), both arms, per seed: {steps} steps of 4 prompts x G = {group},
  lr 2e-5, 32 new tokens at T = 1, no KL; RM arm: reward = the RM's score; control: the same scores permuted within
  each group. Accuracy = greedy on the first {args.val_size} validation prompts.

The reward model (claim 1):

{table(["pairs", "n", "RM ranks chosen higher"], rank_rows)}

GRPO on its scores (claim 2), per seed:

{table(["GRPO seed", "accuracy before", f"after {steps} steps (RM)", f"after {steps} steps (control)", "RM − control"], per_seed)}

{table(["measure (mean [95% t-interval over the seeds])", "value", "verdict"], summary)}

Verdict: `{line}`

### Verdict: **{word}** (pre-registered rules above: claim 1 {v_rank}, claim 2 {v_gain})

Reading: the held-out pairs mostly oppose the reference written as "The answer is N." to a sampled wrong
completion, so they can be ranked by form alone; the same-form diagnostic (the reference against the same sentence
with N off by ±1 or ±10; near 0.5 = the RM does not check the sum) measures how much of the ranking is arithmetic.
The shuffled control separates what the RM's ranking contributes from what any GRPO update of the same size does to
this policy (GRPO at T = 1 on 32-token completions also moves the policy's style, which can change greedy accuracy
by itself). The accuracy is on {args.val_size} prompts: one prompt is {1 / args.val_size:.3f}, and three seeds give a
t-interval with 2 degrees of freedom (t = 4.303), so only a large, consistent gap can be resolved at this scale.
{ahead} of {len(seeds)} seeds favour the RM arm; its change from the untrained policy is
{fmt_ci(rm_change, signed=True)}, the control's {fmt_ci(ctrl_change, signed=True)}{worse}.
"Before" is one greedy evaluation of the untrained policy (seed-independent), shared by the seeds. Earlier runs
(2026-12-07, one RM per seed, no control): the RM ranked 32/32 held-out pairs in each of 3 seeds, with same-form
diagnostics 0.61 / 0.58 / 0.59, and GRPO on its scores moved greedy accuracy 0.125 -> 0.375 / 0.125 / 0.156 after 6
steps (+0.094, 95% [-0.24, +0.43]).

Limits: one RM (claim 1 is one model's measurement, n = {r['n_held_out']} pairs); {steps} GRPO steps of
{4 * group} rollouts per arm; 32 held-out prompts; 3 GRPO seeds. The paper's scale (a 6B RM on ~33k prompts'
comparisons, PPO for 256k episodes) is far beyond it.

{explore(found, seeds, extra or {}, steps)}{record(args.val_size, seeds)}
Commands: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python reproductions/reward_model.py --seeds 0 1 2 --grpo-steps {steps}
--group-size {group} --val-size {args.val_size}` (seeds may run as parallel processes, `--seeds S`; results in
`runs/reward_model_repro/{{rm,seed<S>}}/results.json`). Stages: `advlab fit --config
configs/text_reasoning/reward_model.yaml --seed_everything {RM_SEED}`; `advlab validate --config
configs/text_reasoning/grpo_arithmetic.yaml --data.init_args.val_size {args.val_size}`; `advlab fit --config
configs/text_reasoning/grpo_reward_model.yaml --seed_everything S --trainer.max_steps {steps} --model.init_args.group_size
{group} --model.init_args.rewards '[{{"class_path": "common.rewards.model.RewardModelReward", "init_args": {{"path":
"<rm>/runs/reward_model/export", "batch_size": 32}}}}]'` (control: class `support.controls.ShuffledRewardModelReward`,
`"seed": S`, with `reproductions/` on `PYTHONPATH`); `advlab validate ... --ckpt_path <its last.ckpt>`.
{chr(10) + "This run: " + args.note + chr(10) if args.note else ""}"""
    write_report("reward_model", report)


if __name__ == "__main__":
    main()
