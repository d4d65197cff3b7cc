"""Resumable training of the MedScope frame-feature policy through the Loop (the reproduction's arms, as a command).

    python -m multimodal.medscope.train --out runs/medscope_toy --steps 50 --advantage ga
    python -m multimodal.medscope.train --out runs/medscope_toy --steps 50 --advantage ga   # resumes from last.pt

After every step the whole state is written atomically to ``OUT/last.pt``: the network, the AdamW state, the
Stepper's skip counters, the sampling generator's state, torch's global RNG state and the step; a run started with
an existing ``last.pt`` continues from it, so a run killed at any point (SIGKILL included) and restarted ends with
exactly the weights of an uninterrupted run. ``--kill-after K`` SIGKILLs the process itself right after step K's
checkpoint (for the kill-and-resume test). Prints one line of metrics per step.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

from common.advantages.group import GRPO
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from multimodal.medscope import toy
from multimodal.medscope.advantage import GAGRPO
from multimodal.medscope.env import MedScopeStats


def build(args) -> tuple[toy.FramePolicy, Loop, Stepper, list[dict]]:
    torch.manual_seed(args.seed)
    policy = toy.FramePolicy(d=args.d, layers=args.layers, max_calls=args.max_calls, seed=args.seed)
    weights = toy.NO_GROUNDING if args.reward == "nogr" else toy.FULL
    advantage = GAGRPO(mode=args.mode) if args.advantage == "ga" else GRPO()
    loop = Loop(policy, toy.score(weights, args.max_calls), advantage, ClippedPolicyLoss(aggregation="token_mean"),
                methods=[MedScopeStats(args.max_calls)], group_size=args.group_size, provided=("correct",))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=1.0)
    return policy, loop, stepper, toy.tasks(args.train_size, args.seed)


def state(policy: toy.FramePolicy, stepper: Stepper, step: int) -> dict:
    return {"net": policy.net.state_dict(), "optimizer": stepper.optimizer.state_dict(),
            "skipped": stepper.skipped.clone(), "consecutive": stepper.consecutive.clone(),
            "generator": policy.generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of last.pt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--advantage", choices=("grpo", "ga"), default="ga")
    p.add_argument("--mode", choices=("multiplicative", "additive"), default="multiplicative")
    p.add_argument("--reward", choices=("full", "nogr"), default="full")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--max-calls", type=int, default=3)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-after", type=int, default=None)
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "group_size", "d", "layers", "train_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    torch.set_num_threads(1)
    policy, loop, stepper, train = build(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, start = out / "last.pt", 0
    if ckpt.exists():
        s = torch.load(ckpt, map_location="cpu", weights_only=True)
        policy.net.load_state_dict(s["net"])
        stepper.optimizer.load_state_dict(s["optimizer"])
        stepper.skipped.copy_(s["skipped"]), stepper.consecutive.copy_(s["consecutive"])
        policy.generator.set_state(s["generator"])
        torch.set_rng_state(s["torch_rng"])
        start = int(s["step"])
        print(f"resumed from {ckpt} at step {start}", flush=True)
    metrics = {}
    for step in range(start, args.steps):
        idx = [(step * args.prompts + i) % len(train) for i in range(args.prompts)]
        collected = loop.collect([train[i] for i in idx])
        metrics = {k: float(v) for k, v in loop.update(collected.kept, stepper).items()}
        metrics["reward"] = float(collected.seen.rewards.mean())
        tmp = out / "last.pt.tmp"
        torch.save(state(policy, stepper, step + 1), tmp)
        os.replace(tmp, ckpt)
        print(f"step {step + 1}: " + " ".join(f"{k}={metrics[k]:.4f}" for k in
                                               ("reward", "miou", "r_at_0.5", "answer_accuracy", "tool_calls", "frames_read")), flush=True)
        if args.kill_after is not None and step + 1 == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return metrics


if __name__ == "__main__":
    main()
