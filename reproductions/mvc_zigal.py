"""MVC-ZigAL at CPU scale (arXiv 2505.20107; shared/methods/domains.md §2(e)); the pre-registration is the head of
reports/mvc_zigal.md, committed before any run.

    OMP_NUM_THREADS=1 python reproductions/mvc_zigal.py [--seeds 0 1 2] [--iters 24] [--prompts 8] [--eval 128]
    python reproductions/mvc_zigal.py --smoke        # seconds: an untrained tiny base, 2 seeds x 1 iteration, the
                                                     # verdict line, no report
    python reproductions/mvc_zigal.py --report-only reproductions/reports/mvc_zigal_results.json

C0 (test time): base ZMV vs base standard on the same noises (ω_low 0 and 1). Training arms from the cached base
(one per seed): MV-PG (clipped PG on R_mv, two standard samples per prompt), MV-ZigAL (joint), per-view ZigAL,
MVC-ZigAL, MVC fixed λ = 1; equal samples (2 trajectories per prompt per iteration), the shared Loop with
``diffusion.multiview`` parts. Evaluation: standard sampling on held-out captions with fixed noises.
The scale is far below the spec's (150 iterations x 16 prompts, 256 eval samples): the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from support.report import (REPORTS, diff_ci, eval_record, fmt_ci, plt, preregistration, save_plot, table, verdict,
                            write_report)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.advantages.group import GRPO  # noqa: E402
from common.batch import RolloutBatch  # noqa: E402
from common.loop import Loop, Stepper  # noqa: E402
from common.losses.ppo_clip import ClippedPolicyLoss  # noqa: E402
from diffusion.multiview.data import MultiviewPrompts  # noqa: E402
from diffusion.multiview.model import unstack_views  # noqa: E402
from diffusion.multiview.module import build_policy, view_grid  # noqa: E402
from diffusion.multiview.pretrain import PretrainConfig  # noqa: E402
from diffusion.multiview.render import from_model_space  # noqa: E402
from diffusion.multiview.rewards import joint_consistency, object_rows, view_fidelity  # noqa: E402
from diffusion.multiview.zigal import LagrangianConstraint, MVCAdvantage, ZigALLoss, ZigzagFirstStep, ZigzagPairs  # noqa: E402

BASE = PretrainConfig(views=4, size=16, steps=600)  # the cached 600-step base (pinned)
SMOKE_BASE = PretrainConfig(views=4, size=16, steps=0, channels=(16, 32))  # untrained, for --smoke only
ARMS = ("pg", "zigal_joint", "zigal_per_view", "mvc", "mvc_fixed")

PREREG = preregistration(
    claim="(headline, C2) MV-ZigAL beats DDPO-style clipped PG at equal samples on joint-view consistency: "
          "R_mv(MV-ZigAL) − R_mv(MV-PG) > 0 (paper, Table 2: ZigAL above PG on every metric). Secondary, each with "
          "its own verdict: C0 base ZMV − base standard > 0 on R_mv (test-time zigzag helps); C1 R_mv(MV-ZigAL) − "
          "R_mv(base) >= 0.5 x C0's gain (internalisation recovers >= half of ZMV's gain); C3 R(MVC) > R(MV-ZigAL), "
          "R_mv(MVC) > R_mv(per-view ZigAL) and R_mv(per-view) < R_mv(base) (MVC balances both rewards)",
    control="MV-PG: DDPO-style clipped PG (ClippedPolicyLoss, clip 1e-4, token_mean over the K steps) from the same "
            "base, same prompts per iteration, same iterations, lr and optimiser, the same number of sampled "
            "trajectories (2 standard samples per prompt vs one (standard, zigzag) pair per prompt), the same "
            "advantage (the batch z-score of R_mv); evaluation on the same held-out captions and noises",
    seeds=[0, 1, 2],
    not_reproduced_if="per claim, over the 3 per-seed paired differences (diff_ci, 95% Student t, 2 df): the mean is "
                      "<= 0, or the whole interval lies below the claimed margin m (m = 0; C1: half of C0's gain). "
                      "If C0 is not reproduced, C1 is 'not tested meaningfully'",
    inconclusive_if="neither 'reproduced' (mean >= m and the interval's lower end > 0) nor 'not reproduced'; fewer "
                    "than 3 seeds finished: at most inconclusive")


def policy():
    pol = build_policy(BASE, "ddim", num_steps=4, eta=1.0, guidance_scale=4.0)
    pol.row_invariant = False  # one denoiser call on all rows (ratio 1 up to rounding; mu = 1, one minibatch)
    return pol


def rewards_of(images: torch.Tensor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Nv·3, H, W) model space -> R (B,) per-view alignment (mean over views), R_mv (B,) consistency."""
    x = from_model_space(unstack_views(images.detach().float().cpu(), BASE.views))
    return view_fidelity(x, object_rows(samples)).mean(1), joint_consistency(x)


