"""GiGPO vs episode-level GRPO at equal episodes on the text grid world (issue 21; reports/gigpo.md holds the claim and
the verdict rules, committed before the run).

Every arm trains the same tiny character-level Llama (TinyLlama, d = 64, 2 layers, alphabet "udlr.AG\\n", one token
per turn) through ``advlab fit`` on configs/agentic/gigpo.yaml with the same overrides; the arms differ only in the
advantage estimator (GiGPO as in the recipe, or common.advantages.group.GRPO over the episodes' returns). Same
tasks, same steps x prompts x G episodes, same seeds (initialisation and sampling). Runs go to runs/repro_gigpo/
(one at a time, OMP_NUM_THREADS=1); the script then reads the TensorBoard events and writes the results into
reports/gigpo.md and prints the verdict line.

    .venv/bin/python reproductions/gigpo.py                 # 2 arms x 3 seeds x 300 steps (about 10 min CPU per run)
    .venv/bin/python reproductions/gigpo.py --steps 20 --seeds 0 --out /tmp/g   # a smoke run
    .venv/bin/python reproductions/gigpo.py --report-only  # re-read finished runs
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "reproductions"))

ARMS = {
    "gigpo": [],  # the recipe's estimator: GiGPO(gamma 0.95, omega 1, mean_std, per_turn)
    "grpo": ["--model.init_args.advantage", "common.advantages.group.GRPO"],
}
COMMON = [
    "--model.init_args.policy", "common.models.TinyLlama",
    "--model.init_args.policy.init_args.hidden_size", "64", "--model.init_args.policy.init_args.num_layers", "2",
    "--model.init_args.policy.init_args.num_heads", "4", "--model.init_args.policy.init_args.alphabet", "udlr.AG\n",
    "--model.init_args.environment.init_args.instruction", "", "--model.init_args.sampling.max_new_tokens", "1",
    "--model.init_args.episode.max_turns", "6", "--model.init_args.episode.max_total_tokens", "96",
    "--model.init_args.episode.max_observation_tokens", "16", "--model.init_args.lr", "1e-3",
    "--data.init_args.val_size", "64", "--trainer.check_val_every_n_epoch", "null",
    "--trainer.enable_progress_bar", "false",
]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def run(arm: str, seed: int, steps: int, out: Path) -> Path:
    where = out / f"{arm}_s{seed}"
    logs = where / "runs/lightning_logs/version_0"
    if (where / "done").exists():
        return logs
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/agentic/gigpo.yaml"), *COMMON,
           *ARMS[arm], "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(steps // 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(where / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=where, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (see {where / 'log.txt'})")
    (where / "done").write_text("ok\n")
    return logs


def read(logs: Path, steps: int) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    scal = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}  # noqa: E731
    reward = scal("train/reward")
    last = [v for s, v in reward.items() if s >= steps - 100]
    val = scal("val/accuracy")
    out = {"train_last100": sum(last) / len(last), "val_final": val[max(val)], "val_mid": val[min(val)],
           "train_all": sum(reward.values()) / len(reward), "curve": [reward[s] for s in sorted(reward)]}
    return out


def interval(deltas: list[float]) -> tuple[float, float, float]:
    n = len(deltas)
    mean = sum(deltas) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/repro_gigpo")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="do not write reports/gigpo.md (smoke runs)")
    args = ap.parse_args()
    res = {}
    for seed in args.seeds:
        for arm in ARMS:
            logs = args.out / f"{arm}_s{seed}/runs/lightning_logs/version_0"
            if not args.report_only:
                logs = run(arm, seed, args.steps, args.out)
            res[arm, seed] = read(logs, args.steps)
            print(f"{arm} seed {seed}: train success last 100 steps {res[arm, seed]['train_last100']:.3f}, "
                  f"greedy val {res[arm, seed]['val_final']:.3f}", flush=True)
    d_train = [100 * (res["gigpo", s]["train_last100"] - res["grpo", s]["train_last100"]) for s in args.seeds]
    d_val = [100 * (res["gigpo", s]["val_final"] - res["grpo", s]["val_final"]) for s in args.seeds]
    m, lo, hi = interval(d_train)
    mv, lov, hiv = interval(d_val)
    if m >= 5.0 and lo > 0:
        verdict = "reproduced"
    elif hi < 5.0 or m <= 0:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    line = (f"gigpo: claim {verdict}: Δ train success (last 100 steps) GiGPO − GRPO = {m:+.1f} points "
            f"[{lo:+.1f}, {hi:+.1f}] over seeds {args.seeds}; Δ greedy val success {mv:+.1f} [{lov:+.1f}, {hiv:+.1f}]")
    print(line)
    if args.no_report:
        return
    rows = [f"| {s} | {res['grpo', s]['train_last100']:.3f} | {res['gigpo', s]['train_last100']:.3f} | "
            f"{res['grpo', s]['val_final']:.3f} | {res['gigpo', s]['val_final']:.3f} | "
            f"{res['grpo', s]['train_all']:.3f} | {res['gigpo', s]['train_all']:.3f} |" for s in args.seeds]
    table = "\n".join(["| seed | GRPO train (last 100) | GiGPO train (last 100) | GRPO greedy val | GiGPO greedy val | "
                       "GRPO train (all steps) | GiGPO train (all steps) |", "|---|---|---|---|---|---|---|", *rows])
    report = ROOT / "reproductions/reports/gigpo.md"
    text = report.read_text()
    marker = "## Results"
    text = text.split(marker)[0].rstrip() + f"\n\n{marker}\n\n{table}\n\n{line}\n\nSteps {args.steps}, " \
        f"4 prompts x G = 8 episodes per step ({args.steps * 32} episodes per run), command: " \
        f"`.venv/bin/python reproductions/gigpo.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`.\n"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arm, colour in (("grpo", "tab:blue"), ("gigpo", "tab:red")):
            for s in args.seeds:
                c = res[arm, s]["curve"]
                k = 20
                smooth = [sum(c[max(0, i - k + 1): i + 1]) / len(c[max(0, i - k + 1): i + 1]) for i in range(len(c))]
                ax.plot(smooth, color=colour, alpha=0.7, label=arm if s == args.seeds[0] else None)
        ax.set_xlabel("step")
        ax.set_ylabel("train success (20-step mean)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(ROOT / "reproductions/reports/gigpo.png", dpi=100)
        text += "\n![training success](gigpo.png)\n"
    except Exception as err:  # noqa: BLE001 - the plot is optional
        print(f"plot skipped: {err}")
    report.write_text(text)


if __name__ == "__main__":
    main()
