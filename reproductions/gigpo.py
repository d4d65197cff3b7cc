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

``--smollm2``: the same comparison with the bundled SmolLM2-135M as the agent (reports/gigpo.md, section "SmolLM2";
its pre-registration is SMOL_PREREG below, committed before the run). Stage 1 warm-starts SmolLM2 by SFT
(``common.sft.SFTModule`` through configs/agentic/sft_sokoban.yaml's parts, the examples a JSONL of generated expert
trajectories read by ``common.sft.Records``) on a 4x4 grid world; stage 2 trains both arms from that one checkpoint
through ``advlab fit`` on configs/agentic/gigpo.yaml (observations as user turns of the chat template), seeds 0-2,
and evaluates greedy success on the held-out tasks (prompts that neither the SFT data nor RL training saw). Results
go to runs/repro_gigpo_smollm2/results.json after every run, so partial results survive.

    OMP_NUM_THREADS=1 .venv/bin/python reproductions/gigpo.py --smollm2          # the pre-registered run
    .venv/bin/python reproductions/gigpo.py --smollm2 --smoke                    # checks the stages' inputs (<= 10 s)
    .venv/bin/python reproductions/gigpo.py --smollm2 --report-only              # re-read finished runs
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

from support.report import mean_ci  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/repro_gigpo")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="do not write reports/gigpo.md (smoke runs)")
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2 comparison (SFT warm start + RL, 4x4 grid)")
    ap.add_argument("--smoke", action="store_true", help="with --smollm2: check the stages' inputs only (<= 10 s)")
    ap.add_argument("--set", nargs="+", default=None, help="with --smollm2: scale overrides key=value (pilots)")
    ap.add_argument("--only", nargs="+", default=None, help="with --smollm2: run only these stages (sft, start, <arm>_s<seed>)")
    args = ap.parse_args()
    if args.smollm2:
        return smol_main(args)
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
    m, lo, hi = mean_ci(d_train, one_seed_half=math.nan)
    mv, lov, hiv = mean_ci(d_val, one_seed_half=math.nan)
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


# ---------------------------------------------------------------------------------------------------- SmolLM2 mode

SMOL_INSTRUCTION = "Move A to G on the grid. Answer with one letter: u (up), d (down), l (left) or r (right).\n"
SMOL = dict(size=4, sft_steps=40, sft_batch=16, sft_lr=1e-4, rl_steps=12, prompts=2, group=8, max_turns=6, lr=2e-5,
            val_size=48, levels=400, seeds=(0, 1, 2))  # the pre-registered scale (SMOL_PREREG); --smoke shrinks it
SMOL_PREREG = dict(
    claim="GiGPO (anchor-state step groups, γ 0.95, ω 1, mean_std) raises held-out greedy success of an SFT-warm-started "
          "SmolLM2-135M agent on a 4x4 text grid world over episode-level GRPO at equal episodes (paper, 1.5B-7B on "
          "ALFWorld / WebShop: > +9 to +12 points; our threshold +5 points).",
    control="episode-level GRPO (common.advantages.group.GRPO, scale group, eps 1e-6) from the same SFT checkpoint, the "
            "same tasks, steps x prompts x G episodes, PPO-clip loss, lr, seed; only the advantage differs.",
    seeds=[0, 1, 2],
    not_reproduced_if="the paired difference Δ = GiGPO − GRPO in held-out greedy success (points, 95 % t-interval over "
                      "the 3 seeds) has its upper end < +5, or its mean <= 0. Reproduced: mean Δ >= +5 and the lower end > 0.",
    inconclusive_if="anything else, and in any case when the GRPO control moved held-out success by less than 5 points "
                    "from the SFT start in mean over seeds (too little training for a difference in learning to show).",
)


def smol_settings(smoke: bool) -> dict:
    if smoke:
        return {**SMOL, "sft_steps": 1, "sft_batch": 2, "rl_steps": 1, "prompts": 1, "group": 2, "max_turns": 2,
                "val_size": 4, "levels": 8, "seeds": (0,)}
    return dict(SMOL)