def score(batch: RolloutBatch) -> RolloutBatch:
    r, r_mv = rewards_of(batch.inputs["images"], batch.samples)
    comps = torch.stack([r, r_mv], 1)
    return batch.replace(rewards=r_mv, reward_components=comps, reward_names=("alignment", "consistency"))


@torch.no_grad()
def evaluate(pol, prompts, seeds: torch.Tensor, first_step=None, chunk: int = 64):
    rs, rmv, imgs = [], [], []
    for s in range(0, len(prompts), chunk):
        ps = prompts[s:s + chunk]
        cond = pol.encode([p["prompt"] for p in ps])
        b = pol.sample_batch(cond, seeds[s:s + chunk], first_step=first_step)
        r, r_mv = rewards_of(b.inputs["images"], ps)
        rs.append(r), rmv.append(r_mv), imgs.append(b.inputs["images"][:4].cpu())
    return torch.cat(rs), torch.cat(rmv), torch.cat(imgs)[:4]


def eval_set(data: MultiviewPrompts, n: int, seed: int):
    prompts = [data.val_set[i % len(data.val_set)] for i in range(n)]
    seeds = torch.arange(n) + 1_000_003 * (seed + 1)
    return prompts, seeds


def make_loop(arm: str, pol, omega_low: float, pg_advantage: str = "joint_z") -> Loop:
    """The arm's loop. MV-PG's advantage is the batch z-score of R_mv (``MVCAdvantage(mode="joint")``, the one
    MV-ZigAL uses) with ``pg_advantage="joint_z"``, or GRPO's per-prompt z-score (``"group"``, the first run's)."""
    if arm == "pg":
        methods = [MVCAdvantage(mode="joint")] if pg_advantage == "joint_z" else []
        return Loop(pol, score, GRPO(), ClippedPolicyLoss(1e-4, 1e-4, aggregation="token_mean"), methods=methods,
                    group_size=2)
    mode = {"zigal_joint": "joint", "zigal_per_view": "per_view", "mvc": "constrained", "mvc_fixed": "fixed"}[arm]
    adv = MVCAdvantage(mode=mode, constraint=LagrangianConstraint(lambda_init=1.0 if arm == "mvc_fixed" else 0.0))
    return Loop(pol, score, GRPO(), ZigALLoss(1e-4, 1.0), methods=[ZigzagPairs(omega_low=omega_low), adv], group_size=2)


def train(arm: str, seed: int, data: MultiviewPrompts, iters: int, prompts_per_step: int, lr: float, omega_low: float,
          pg_advantage: str = "joint_z"):
    torch.manual_seed(seed)
    pol = policy()
    loop = make_loop(arm, pol, omega_low, pg_advantage)
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=lr, weight_decay=1e-4)
    g = np.random.default_rng(seed)
    lams, train_r = [], []
    for _ in range(iters):
        prompts = [data.train_set[i] for i in g.choice(len(data.train_set), prompts_per_step, replace=False)]
        got = loop.collect(prompts)
        m = loop.update(got.kept, Stepper(opt, pol.trainable_parameters(), max_grad_norm=5.0))
        lams.append(float(m.get("mvc_lambda", torch.tensor(float("nan")))))
        train_r.append([float(got.seen.reward_components[:, 0].mean()), float(got.seen.reward_components[:, 1].mean())])
    return pol, lams, train_r


def judge(diffs: list[float], margin: float) -> str:
    """The pre-registered rule on per-seed paired differences (the ``diff_ci`` of an arm and its control)."""
    if len(diffs) < 2:
        return "inconclusive"
    m, lo, hi = diff_ci(diffs, [0.0] * len(diffs))
    if m <= 0 or hi < margin:
        return "not reproduced"
    if m >= margin and lo > 0 and len(diffs) >= 3:
        return "reproduced"
    return "inconclusive"


