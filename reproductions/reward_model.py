"""A neural reward model on a verifiable task, end to end: train it, check how it ranks held-out pairs, then GRPO on
its scores and measure held-out accuracy with the task's verifier (InstructGPT's recipe, arXiv 2203.02155 §3.5,
with GRPO, arXiv 2402.03300, as the RL step).

Claims checked (thresholds fixed before the run, issue 16):
  1. the reward model ranks held-out pairs (prompts never seen in training) correctly >= 90% of the time;
  2. GRPO on its scores raises the held-out greedy accuracy (verifier-measured) above the policy's before training.

Stages, each a real ``advlab`` process (the README's commands, with the overrides printed):
  rm      advlab fit --config configs/text_reasoning/reward_model.yaml         (pairs sampled + RM trained)
  rank    score the held-out pairs with common.rewards.model.RewardModelReward, plus two diagnostics
  before  advlab validate --config configs/text_reasoning/grpo_arithmetic.yaml  (the untrained policy)
  grpo    advlab fit --config configs/text_reasoning/grpo_reward_model.yaml     (GRPO on the RM's scores)
  after   advlab validate ... --ckpt_path <GRPO's last.ckpt>

Results are kept in ``<out>/results.json``; a stage whose result is there is not run again (``--fresh`` reruns).
``--smoke`` runs every stage with a tiny random model in seconds (a test runs it); it writes no report.

    .venv/bin/python reproductions/reward_model.py [--grpo-steps 6] [--val-size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from support.report import ROOT, table, verdict, write_report

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
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"advlab {args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.stdout + proc.stderr


def val_accuracy(output: str) -> float:
    found = re.findall(r"val/accuracy\s*[│|]\s*([0-9.]+)", output)
    if not found:
        raise SystemExit(f"no val/accuracy in the output:\n{output[-2000:]}")
    return float(found[-1])


def wilson(p: float, n: int, z: float = 1.96) -> str:
    """The 95% Wilson score interval of a proportion p over n trials, as "[lo, hi]"."""
    if n <= 0:
        return "[n/a]"
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return f"[{max(0.0, centre - half):.2f}, {min(1.0, centre + half):.2f}]"


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
            return float("nan"), 0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, seconds per stage; no report")
    ap.add_argument("--out", type=Path, default=ROOT, help="where runs/ and results.json go (default: the repository)")
    ap.add_argument("--grpo-steps", type=int, default=6, help="GRPO optimiser steps")
    ap.add_argument("--group-size", type=int, default=4, help="GRPO's G")
    ap.add_argument("--val-size", type=int, default=32, help="held-out prompts for the accuracy (the first of the recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="rerun every stage")
    ap.add_argument("--stages", default="rm,rank,before,grpo,after",
                    help="comma-separated stages to run now (others are read from results.json, or skipped)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / ("results_smoke.json" if args.smoke else "runs/reward_model_repro/results.json")
    results = {} if args.fresh or not results_path.exists() else json.loads(results_path.read_text())

    def save() -> None:  # merged with the file: stages may run in parallel processes (--stages)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(results_path.read_text()) if results_path.exists() else {}
        results.update({k: v for k, v in on_disk.items() if k not in results})
        results_path.write_text(json.dumps(results, indent=1))

    seed = ["--seed_everything", str(args.seed)]
    steps = 1 if args.smoke else args.grpo_steps
    val = ["--data.init_args.val_size", str(4 if args.smoke else args.val_size),
           "--data.init_args.val_batch_size", str(4 if args.smoke else args.val_size)]
    policy = SMOKE_POLICY if args.smoke else []
    stages = set(args.stages.split(","))
    if stages - {"rm", "rank", "before", "grpo", "after"}:
        raise SystemExit(f"--stages: expected names from rm,rank,before,grpo,after, got {args.stages!r}")
    if "rm" not in results and "rm" in stages:
        advlab("fit", "--config", str(RM_CONFIG), *seed, *(SMOKE_RM if args.smoke else []), cwd=out)
        results["rm"] = True
        save()
    if "rank" not in results and "rank" in stages:
        results["rank"] = rank(out, args.smoke)
        print(f"  held-out pair accuracy {results['rank']['held_out']:.3f} ({results['rank']['n_held_out']} pairs)", flush=True)
        save()
    if "before" not in results and "before" in stages:
        results["before"] = val_accuracy(advlab("validate", "--config", str(BASE_CONFIG), *seed, *policy, *val, cwd=out))
        print(f"  held-out accuracy before: {results['before']:.3f}", flush=True)
        save()
    if "grpo" not in results and "grpo" in stages:
        root = out / "runs/lightning_logs"  # the CLI's TensorBoard logger writes runs/lightning_logs/version_N
        before = set(root.glob("version_*"))
        advlab("fit", "--config", str(GRPO_CONFIG), *seed, *policy, *val, "--trainer.max_steps", str(steps),
               "--model.init_args.group_size", str(2 if args.smoke else args.group_size), cwd=out)
        (run,) = set(root.glob("version_*")) - before
        results["grpo"] = str(run / "checkpoints/last.ckpt")
        results["grpo_steps"], results["group_size"] = steps, (2 if args.smoke else args.group_size)
        save()
    if "after" not in results and "after" in stages:
        results["after"] = val_accuracy(advlab("validate", "--config", str(BASE_CONFIG), *seed, *policy, *val,
                                               "--ckpt_path", results["grpo"], cwd=out))
        print(f"  held-out accuracy after: {results['after']:.3f}", flush=True)
        save()
    if any(k not in results for k in ("rank", "before", "after")):
        print(f"stages done: {sorted(results)}; the verdict needs rank, before and after", flush=True)
        return
    r = results["rank"]
    steps, args.group_size = results.get("grpo_steps", steps), results.get("group_size", args.group_size)
    ranks, raises = r["held_out"] >= 0.9, results["after"] > results["before"]
    details = (f"held-out pair accuracy {r['held_out']:.3f} ({r['n_held_out']} pairs, {r['held_out_prompts']} unseen prompts; "
               f">= 0.9: {ranks}); held-out greedy accuracy {results['before']:.3f} -> {results['after']:.3f} after "
               f"{steps} GRPO steps on the RM's scores (raised: {raises})")
    if args.smoke:
        print(f"reward_model (smoke): {details}")
        return
    line = verdict("reward_model", ranks and raises, details)
    rows = [["held-out pairs (sampled incorrect vs correct: sampled or the reference)", r["n_held_out"], f"{r['held_out']:.3f}"],
            ["  of which sampled correct vs sampled incorrect", r["n_sampled_only"], f"{r['sampled_only']:.3f}"],
            ["diagnostic: 'The answer is N.' vs same form, N off by ±1/±10", r["n_same_form"], f"{r['same_form']:.3f}"]]
    report = f"""# Neural reward model: Bradley-Terry RM on verifiable pairs, then GRPO on its scores