def grid_expert_path(size: int, start: tuple[int, int], goal: tuple[int, int], rng) -> list[tuple[tuple[int, int], str]]:
    """A shortest path from ``start`` to ``goal`` as (agent cell, move letter) pairs, the order of the vertical and
    horizontal moves drawn by ``rng`` (every shortest path is an expert trajectory)."""
    dr, dc = goal[0] - start[0], goal[1] - start[1]
    moves = ["d" if dr > 0 else "u"] * abs(dr) + ["r" if dc > 0 else "l"] * abs(dc)
    rng.shuffle(moves)
    out, cell = [], start
    for m in moves:
        out.append((cell, m))
        step = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}[m]
        cell = (cell[0] + step[0], cell[1] + step[1])
    assert cell == goal
    return out


def smol_data(cfg: dict):
    """The RL data module's split (text_reasoning.data.ReasoningData with the run's settings: the held-out tasks) and
    the SFT records: every state along an expert path of generated tasks (seed 10_000, apart from the RL seeds),
    prompt = the environment's first observation for that state (instruction + rendering), response = the move;
    states whose rendering is a held-out task's prompt are dropped, so the evaluation panel is unseen by SFT too."""
    import random

    from text_reasoning.data import ReasoningData
    from text_reasoning.envs.grid import GridTasks, render

    data = ReasoningData(tasks=[GridTasks(cfg["size"])], train_size=2048, val_size=cfg["val_size"],
                         prompts_per_step=cfg["prompts"], val_batch_size=cfg["val_size"])
    data.setup("fit")
    held_out = {s["prompt"] for s in data.val_set}
    rng, records = random.Random(10_000), []
    for p in GridTasks(cfg["size"]).make(cfg["levels"], 10_000):
        goal = tuple(p.meta["goal"])
        for cell, move in grid_expert_path(cfg["size"], tuple(p.meta["start"]), goal, rng):
            state = render(cfg["size"], cell, goal)
            if state not in held_out:
                records.append({"prompt": SMOL_INSTRUCTION + state, "response": move})
    return data, records