def main(argv=None) -> None:
    global BASE
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--pg-advantage", choices=("joint_z", "group"), default="joint_z",
                   help="MV-PG's advantage: the batch z-score of R_mv (as MV-ZigAL's) or GRPO's per-prompt z-score")
    p.add_argument("--prediction-type", choices=("epsilon", "sample"), default="epsilon",
                   help="the base UNet's target (sample = x0-prediction; its own cached base, pre-trained on "
                        "first use)")
    p.add_argument("--arms", nargs="+", default=["pg", "zigal_joint", "zigal_per_view", "mvc"])
    p.add_argument("--smoke", action="store_true",
                   help="an untrained tiny base, arms MV-PG and MV-ZigAL, 2 seeds x 1 iteration x 1 prompt, "
                        "2 evaluation samples: the verdict line only, no report")
    p.add_argument("--no-report", action="store_true", help="write only the results file (a sensitivity run)")
    p.add_argument("--out", default=str(REPORTS / "mvc_zigal_results.json"))
    p.add_argument("--report-only", metavar="JSON", help="write the report from a (possibly partial) results file")
    a = p.parse_args(argv)
    if a.report_only:
        res = json.load(open(a.report_only))
        for k, v in res["args"].items():
            if k not in ("report_only", "out"):
                setattr(a, k, v)
        a.pg_advantage = res["args"].get("pg_advantage", "group")  # the first run's PG used GRPO's per-prompt z
        report(res, a)
        return
    BASE = PretrainConfig(views=4, size=16, steps=600, prediction_type=getattr(a, "prediction_type", "epsilon"))
    if a.smoke:
        BASE = SMOKE_BASE
        a.seeds, a.iters, a.eval, a.prompts, a.no_report = [0, 1], 1, 2, 1, True
        a.arms = ["pg", "zigal_joint"]
        a.out = os.devnull
    torch.set_num_threads(1)
    t0 = time.process_time()
    data = MultiviewPrompts(views=4)
    data.setup()
    res: dict = {"args": vars(a), "c0": {}, "arms": {}}
    # ---- C0: base ZMV vs standard on the same noises
    base = policy()
    for s in a.seeds:
        prompts, seeds = eval_set(data, a.eval, s)
        r, rmv, grid_std = evaluate(base, prompts, seeds)
        row = {"standard": [float(r.mean()), float(rmv.mean())]}
        for low in (0.0, 1.0):
            zr, zrmv, _ = evaluate(base, prompts, seeds, ZigzagFirstStep(4.0, low))
            row[f"zmv_low{low:g}"] = [float(zr.mean()), float(zrmv.mean())]
            row[f"diff_low{low:g}"] = [float((zr - r).mean()), float((zrmv - rmv).mean())]
        res["c0"][str(s)] = row
        if not a.smoke:
            print(f"C0 seed {s}: {row}  cpu {time.process_time() - t0:.0f}s", flush=True)
        if s == a.seeds[0]:
            res["grid_base"] = grid_std.tolist()
    gains = {low: [res["c0"][str(s)][f"diff_low{low:g}"][1] for s in a.seeds] for low in (0.0, 1.0)}
    omega_low = max((0.0, 1.0), key=lambda low: float(np.mean(gains[low])))
    res["omega_low"] = omega_low
    # ---- training arms
    for arm in a.arms:
        res["arms"][arm] = {}
        for s in a.seeds:
            pol, lams, train_r = train(arm, s, data, a.iters, a.prompts, a.lr, omega_low, a.pg_advantage)
            prompts, seeds = eval_set(data, a.eval, s)
            r, rmv, grid = evaluate(pol, prompts, seeds)
            res["arms"][arm][str(s)] = {"R": float(r.mean()), "R_mv": float(rmv.mean()), "lambda": lams,
                                        "train": train_r}
            if arm == "mvc" and s == a.seeds[0]:
                res["grid_mvc"] = grid.tolist()
            if not a.smoke:
                print(f"{arm} seed {s}: R {float(r.mean()):.4f} R_mv {float(rmv.mean()):.4f}  "
                      f"cpu {time.process_time() - t0:.0f}s", flush=True)
                json.dump(res, open(a.out, "w"))
    res["cpu_seconds"] = time.process_time() - t0
    if a.smoke:
        verdict("mvc_zigal", *claims(res)[:2])
        return
    json.dump(res, open(a.out, "w"))
    if not a.no_report:
        report(res, a)


