"""Vectorised group advantages (grpo, dr_grpo, rloo) vs a per-sample Python loop over a dict of lists.

    .venv/bin/python benchmarks/advantages.py           # B = 65,536, groups of 8 and 16, shuffled ids
    .venv/bin/python benchmarks/advantages.py --quick   # smoke: B = 4,096

The loop is the structure of verl's ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``
(verl/trainer/ppo/core_algos.py): ``id2score = defaultdict(list)`` filled one sample at a time, then
``torch.mean`` / ``torch.std`` (unbiased) per group, then a loop writing each sample's advantage back. Same
eps (1e-6) and the same unbiased std as ours. Group ids are shuffled with ``torch.randperm`` (members
interleaved), rewards are uniform in [0, 1) (continuous, so no group is all-equal), float32.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import torch  # noqa: E402

from bench import alternate, fmt_s, mark, median, setup_threads, table, write_result  # noqa: E402

EPS = 1e-6


def loop_grpo(scores: torch.Tensor, index: list, eps: float = EPS, norm_adv_by_std: bool = True) -> torch.Tensor:
    """verl's compute_grpo_outcome_advantage (outcome rewards (B,), uid list) -> (B,)."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(id2score[idx])
            id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
    for i in range(bsz):
        if norm_adv_by_std:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores


def loop_dr_grpo(scores: torch.Tensor, index: list) -> torch.Tensor:
    return loop_grpo(scores, index, norm_adv_by_std=False)


def loop_rloo(scores: torch.Tensor, index: list) -> torch.Tensor:
    """verl's compute_rloo_outcome_advantage -> (B,)."""
    scores = scores.clone()
    id2score, id2mean = defaultdict(list), {}
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx] = torch.tensor(0.0)
        else:
            id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
    for i in range(bsz):
        n = len(id2score[index[i]])
        if n > 1:
            scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
    return scores


def main() -> None:
    from common.advantages.group import dr_grpo, grpo, rloo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: B = 4,096, 1 rep")
    ap.add_argument("--batch", type=int, default=65_536)
    ap.add_argument("--reps", type=int, default=15, help="timed calls of ours (spread over the loop reps)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 is the benchmark; 1 for a busy machine)")
    ap.add_argument("--loop-reps", type=int, default=3, help="reps of the (slow) loop; ours gets --reps")
    args = ap.parse_args()
    setup_threads(args.threads)
    B = 4096 if args.quick else args.batch
    reps = 1 if args.quick else args.reps
    loop_reps = 1 if args.quick else args.loop_reps
    ours = {"grpo": lambda r, g: grpo(r, g, eps=EPS), "dr_grpo": dr_grpo, "rloo": rloo}
    loops = {"grpo": loop_grpo, "dr_grpo": loop_dr_grpo, "rloo": loop_rloo}
    rows, results = [], []
    gen = torch.Generator().manual_seed(0)
    for G in (8, 16):
        gids = torch.arange(B // G).repeat_interleave(G)[torch.randperm(B, generator=gen)]  # (B,) shuffled
        rewards = torch.rand(B, generator=gen)  # (B,) float32
        index = gids.tolist()  # verl's uid array: one Python object per sample
        for name in ours:
            outs = {}
            # A B A B: ours is timed more often (it is ~1e4 times faster, so its median needs more samples),
            # by running ``k`` calls of ours per loop call and reporting the per-call median.
            k = max(1, reps // loop_reps)

            def run_ours(name=name):
                ts = []
                for _ in range(k):
                    t = __import__("time").perf_counter()
                    out = ours[name](rewards, gids)
                    ts.append(__import__("time").perf_counter() - t)
                run_ours.inner = getattr(run_ours, "inner", []) + ts
                return out

            times = alternate({"loop": lambda name=name: loops[name](rewards, index), "ours": run_ours},
                              reps=loop_reps, warmup=1, on_result=lambda kk, v: outs.__setitem__(kk, v))
            t_loop, t_ours = median(times["loop"]), median(run_ours.inner[k:])  # drop the warm-up calls
            diff = (outs["loop"] - outs["ours"]).abs().max().item()
            speed = t_loop / t_ours
            results.append((G, name, speed, diff))
            rows.append([f"{G}", name, fmt_s(t_loop), fmt_s(t_ours), f"{speed:,.0f}x", f"{diff:.1e}",
                         mark(speed >= 50), mark(diff <= 1e-6)])
    body = (f"B = {B:,} rewards (uniform [0, 1), float32), groups of G with ids shuffled by `torch.randperm`, "
            f"eps = {EPS}, unbiased std. Loop = verl's dict-of-lists structure; ours = `common.advantages.group`. "
            f"Alternating loop / ours, 1 warm-up, {loop_reps} loop reps; ours timed {max(1, reps // loop_reps)} "
            f"call(s) per round ({loop_reps * max(1, reps // loop_reps)} in all). Medians.\n\n")
    body += table(["G", "estimator", "loop (median)", "ours (median)", "speedup", "max abs diff",
                   "speedup >= 50x", "diff <= 1e-6"], rows)
    ok_speed, ok_diff = all(r[2] >= 50 for r in results), all(r[3] <= 1e-6 for r in results)
    body += (f"\nTargets: speedup >= 50x: {mark(ok_speed)} (min {min(r[2] for r in results):,.0f}x); "
             f"identical to 1e-6: {mark(ok_diff)} (max {max(r[3] for r in results):.1e}).\n")
    if args.quick:
        body = "**QUICK smoke run (B = 4,096), not the benchmark.**\n\n" + body
    suffix = ("_quick" if args.quick else "") + (f"_{args.threads}thread" if args.threads != 2 else "")
    write_result("advantages" + suffix, "Group advantages: vectorised vs per-sample loop", body)


if __name__ == "__main__":
    main()