Claims (issue 16), thresholds fixed before the run: (1) the RM ranks held-out pairs (prompts never seen in
training) >= 90%; (2) GRPO on its scores raises held-out greedy accuracy (measured by the task's verifier).

Setup (seed {args.seed}, one seed: each stage is minutes of a shared 2-core CPU):
- task: two-digit addition (`text_reasoning.data.Arithmetic`), policy the bundled SmolLM2-135M-Instruct;
- pairs (`configs/text_reasoning/reward_model.yaml`): 2 completions per prompt sampled from the policy at its GRPO
  sampling settings (T = 1, 32 tokens), labelled by the verifier; the reference answer written "The answer is N."
  is one more correct completion (the base policy is right on only a few % of samples, so sampled-only pairs
  would be too few). {r['n_train']} training pairs from 32 training prompts; held-out pairs from {r['held_out_prompts']}
  of ReasoningData's validation prompts (GRPO's validation set), none seen in training;
- RM: SmolLM2-135M backbone + scalar head (`AutoModelForSequenceClassification`, num_labels = 1), LoRA r = 8 on the
  last 4 layers, Bradley-Terry loss, 2 epochs;
- GRPO (`configs/text_reasoning/grpo_reward_model.yaml`): reward = the RM's score only, {steps} steps of 4 prompts x
  G = {args.group_size}; accuracy = greedy on the first {args.val_size} validation prompts, before and after.

{table(["pairs", "n", "RM ranks chosen higher"], rows)}

| held-out greedy accuracy | before | after GRPO on the RM |
|---|---|---|
| {args.val_size} prompts | {results['before']:.3f} | {results['after']:.3f} |

Reading: the held-out pairs mostly oppose the reference written as "The answer is N." to a sampled wrong
completion, so they can be ranked by form alone. The same-form diagnostic (the reference against the same
sentence with N off by ±1 or ±10) shows how much of that is arithmetic: near 0.5 means the RM rewards the form,
not the sum. GRPO on such an RM teaches the policy the rewarded form; accuracy rises only as far as that form
helps the policy add. (In the seed-0 run the greedy completions after 2 steps were single equations such as
"32 + 69 = 101." or "82 + 65 equals 159.", 10 of 32 right: `advlab predict --config
configs/text_reasoning/grpo_arithmetic.yaml --data.init_args.val_size 32 --ckpt_path <GRPO's last.ckpt> --output
after.jsonl`; before, they were mostly prose that never stated the sum.)

Limits (what this run does not show): one seed; small samples (95% Wilson interval of the held-out pair accuracy
{wilson(r['held_out'], r['n_held_out'])}; greedy accuracy before {wilson(results['before'], args.val_size)}, after
{wilson(results['after'], args.val_size)}, on the same {args.val_size} prompts); {steps} GRPO steps only, because
every stage shares two CPU cores with other jobs (a GRPO step of 16 SmolLM2 rollouts took about 5 minutes of wall
time). It would have counted as not reproduced had the held-out pair accuracy been below 0.9 or the greedy
accuracy after GRPO not above the accuracy before.

Verdict: `{line}`

Commands: `.venv/bin/python reproductions/reward_model.py --grpo-steps {steps} --group-size {args.group_size} --val-size {args.val_size} --seed {args.seed}`
(stages: `advlab fit --config configs/text_reasoning/reward_model.yaml`; `advlab validate --config
configs/text_reasoning/grpo_arithmetic.yaml --data.init_args.val_size {args.val_size}`; `advlab fit --config
configs/text_reasoning/grpo_reward_model.yaml --trainer.max_steps {steps} --model.init_args.group_size {args.group_size}`;
`advlab validate ... --ckpt_path <its last.ckpt>`). This run: the stages were started separately (`--stages`, the
RM fit and the first validate by hand with the same commands), each with `OMP_NUM_THREADS=1` (two threads on a CPU
shared by many jobs ran several times slower); results in `runs/reward_model_repro/results.json`.
"""
    write_report("reward_model", report)


if __name__ == "__main__":
    main()