def claims(res: dict) -> tuple[str, str, dict, list]:
    """(headline verdict, its details line, every claim's verdict, the claim table's rows) from a results dict."""
    c0 = res["c0"]
    base_std = {s: c0[s]["standard"] for s in c0}
    low = res["omega_low"]
    arms = {k: v for k, v in res["arms"].items() if v}  # arms with at least one finished seed
    rows, verdicts, cis = [], {}, {}

    def diff(a1, a2, key):  # per-seed (a1, a2) values over the seeds both finished
        i = 0 if key == "R" else 1
        ss = [s for s in arms[a1] if a2 == "base" or s in arms[a2]]
        return ([arms[a1][s][key] for s in ss], [arms[a2][s][key] if a2 != "base" else base_std[s][i] for s in ss])

    def add(name, key, pair, margin=0.0):
        x, y = pair
        v = judge([u - w for u, w in zip(x, y)], margin)
        ci = diff_ci(x, y) if len(x) >= 2 else (float(np.mean(x)) - float(np.mean(y)),) * 3
        rows.append([name, fmt_ci(ci, 4, signed=True), len(x), v])
        verdicts[key], cis[key] = v, ci
        return v

    zmv = [c0[s][f"zmv_low{low:g}"][1] for s in c0]
    std = [c0[s]["standard"][1] for s in c0]
    add("C0 base ZMV − base standard (R_mv)", "C0", (zmv, std))
    gain0 = float(np.mean(zmv) - np.mean(std))
    if "zigal_joint" in arms and "pg" in arms:
        add("**C2 (headline) MV-ZigAL − MV-PG (R_mv)**", "C2", diff("zigal_joint", "pg", "R_mv"))
    if "zigal_joint" in arms:
        if verdicts["C0"] == "not reproduced" or gain0 <= 0:
            x, y = diff("zigal_joint", "base", "R_mv")
            rows.append(["C1 MV-ZigAL − base (R_mv)", fmt_ci(diff_ci(x, y), 4, signed=True), len(x),
                         "not tested meaningfully (C0 not reproduced)"])
            verdicts["C1"] = "not tested meaningfully"
        else:
            add(f"C1 MV-ZigAL − base (R_mv) >= {0.5 * gain0:.4f}", "C1", diff("zigal_joint", "base", "R_mv"),
                0.5 * gain0)
    if "pg" in arms:
        add("MV-PG − base (R_mv): does training degrade the base?", "pg_vs_base", diff("pg", "base", "R_mv"))
        rows[-1][3] = "(not a claim)"
    if {"mvc", "zigal_joint", "zigal_per_view"} <= arms.keys():
        x3, y3 = diff("zigal_per_view", "base", "R_mv")
        v = [add("C3a MVC − MV-ZigAL (R)", "C3a", diff("mvc", "zigal_joint", "R")),
             add("C3b MVC − per-view ZigAL (R_mv)", "C3b", diff("mvc", "zigal_per_view", "R_mv")),
             add("C3c base − per-view ZigAL (R_mv) (per-view lowers consistency)", "C3c", (y3, x3))]
        verdicts["C3"] = ("reproduced" if all(x == "reproduced" for x in v) else
                          "not reproduced" if "not reproduced" in v else "inconclusive")
    head = verdicts.get("C2", "inconclusive")
    n = len(next(iter(arms.values()))) if arms else 0
    details = (f"R_mv MV-ZigAL − MV-PG {fmt_ci(cis['C2'], 4, signed=True) if 'C2' in cis else 'not run'} over {n} "
               f"seeds; C0 base ZMV − standard {fmt_ci(cis['C0'], 4, signed=True)} ({verdicts['C0']}); "
               f"C1 {verdicts.get('C1', 'not run')}; C3 {verdicts.get('C3', 'not run')}")
    return head, details, verdicts, rows


