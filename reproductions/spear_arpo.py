"""SPEAR (arXiv 2509.22601) and ARPO (arXiv 2505.16282): replaying the agent's own successes, at CPU scale.

Three pre-registered checks (reports/spear_arpo.md, "## Pre-registration", committed before the first run), all on the
library's code: the real ``common.loop.Loop`` over a tabular bandit policy (``common.policies.toy.TabularPolicy``),
``common.methods.arpo.ARPO``, ``common.methods.spear.SPEAR`` and ``common.losses.entropy.ClipCovLoss``:

    A  ARPO vs GRPO on 8 bandits of 20 candidate trajectories, P0 = 0.02, G = 8, 30 updates, 30 seeds (agentic.md §8 (e))
    B  Clip-Cov vs vanilla PG: entropy drop after one SGD step on a 50-arm bandit, 50 seeds (agentic.md §7 (e) 4)
    C  Dr.GRPO + SPEAR self-imitation vs Dr.GRPO on the bandit of A, 30 seeds (our toy analogue)

    OMP_NUM_THREADS=1 python reproductions/spear_arpo.py      # writes reproductions/reports/spear_arpo.{md,png}

``--smollm2``: ARPO vs episode-level GRPO with the bundled SmolLM2-135M on the calculator JSON tool environment, through
``advlab fit`` on configs/agentic/grpo_calculator_json.yaml (the ARPO arm adds ``common.methods.arpo.ARPO`` with
arpo.yaml's settings to ``methods``), seeds 0-2, held-out greedy success at the last step; the claim and the verdict
rules are the report's section "SmolLM2" (pre-registered before any run; SMOL_RULES below applies them). Stages go to
runs/repro_arpo_smollm2/<stage>/ (finished stages are skipped), results.json after each.

    OMP_NUM_THREADS=1 python reproductions/spear_arpo.py --smollm2            # the pre-registered run (hours of CPU)
    python reproductions/spear_arpo.py --smollm2 --smoke                      # builds and checks the stages (<= 10 s)
"""

from __future__ import annotations

from support.report import REPORTS, mean_ci, overall, plt, save_plot, table, verdict  # the repository root on sys.path, Agg

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.entropy import ClipCovLoss
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.arpo import ARPO
from common.methods.spear import SPEAR
from common.policies.toy import TabularPolicy
from common.progress import progress

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, K, G, STEPS, LR, P0, SEEDS = 8, 20, 8, 30, 0.5, 0.02, 30
CC_SEEDS, CC_ARMS, CC_TOKENS = 50, 50, 512

def bandit_run(arm: str, seed: int) -> tuple[float, float, list[float], int]:
    """One seed of arm "grpo", "arpo", "drgrpo", "spear" or "spear_bs2" (exploratory: buffer_size 2). Returns (final
    mean P(success), non-degenerate group fraction over the updates, the P curve, replay rows trained on)."""
    gen = torch.Generator().manual_seed(seed)
    correct_answer = torch.randint(0, K, (PROMPTS,), generator=gen)
    policy = TabularPolicy(PROMPTS, K).double()
    policy.generator = gen
    with torch.no_grad():
        policy.logits.zero_()
        policy.logits[torch.arange(PROMPTS), correct_answer] = math.log(P0 / ((1 - P0) / (K - 1)))

    def score(b: RolloutBatch) -> RolloutBatch:
        ok = b.completion_ids[:, 0] == correct_answer[b.inputs["prompt"]]  # (B,)
        return b.replace(rewards=ok.double(), correct=ok, num_turns=torch.ones(b.batch_size, dtype=torch.long))

    seen = []

    def estimator(b: RolloutBatch) -> torch.Tensor:  # records the groups' degeneracy after any injection
        r, g = b.rewards, b.group_ids
        lo = torch.full((int(g.max()) + 1,), 2.0, dtype=r.dtype).scatter_reduce(0, g, r, "amin")
        hi = torch.full((int(g.max()) + 1,), -1.0, dtype=r.dtype).scatter_reduce(0, g, r, "amax")
        seen.append(float((hi > lo).double().mean()))
        return grpo(r, g, scale="group" if arm in ("grpo", "arpo") else "none")

    methods = {"arpo": [ARPO(key="prompt", seed=seed)],
               "spear": [SPEAR(tool_schedule="none", buffer_size=16, tolerate_steps=5, replay_coef=1.0, replay_steps=10,
                               seed=seed)],
               "spear_bs2": [SPEAR(tool_schedule="none", buffer_size=2, tolerate_steps=5, replay_coef=1.0, replay_steps=10,
                                   seed=seed)]}.get(arm, [])
    estimator.min_group_size = 2
    # minibatches of one task's G rows: the tasks' logit rows are disjoint, so the 8 SGD steps of an update are one
    # step of the per-task mean gradient −(1/G) Σ A ∇log π (the normalisation the spec's lr 0.5 is for); ratio 1
    loop = Loop(policy, score, estimator, ClippedPolicyLoss(), methods=methods, group_size=G, minibatch_size=G,
                provided=("correct", "num_turns"))
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=LR), params, max_grad_norm=0.0)
    prompts = [{"prompt": f"q{i}", "index": i} for i in range(PROMPTS)]
    curve, replayed = [], 0
    for _ in range(STEPS):
        curve.append(float(torch.softmax(policy.logits.detach(), 1)[torch.arange(PROMPTS), correct_answer].mean()))
        metrics = loop.update(loop.collect(prompts).kept, stepper)
        replayed += int(metrics.get("spear/replay_rows", torch.zeros(())))
    final = float(torch.softmax(policy.logits.detach(), 1)[torch.arange(PROMPTS), correct_answer].mean())
    return final, statistics.fmean(seen), curve + [final], replayed


def entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits, -1)
    return float(-(p * torch.log(p)).sum())


def clip_cov_drop(seed: int, clip_cov: bool) -> float:
    """Entropy drop of one SGD step (lr 1) on a 50-arm softmax from 512 sampled tokens with U(0, 1) rewards."""
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(CC_ARMS, generator=g, dtype=torch.float64)
    a = torch.multinomial(torch.softmax(theta0, 0), CC_TOKENS, replacement=True, generator=g)  # (N,)
    r = torch.rand(CC_TOKENS, generator=g, dtype=torch.float64)
    adv = (r - r.mean())[None, :]  # (1, N)
    theta = theta0.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, 0)[a][None, :]  # (1, N) one row of N tokens
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss_fn = (ClipCovLoss(ratio=0.1, lb=0.5, ub=100.0, seed=seed, aggregation="token_mean") if clip_cov
               else ClippedPolicyLoss(aggregation="token_mean"))
    loss_fn(lp, lp.detach(), adv, mask).loss.backward()
    with torch.no_grad():
        theta1 = theta0 - 1.0 * theta.grad
    return entropy(theta0) - entropy(theta1)


def main() -> None:
    torch.set_num_threads(1)
    res = {arm: [bandit_run(arm, s) for s in progress(range(SEEDS), f"spear_arpo: {arm}, seeds")]
           for arm in ("grpo", "arpo", "drgrpo", "spear", "spear_bs2")}
    final = {k: [x[0] for x in v] for k, v in res.items()}
    nondeg = {k: [x[1] for x in v] for k, v in res.items()}
    replays = {k: statistics.fmean(x[3] for x in v) for k, v in res.items()}
    mean = {k: statistics.fmean(v) for k, v in final.items()}
    nd = {k: statistics.fmean(v) for k, v in nondeg.items()}
    # A: ARPO
    dA = [a - b for a, b in zip(final["arpo"], final["grpo"])]
    mA, loA, hiA = mean_ci(dA)
    ratio_p, ratio_nd = mean["arpo"] / max(mean["grpo"], 1e-12), nd["arpo"] / max(nd["grpo"], 1e-12)
    ratios = ratio_p >= 3 and ratio_nd >= 2
    vA = "reproduced" if ratios and loA > 0 else ("not reproduced" if not ratios or hiA <= 0 else "inconclusive")
    # B: Clip-Cov
    drops = [(clip_cov_drop(s, True), clip_cov_drop(s, False)) for s in range(CC_SEEDS)]
    smaller = sum(cc < pg for cc, pg in drops)
    vB = "reproduced" if smaller >= 48 else ("not reproduced" if smaller <= 44 else "inconclusive")
    # C: SPEAR self-imitation
    dC = [a - b for a, b in zip(final["spear"], final["drgrpo"])]
    mC, loC, hiC = mean_ci(dC)
    vC = "reproduced" if loC > 0 else ("not reproduced" if hiC < 0 or mC <= 0 else "inconclusive")
    dX = [a - b for a, b in zip(final["spear_bs2"], final["drgrpo"])]  # exploratory, not pre-registered
    mX, loX, hiX = mean_ci(dX)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = list(range(STEPS + 1))
    for arm, c in (("grpo", "C1"), ("arpo", "C0"), ("drgrpo", "C3"), ("spear", "C2"), ("spear_bs2", "C4")):
        curves = torch.tensor([r[2] for r in res[arm]])
        ax[0].plot(x, curves.mean(0), color=c, label=arm)
    ax[0].set(xlabel="update", ylabel="mean P(success)", title=f"8 bandits x {K} candidates, P0 = {P0}, G = {G}")
    ax[0].legend()
    ax[1].hist([cc - pg for cc, pg in drops], bins=20, color="C0")
    ax[1].axvline(0, color="k", lw=0.8)
    ax[1].set(xlabel="entropy drop: Clip-Cov − vanilla", ylabel="seeds", title="one SGD step, 50-arm bandit")
    fig.tight_layout()
    save_plot(fig, "spear_arpo", dpi=110)

    rows = [("A. ARPO: final P(success), 30 seeds", f"GRPO {mean['grpo']:.3f}, ARPO {mean['arpo']:.3f} (x{ratio_p:.1f})",
             f"ARPO − GRPO {mA:+.3f} [{loA:+.3f}, {hiA:+.3f}]", vA),
            ("A. non-degenerate groups (after injection)", f"GRPO {nd['grpo']:.3f}, ARPO {nd['arpo']:.3f} (x{ratio_nd:.1f})", "", ""),
            ("B. Clip-Cov: entropy drop smaller than vanilla", f"{smaller}/{CC_SEEDS} seeds",
             f"mean drop {statistics.fmean(d[0] for d in drops):.4f} vs {statistics.fmean(d[1] for d in drops):.4f} nats", vB),
            ("C. SPEAR self-imitation: final P(success), 30 seeds", f"Dr.GRPO {mean['drgrpo']:.3f}, SPEAR {mean['spear']:.3f}",
             f"SPEAR − Dr.GRPO {mC:+.3f} [{loC:+.3f}, {hiC:+.3f}]", vC),
            ("C. replayed rows trained on per seed (30 updates)", f"SPEAR {replays['spear']:.1f}", "", ""),
            ("exploratory (not pre-registered): SPEAR with buffer_size 2", f"SPEAR {mean['spear_bs2']:.3f}, "
             f"{replays['spear_bs2']:.1f} replayed rows per seed", f"− Dr.GRPO {mX:+.3f} [{loX:+.3f}, {hiX:+.3f}]", "–")]
    details = (f"A {vA} (ARPO {mean['arpo']:.3f} vs GRPO {mean['grpo']:.3f}, x{ratio_p:.1f}; non-degenerate x{ratio_nd:.1f}); "
               f"B {vB} ({smaller}/{CC_SEEDS}); C {vC} (SPEAR − Dr.GRPO {mC:+.3f} [{loC:+.3f}, {hiC:+.3f}])")
    line = verdict("spear_arpo", overall([vA, vB, vC]), details, echo=False)
    path = REPORTS / "spear_arpo.md"
    text = path.read_text()
    pre = text.split("\n## Results")[0].rstrip() + "\n"
    smol = text[text.index("\n## SmolLM2"):] if "\n## SmolLM2" in text else ""  # the SmolLM2 section is kept
    path.write_text(pre + f"""
## Results

Command: `OMP_NUM_THREADS=1 python reproductions/spear_arpo.py` (CPU). Intervals: 95% t-intervals of the per-seed
difference (paired by seed: both arms see the same tasks and initial policy; their samples differ once they diverge).

{table(("check", "measured", "difference", "verdict"), rows)}

![curves and entropy drops](spear_arpo.png)

Verdict line: `{line}`

Deviation, stated: a one-seed timing check before this run used the loss's mean over all 64 rows of an update
(8 tasks x G), under which lr 0.5 barely moves any arm (GRPO 0.020 -> 0.022); the run above uses one minibatch per
task (the per-task mean gradient, which the spec's lr 0.5 and its GRPO 0.09 / ARPO 0.64 imply). Nothing else was
changed; C's settings are the pre-registered ones.

Reading: A and C are the claims' direction on a bandit where a replayed success is exactly as good as a fresh one
(no staleness, no off-policy drift of a language model's tokens); B is the Clip-Cov mechanism on one step. None of this
measures the papers' agent benchmarks. C's replay never fired with the pre-registered buffer_size 16: at P0 = 0.02
an update has one or two rows of positive advantage, and rows older than 5 updates are evicted, so the buffer never
held the 1.5 x 16 = 24 rows that trigger a replay; the arms are then identical (same seeds, same draws), and the
pre-registered verdict is about that setting. The exploratory run (buffer_size 2, chosen after seeing C; not a
verdict) replays about 22 rows per seed and gains {mX:+.3f} [{loX:+.3f}, {hiX:+.3f}] in final P(success): the
mechanism helps when it runs, but SPEAR's trigger is sized for the paper's 2048-row buffer and large batches.
""" + smol)
    print(line)