def smol_common(cfg: dict, sft_dir: Path) -> list[str]:
    tasks = '[{"class_path": "text_reasoning.envs.grid.GridTasks", "init_args": {"size": %d}}]' % cfg["size"]
    return ["--model.init_args.policy", "common.models.Pretrained",
            "--model.init_args.policy.init_args.name_or_path", str(sft_dir),
            "--model.init_args.episode.observation_role", "user",
            "--model.init_args.episode.max_turns", str(cfg["max_turns"]),
            "--model.init_args.episode.max_total_tokens", "320", "--model.init_args.episode.max_observation_tokens", "32",
            "--model.init_args.sampling.max_new_tokens", "3", "--model.init_args.group_size", str(cfg["group"]),
            "--model.init_args.lr", str(cfg["lr"]), "--data.init_args.tasks", tasks,
            "--data.init_args.val_size", str(cfg["val_size"]), "--data.init_args.val_batch_size", str(cfg["val_size"]),
            "--data.init_args.prompts_per_step", str(cfg["prompts"]),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_progress_bar", "false"]


SMOL_ARMS = {
    "gigpo": [],  # the recipe's estimator (configs/agentic/gigpo.yaml)
    "grpo": ["--model.init_args.advantage", "common.advantages.group.GRPO",
             "--model.init_args.advantage.init_args.scale", "group", "--model.init_args.advantage.init_args.eps", "1e-6"],
}


def smol_commands(cfg: dict, out: Path) -> dict[str, list[str]]:
    """Every stage's ``advlab`` argument list (after ``python -m common.cli``), by stage name."""
    sft_dir = out / "sft/model"
    sources = '[{"class_path": "common.sft.Records", "init_args": {"path": "%s"}}]' % (out / "experts.jsonl")
    cmds = {"sft": ["fit", "--config", str(ROOT / "configs/agentic/sft_sokoban.yaml"),
                    "--data.init_args.sources", sources, "--data.init_args.train_size", "null",
                    "--data.init_args.val_size", "16", "--data.init_args.batch_size", str(cfg["sft_batch"]),
                    "--data.init_args.val_batch_size", "16", "--model.init_args.verifier", "null",
                    "--model.init_args.lr", str(cfg["sft_lr"]), "--model.init_args.output_dir", str(sft_dir),
                    "--trainer.max_steps", str(cfg["sft_steps"]), "--trainer.enable_progress_bar", "false",
                    "--seed_everything", "0"],
            "start": ["validate", "--config", str(ROOT / "configs/agentic/gigpo.yaml"), *smol_common(cfg, sft_dir),
                      "--seed_everything", "0"]}
    for seed in cfg["seeds"]:
        for arm, extra in SMOL_ARMS.items():
            cmds[f"{arm}_s{seed}"] = ["fit", "--config", str(ROOT / "configs/agentic/gigpo.yaml"),
                                      *smol_common(cfg, sft_dir), *extra, "--seed_everything", str(seed),
                                      "--trainer.max_steps", str(cfg["rl_steps"]),
                                      "--trainer.val_check_interval", str(cfg["rl_steps"])]
    return cmds


def smol_stage(name: str, argv: list[str], out: Path) -> Path:
    where = out / name
    logs = where / "runs/lightning_logs/version_0"
    if (where / "done").exists():
        return logs
    where.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    with open(where / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "common.cli", *argv], cwd=where, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (see {where / 'log.txt'})")
    (where / "done").write_text("ok\n")
    return logs


def smol_read(logs: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    scal = lambda tag: {e.step: e.value for e in acc.Scalars(tag)} if tag in tags else {}  # noqa: E731
    reward, val = scal("train/reward"), scal("val/accuracy")
    times = [e.wall_time for e in acc.Scalars("train/reward")] if "train/reward" in tags else []
    return {"val": val[max(val)] if val else float("nan"), "train_mean": sum(reward.values()) / max(len(reward), 1),
            "curve": [reward[s] for s in sorted(reward)],
            "s_per_step": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")}


def smol_main(args) -> None:
    import json

    from support.report import diff_ci, eval_record, fmt_ci, mean_ci, preregistration, split_hash, verdict

    cfg = smol_settings(args.smoke)
    for item in args.set or []:  # a pilot at another scale (not the pre-registered run): --set sft_steps=8
        key, _, value = item.partition("=")
        if key not in cfg or key == "seeds":
            raise SystemExit(f"--set: key must be one of {sorted(k for k in cfg if k != 'seeds')}, got {key!r}")
        cfg[key] = type(cfg[key])(value)
    out = (args.out if args.out != ROOT / "runs/repro_gigpo" else ROOT / "runs/repro_gigpo_smollm2").resolve()
    prereg = preregistration(**SMOL_PREREG).replace("## Pre-registered", "### Pre-registered")
    data, records = smol_data(cfg)
    cmds = smol_commands(cfg, out)
    if args.smoke:  # the stages' inputs, parsed by advlab's own parser; no model is loaded
        assert records and all(r["prompt"].startswith(SMOL_INSTRUCTION) and r["response"] in "udlr" for r in records)
        held = {s["prompt"] for s in data.val_set}
        assert not any(r["prompt"][len(SMOL_INSTRUCTION):] in held for r in records)
        verdict("gigpo-smollm2", "inconclusive", f"smoke: {len(records)} SFT records, {len(held)} held-out tasks "
                f"(split {split_hash(data.val_set)}), {len(cmds)} stages")
        return
    results_path = out / "results.json"
    res = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "experts.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        for name, argv in cmds.items():
            if args.only and name not in args.only:
                continue
            logs = smol_stage(name, argv, out)
            if name != "sft":
                res[name] = smol_read(logs)
                results_path.write_text(json.dumps(res, indent=1))
                print(f"{name}: held-out greedy success {res[name]['val']:.3f}, train success {res[name]['train_mean']:.3f}",
                      flush=True)
    seeds = [s for s in cfg["seeds"] if f"gigpo_s{s}" in res and f"grpo_s{s}" in res]
    text = "\n## SmolLM2 (SFT warm start + RL on a 4x4 grid world)\n\n" + prereg + "\n"
    text += (f"Scale: SFT {cfg['sft_steps']} steps x {cfg['sft_batch']} examples (lr {cfg['sft_lr']}, {len(records)} "
             f"expert records); RL {cfg['rl_steps']} steps x {cfg['prompts']} tasks x G = {cfg['group']} episodes "
             f"({cfg['rl_steps'] * cfg['prompts'] * cfg['group']} episodes per run), at most {cfg['max_turns']} turns, lr "
             f"{cfg['lr']}, HF generate on CPU. Command: `OMP_NUM_THREADS=1 .venv/bin/python reproductions/gigpo.py "
             f"--smollm2`.\n\n")
    text += "#" + eval_record(task=f"text grid world {cfg['size']}x{cfg['size']} (text_reasoning/envs/grid.py), reach G within "
                        f"{cfg['max_turns']} turns", prompt_template="SmolLM2 chat template; user: instruction + rendering; "
                        "observations as user turns", answer_extraction="last of u/d/l/r in the action (grid.last_move)",
                        eos_rule="a turn ends at the end-of-turn token (im_end) or after 3 new tokens",
                        sampling="greedy (evaluation)",
                        split=f"{len(data.val_set)} held-out tasks of ReasoningData seed 0 (hash {split_hash(data.val_set)})",
                        seeds=list(cfg["seeds"]))
    if len(seeds) < 2:
        line = f"gigpo-smollm2: not run (seeds with both arms finished: {seeds}); the pre-registered criteria stand"
        print(line)
        text += f"\n### Status: **not run**\n\n`{line}`\n"
    else:
        g = [100 * res[f"gigpo_s{s}"]["val"] for s in seeds]
        b = [100 * res[f"grpo_s{s}"]["val"] for s in seeds]
        start = 100 * res["start"]["val"] if "start" in res else float("nan")
        d = diff_ci(g, b)
        moved = sum(b) / len(b) - start
        if abs(moved) < 5 or not d[0] == d[0]:
            v = "inconclusive"
        elif d[0] >= 5 and d[1] > 0:
            v = "reproduced"
        elif d[2] < 5 or d[0] <= 0:
            v = "not reproduced"
        else:
            v = "inconclusive"
        line = verdict("gigpo-smollm2", v, f"Δ held-out greedy success GiGPO − GRPO = {fmt_ci(d, 1, True)} points over "
                       f"seeds {seeds}; SFT start {start:.1f}, GRPO {fmt_ci(mean_ci(b), 1) if len(b) > 1 else b}, "
                       f"GiGPO {fmt_ci(mean_ci(g), 1) if len(g) > 1 else g}")
        rows = [(s, f"{res[f'grpo_s{s}']['val']:.3f}", f"{res[f'gigpo_s{s}']['val']:.3f}",
                 f"{res[f'grpo_s{s}']['train_mean']:.3f}", f"{res[f'gigpo_s{s}']['train_mean']:.3f}",
                 f"{res[f'gigpo_s{s}']['s_per_step']:.0f}") for s in seeds]
        from support.report import table

        text += "\n### SmolLM2 results\n\n" + table(["seed", "GRPO held-out", "GiGPO held-out", "GRPO train (mean)",
                                                      "GiGPO train (mean)", "s / step (GiGPO)"], rows)
        text += f"\n{line}\n"
    if args.no_report or args.smoke:
        return
    report = ROOT / "reproductions/reports/gigpo.md"
    head, found, rest = report.read_text().partition("\n## SmolLM2 (SFT warm start")
    k = rest.find("\n## ") if found else -1  # sections after this one (a pilot's notes) are kept
    report.write_text(head.rstrip() + "\n" + text.rstrip() + "\n" + (rest[k:] if k >= 0 else ""))


if __name__ == "__main__":
    main()