def report(res: dict, a) -> None:
    seeds = sorted(res["c0"], key=int)
    c0 = res["c0"]
    low = res["omega_low"]
    arms = {k: v for k, v in res["arms"].items() if v}
    done = {k: sorted(v, key=int) for k, v in arms.items()}
    head, details, verdicts, rows = claims(res)
    per_arm = [["base (standard)", *(f"{np.mean([c0[s]['standard'][i] for s in c0]):.4f}" for i in (0, 1))],
               [f"base (ZMV, ω_low {low:g})", *(f"{np.mean([c0[s][f'zmv_low{low:g}'][i] for s in c0]):.4f}" for i in (0, 1))]]
    for arm, per in arms.items():
        per_arm.append([arm, f"{np.mean([v['R'] for v in per.values()]):.4f}",
                        f"{np.mean([v['R_mv'] for v in per.values()]):.4f}"])
    other_low = 1.0 - low
    c0_other = [c0[s][f"diff_low{other_low:g}"][1] for s in c0]
    name = getattr(a, "name", "mvc_zigal")
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    names = [r[0] for r in per_arm]
    for i, key in enumerate(("R (alignment)", "R_mv (consistency)")):
        ax[i].bar(range(len(per_arm)), [float(r[1 + i]) for r in per_arm])
        ax[i].set_xticks(range(len(per_arm)), names, rotation=45, ha="right", fontsize=7)
        ax[i].set_title(key)
        lo = min(float(r[1 + i]) for r in per_arm)
        ax[i].set_ylim(lo - 0.05, None)
    for arm in ("pg", "zigal_joint", "mvc"):
        if arm in arms:
            tr = np.array([v["train"] for v in arms[arm].values()])[:, :, 1].mean(0)  # (iters,) mean over seeds
            ax[2].plot(tr, label=arm)
    ax[2].set_title("training R_mv per iteration (mean over seeds)")
    ax[2].legend()
    fig.tight_layout()
    save_plot(fig, name)
    if "grid_base" in res and "grid_mvc" in res:
        before = from_model_space(unstack_views(torch.tensor(res["grid_base"]), BASE.views))
        after = from_model_space(unstack_views(torch.tensor(res["grid_mvc"]), BASE.views))
        grid = torch.cat([view_grid(before), torch.ones(3, before.shape[-2] * before.shape[0], 2), view_grid(after)], 2)
        fig2 = plt.figure(figsize=(6, 4))
        plt.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        plt.axis("off")
        plt.title("views before (base, left) / after (MVC-ZigAL seed 0, right); same noise")
        save_plot(fig2, f"{name}_views")
    pg = ("the batch z-score of R_mv (as MV-ZigAL's)" if a.pg_advantage == "joint_z" else
          "GRPO's per-prompt z-score of R_mv (2 samples: ±0.71 whatever the gap)")
    line = verdict("mvc_zigal", head, details, echo=False)
    text = f"""# MVC-ZigAL (few-step text-to-multiview diffusion RL) at CPU scale

Paper: Zhang et al., "Refining Few-Step Text-to-Multiview Diffusion via Reinforcement Learning", arXiv 2505.20107
(CVPR 2026; code `ZiyiZhang27/MVC-ZigAL`). Spec: `shared/methods/domains.md` §2(e). Script:
`reproductions/mvc_zigal.py` (the pre-registration below is the script's `PREREG`, fixed before the runs).

{PREREG}
## Setup

- Base: the multiview diffusers UNet of `diffusion/multiview/model.py` (MiniLM-conditioned, 4 views stacked, 16x16),
  pre-trained 600 steps by `diffusion/multiview/pretrain.py` on the synthetic renders (cached; shared by every arm
  and seed).
- RL sampler: K = 4 stochastic DDIM steps (η = 1), CFG ω_high = 4; ZMV: zigzag at the first step only, ω_low ∈
  {{0, 1}} (the one with the larger base gain trains; both reported).
- Rewards (`diffusion/multiview/rewards.py`): per-view alignment R (mean over 4 views), joint-view consistency R_mv.
- Arms from the same base per seed, **equal samples** (2 trajectories per prompt per iteration, same prompts, same
  iterations, AdamW lr, clip 1e-4, one update per iteration, grad-norm clip 5): MV-PG (control), MV-ZigAL (joint),
  per-view ZigAL, MVC-ZigAL (adaptive λ, τ). Evaluation: standard sampling on held-out captions, fixed noises, paired.

## Results

Run: `OMP_NUM_THREADS=1 python reproductions/mvc_zigal.py --seeds {' '.join(seeds)} --iters {a.iters} --prompts
{a.prompts} --eval {a.eval} --lr {a.lr} --pg-advantage {a.pg_advantage}` ({res.get('cpu_seconds', float('nan')):.0f}
CPU s). MV-PG's advantage: {pg}. **Scale far below the paper's** ({a.iters} iterations x {a.prompts} prompts x 2
trajectories; spec 150 x 16 x 2; {a.eval} evaluation samples per seed, spec 256). ZMV for training used ω_low =
{low:g} (the other value's mean base R_mv gain: {np.mean(c0_other):+.4f}). Finished (arm: seeds): {json.dumps(done)}.

{table(["arm", "R (alignment)", "R_mv (consistency)"], per_arm)}

{table(["claim (paired over seeds)", "mean [95% CI] (diff_ci)", "seeds", "verdict"], rows)}

![arms]({name}.png)

![views]({name}_views.png)

**Verdict:** `{line}`

{eval_record(task="text-to-multiview (4 views of a coloured 3D primitive from its caption), held-out captions",
             prompt_template="the caption from diffusion.multiview.data (MiniLM-L6 embeddings, 12 tokens)",
             answer_extraction="R: view_fidelity (colour + silhouette IoU vs the caption's object), mean over views; "
                               "R_mv: joint_consistency",
             eos_rule="K = 4 denoising steps", sampling="DDIM η = 1, CFG 4, standard (no zigzag) at evaluation",
             split=f"val_set captions cycled to {a.eval}, noises seeded 1_000_003·(seed+1) + i", seeds=seeds)}"""
    write_report(name, text)
    print(line, flush=True)


if __name__ == "__main__":
    main()