SMOL_STEPS, SMOL_SEEDS = 12, (0, 1, 2)
ARPO_METHODS = json.dumps([
    {"class_path": "common.methods.arpo.ARPO",  # configs/agentic/arpo.yaml's settings
     "init_args": {"signal": "rewards", "success_threshold": 0.1, "std_max": 0.05, "mean_max": 0.2, "per_task": 8,
                   "key": "prompt"}},
    {"class_path": "common.methods.episode_stats.EpisodeStats"}])


def smol_commands(steps: int = SMOL_STEPS, seeds=SMOL_SEEDS) -> dict[str, list[str]]:
    """Every stage's ``advlab`` arguments: the zero-shot start's held-out success, then GRPO and ARPO per seed."""
    config = ["--config", str(ROOT / "configs/agentic/grpo_calculator_json.yaml"), "--trainer.check_val_every_n_epoch",
              "null", "--trainer.enable_progress_bar", "false"]
    cmds = {"start": ["validate", *config, "--seed_everything", "0"]}
    for seed in seeds:
        for arm, extra in (("grpo", []), ("arpo", ["--model.init_args.methods", ARPO_METHODS])):
            cmds[f"{arm}_s{seed}"] = ["fit", *config, *extra, "--seed_everything", str(seed), "--trainer.max_steps",
                                      str(steps), "--trainer.val_check_interval", str(steps)]
    return cmds


