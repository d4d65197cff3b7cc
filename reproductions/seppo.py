"""SePPO at CPU scale (arXiv 2410.05255; shared/methods/domains.md §3(e)); the pre-registration is the head of
reports/seppo.md, committed before any run.

    OMP_NUM_THREADS=1 python reproductions/seppo.py [--seeds 0 1 2] [--updates 60] [--batch 16] [--eval 128]
    python reproductions/seppo.py --smoke

A single-view base (``pretrained_base(views=1, style="broad")``, cached) is fine-tuned from the same weights per seed
by three arms with the same winners (renders in the preferred style, seeded by the update number) and the same
number of updates: SFT on the winners (the DDPM ε-loss), SePPO (uniform reference from the ring, AAF) and SePPO
without AAF (sign ≡ +1). Evaluation: the hidden preference h (IoU with the preferred rendering) over fixed-noise
samples of the held-out captions. Far below the spec's scale (300 updates x 64): the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from support.report import REPORTS, save_plot, table

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.advantages.group import GRPO  # noqa: E402
from common.batch import RolloutBatch  # noqa: E402
from common.loop import Loop, Stepper  # noqa: E402
from diffusion.multiview.data import MultiviewPrompts, render_samples  # noqa: E402
from diffusion.multiview.model import stack_views, unstack_views  # noqa: E402
from diffusion.multiview.module import build_policy  # noqa: E402
from diffusion.multiview.pretrain import PretrainConfig, denoising_loss  # noqa: E402
from diffusion.multiview.render import from_model_space  # noqa: E402
from diffusion.multiview.rewards import object_rows, preference_iou  # noqa: E402
from diffusion.multiview.seppo import CheckpointRing, SePPO, SePPOLoss  # noqa: E402

BASE = PretrainConfig(views=1, size=16, style="broad", steps=600)
ARMS = ("sft", "seppo", "seppo_no_aaf")
T_975 = {2: 4.303, 1: 12.706}


def policy():
    pol = build_policy(BASE, "ddim", num_steps=4, eta=1.0, guidance_scale=1.0)
    pol.row_invariant = False
    return pol


def h_of(images: torch.Tensor, samples) -> torch.Tensor:
    x = from_model_space(unstack_views(images.detach().float().cpu(), 1))
    return preference_iou(x, object_rows(samples))


def score(batch: RolloutBatch) -> RolloutBatch:
    h = h_of(batch.inputs["images"], batch.samples)
    return batch.replace(rewards=h, reward_components=h[:, None], reward_names=("preference_iou",))


@torch.no_grad()
def evaluate(pol, prompts, seeds) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), 64):
        ps = prompts[s:s + 64]
        b = pol.sample_batch(pol.encode([p["prompt"] for p in ps]), seeds[s:s + 64])
        out.append(h_of(b.inputs["images"], ps))
    return torch.cat(out)


def train(arm: str, seed: int, data, updates: int, batch: int, lr: float, beta: float, every: int):
    torch.manual_seed(seed)
    pol = policy()
    params = pol.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = np.random.default_rng(seed)
    flips = []
    if arm == "sft":
        alphas = BASE.scheduler().alphas_cumprod
        gen = torch.Generator().manual_seed(seed + 7)
        for u in range(updates):
            prompts = [data.train_set[i] for i in g.choice(len(data.train_set), batch, replace=False)]
            x0 = stack_views(render_samples(prompts, 1, "winner", seed=u))  # the same winners as SePPO's update u
            cond = pol.encode([p["prompt"] for p in prompts])
            t = torch.randint(BASE.num_train_timesteps, (batch,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            loss = denoising_loss(pol.denoiser, alphas, x0, cond, t, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return pol, flips
    method = SePPO(ring=CheckpointRing(7, every), reference="uniform")
    loss = SePPOLoss(beta=beta, flip="aaf" if arm == "seppo" else "off")
    loop = Loop(pol, score, GRPO(), loss, methods=[method], group_size=1)
    for _ in range(updates):
        prompts = [data.train_set[i] for i in g.choice(len(data.train_set), batch, replace=False)]
        got = loop.collect(prompts)
        m = loop.update(got.kept, Stepper(opt, params, max_grad_norm=1.0))
        flips.append(float(m["flip_frac"]))
    return pol, flips


def t_interval(x):
    n, m = len(x), float(np.mean(x))
    if n < 2:
        return m, float("nan"), float("nan")
    h = T_975.get(n - 1, 1.96) * float(np.std(x, ddof=1)) / math.sqrt(n)
    return m, m - h, m + h


def judge(diffs, sign: int) -> str:
    m, lo, hi = t_interval(diffs)
    if len(diffs) < 3:
        return "inconclusive (fewer than 3 seeds)"
    if sign * m > 0 and ((lo > 0) if sign > 0 else (hi < 0)):
        return "reproduced"
    if sign * m <= 0:
        return "not reproduced"
    return "inconclusive"


def main(argv=None) -> None:
    global BASE
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=200.0)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--base-steps", type=int, default=BASE.steps, help="pre-training steps of the base (cached by config)")
    p.add_argument("--out", default=str(REPORTS / "seppo_results.json"))
    p.add_argument("--report-only", metavar="JSON", help="write the report from a (possibly partial) results file")
    a = p.parse_args(argv)
    if a.report_only:
        res = json.load(open(a.report_only))
        for k, v in res["args"].items():
            if k not in ("report_only", "out"):
                setattr(a, k, v)
        report(res, a)
        return
    BASE = PretrainConfig(views=1, size=16, style="broad", steps=a.base_steps)
    if a.smoke:
        a.seeds, a.updates, a.batch, a.eval, a.every = a.seeds[:1], 3, 4, 16, 1
    torch.set_num_threads(1)
    t0 = time.process_time()
    data = MultiviewPrompts(views=1)
    data.setup()
    res = {"args": vars(a), "base": {}, "arms": {a_: {} for a_ in ARMS}}
    for s in a.seeds:
        prompts = [data.val_set[i % len(data.val_set)] for i in range(a.eval)]
        seeds = torch.arange(a.eval) + 1_000_003 * (s + 1)
        res["base"][s] = float(evaluate(policy(), prompts, seeds).mean())
        for arm in ARMS:
            pol, flips = train(arm, s, data, a.updates, a.batch, a.lr, a.beta, a.every)
            res["arms"][arm][s] = {"h": float(evaluate(pol, prompts, seeds).mean()), "flip_frac": flips}
            print(f"{arm} seed {s}: h {res['arms'][arm][s]['h']:.4f} (base {res['base'][s]:.4f}) "
                  f"cpu {time.process_time() - t0:.0f}s", flush=True)
            json.dump(res, open(a.out, "w"))
    res["cpu_seconds"] = time.process_time() - t0
    json.dump(res, open(a.out, "w"))
    report(res, a)


def report(res, a) -> None:
    import matplotlib.pyplot as plt

    arms = res["arms"]
    seeds = [s for s in res["base"] if all(s in arms[a_] for a_ in ARMS)]  # seeds every arm finished
    d1 = [arms["seppo"][s]["h"] - arms["sft"][s]["h"] for s in seeds]
    d2 = [arms["seppo_no_aaf"][s]["h"] - arms["sft"][s]["h"] for s in seeds]
    v1, v2 = judge(d1, +1), judge(d2, -1)
    rows = [["S1 SePPO − SFT (h)", *fmt_int(d1), v1], ["S2 SePPO w/o AAF − SFT (h, claimed < 0)", *fmt_int(d2), v2]]
    per = [["base", f"{np.mean([res['base'][s] for s in seeds]):.4f}"]] + [
        [arm, f"{np.mean([arms[arm][s]['h'] for s in seeds]):.4f}"] for arm in ARMS]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].bar(range(len(per)), [float(r[1]) for r in per])
    ax[0].set_xticks(range(len(per)), [r[0] for r in per])
    ax[0].set_title("hidden preference h (mean over seeds)")
    for s in seeds:
        ax[1].plot(arms["seppo"][s]["flip_frac"], label=f"seed {s}")
    ax[1].set_title("SePPO: fraction of flipped signs per update")
    ax[1].legend()
    fig.tight_layout()
    save_plot(fig, "seppo")
    text = open(REPORTS / "seppo.md").read().split("\n## Results")[0]
    body = ["\n## Results\n",
            f"Run: `OMP_NUM_THREADS=1 python reproductions/seppo.py --seeds {' '.join(map(str, seeds))} --updates "
            f"{a.updates} --batch {a.batch} --eval {a.eval} --lr {a.lr} --beta {a.beta} --every {a.every}` "
            f"({res.get('cpu_seconds', float('nan')):.0f} CPU s). **Scale far below the spec's** (300 updates x 64; "
            f"β not swept: {a.beta}; the ref = θ_0 / ref = latest arms were not run). Seeds finished by every arm: "
            f"{seeds}; fewer than 3 is at most inconclusive.\n\n",
            table(["arm", "h"], per), "\n\n", table(["claim (per-seed paired differences)", "mean", "95 % t-interval",
                                                   "verdict"], rows), "\n\n", "![seppo](seppo.png)\n"]
    (REPORTS / "seppo.md").write_text(text + "".join(body))
    print(f"seppo: claim {v1} (S1); S2 {v2}: SePPO − SFT {np.mean(d1):+.4f}, w/o AAF − SFT {np.mean(d2):+.4f}")


def fmt_int(d):
    m, lo, hi = t_interval(d)
    return [f"{m:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]"]


if __name__ == "__main__":
    main()