def smol_rule(arpo: list[float], grpo: list[float], grpo_train: list[float]) -> tuple[str, tuple[float, float, float]]:
    """The pre-registered verdict (report section "SmolLM2"): held-out success in points, paired over seeds."""
    from support.report import diff_ci

    d = diff_ci([100 * a for a in arpo], [100 * b for b in grpo])
    if max(grpo_train) == 0:  # the buffer never fills: the arms are the same algorithm
        return "inconclusive", d
    if d[0] >= 5 and d[1] > 0:
        return "reproduced", d
    if d[2] < 5 or d[0] <= 0:
        return "not reproduced", d
    return "inconclusive", d


def smol_main(smoke: bool) -> None:
    sys.path.insert(0, str(ROOT / "reproductions"))
    from gigpo import smol_read, smol_stage  # the same stage runner and TensorBoard reader as gigpo.py --smollm2

    from support.report import fmt_ci

    cmds = smol_commands()
    if smoke:
        methods = json.loads(cmds["arpo_s0"][cmds["arpo_s0"].index("--model.init_args.methods") + 1])
        assert [m["class_path"] for m in methods] == ["common.methods.arpo.ARPO", "common.methods.episode_stats.EpisodeStats"]
        assert all(Path(a).is_file() for c in cmds.values() for a in c if a.endswith(".yaml"))
        v, d = smol_rule([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.1, 0.1, 0.1])
        print(verdict("spear_arpo-smollm2", "inconclusive", f"smoke: {len(cmds)} stages; rule check on made-up numbers: "
                      f"{v} ({fmt_ci(d, 1, True)})", echo=False))
        return
    out = ROOT / "runs/repro_arpo_smollm2"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for name, argv in cmds.items():
        res[name] = smol_read(smol_stage(name, argv, out))
        path.write_text(json.dumps(res, indent=1))
        print(f"{name}: held-out greedy success {res[name]['val']:.3f}, train success {res[name]['train_mean']:.3f}",
              flush=True)
    a, g = [res[f"arpo_s{s}"]["val"] for s in SMOL_SEEDS], [res[f"grpo_s{s}"]["val"] for s in SMOL_SEEDS]
    v, d = smol_rule(a, g, [res[f"grpo_s{s}"]["train_mean"] for s in SMOL_SEEDS])
    line = verdict("spear_arpo-smollm2", v, f"Δ held-out greedy success ARPO − GRPO {fmt_ci(d, 1, True)} points over seeds "
                   f"{list(SMOL_SEEDS)}; start {res['start']['val']:.3f}", echo=True)
    report = REPORTS / "spear_arpo.md"
    text = report.read_text()
    text = text.replace("- **Status:** not run (no command of this section has been executed; the pre-registered verdict "
                        "is pending).", f"- **Result:** `{line}` ({SMOL_STEPS} steps; per seed GRPO {g}, ARPO {a}).")
    report.write_text(text)


if __name__ == "__main__":
    if "--smollm2" in sys.argv:
        smol_main("--smoke" in sys.argv)
    else:
        main()
