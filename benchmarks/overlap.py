"""One-step off-policy rollouts (``common.methods.overlap.OneStepOffPolicy``) against the synchronous loop: seconds per
GRPO step when step k+1's batch is generated (a background thread, a frozen copy of the weights) while step k updates.

Work (both arms): the bundled SmolLM2-135M-Instruct in float32, two-digit addition prompts (``text_reasoning.data.
Arithmetic``) through the chat template, ``--prompts`` prompts x G = ``--group`` samples, at most ``--new-tokens``
new tokens, temperature 1, behaviour log-probs on; GRPO advantages, the clipped loss in ``RolloutCorrection``
(TIS, C = 2), one AdamW step per batch, micro-batches of 16 rows; reward: the addition's exact answer. Both arms
run the same ``common.loop.Loop`` on one policy (its weights keep training across repetitions: the cost of a step
does not depend on them); the synchronous arm is the method with ``enabled=False`` (today's loop). A repetition is
``--steps`` steps of one arm (a fresh method: step 0 of the overlapped arm samples synchronously and is not
counted, nor is the synchronous arm's; the batch generated during the last step is waited for, outside the timing);
repetitions alternate A B A B after one warm-up each. Columns: seconds per step (median over repetitions of the
mean over counted steps), of which the wait for the batch (collect: the exposed rollout, scoring, advantages) and
the update, and the ratio to the synchronous step.

Where it pays: the overlapped step costs max(rollout, update) + the snapshot copy when the rollout has hardware of
its own — a separate GPU or a vLLM engine beside the trainer — and rollout + update when both compete for the same
cores. On a 2-core CPU, ``generate`` and the update share the two cores (and the GIL for ``generate``'s Python
loop), so expect little or nothing; on one GPU, HF ``generate`` at small batch leaves most of the SMs idle, so the
update can fill them (measure with ``--device cuda``).

    python benchmarks/overlap.py                       # 4 prompts x G = 8, 32 tokens, 4 steps x 3 repetitions
    python benchmarks/overlap.py --device cuda         # the same on a GPU
    python benchmarks/overlap.py --quick               # smoke test: a tiny random Llama, 2 x 2, prints only

The report is written to benchmarks/results/overlap.md only when the 1-minute load average at the start was
below half the cores (a machine shared with other work gives ratios of the sharing, not of the method), unless
``--allow-shared``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
from bench import median, progress, setup_threads, table, write_result  # noqa: E402  (before torch: threads, repo root)

import torch  # noqa: E402

SEED = 0


def build(args):
    """The policy, the prompt batches and a ``Loop`` factory (a fresh method per repetition)."""
    from common.advantages.group import GRPO
    from common.loop import Loop, Stepper
    from common.losses.correction import RolloutCorrection
    from common.losses.ppo_clip import ClippedPolicyLoss
    from common.methods.overlap import OneStepOffPolicy
    from common.models import BundledSmolLM2, TinyLlama
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling

    source = (TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet="0123456789+=", seed=SEED) if args.quick
              else BundledSmolLM2())
    policy = CausalLMPolicy(source, Sampling(max_new_tokens=args.new_tokens, temperature=1.0, logprobs=True))
    policy.model.to(args.device)
    n = args.prompts * args.steps * (2 * args.reps + 2)  # every step its own prompts
    if args.quick:  # the same sums, without importing text_reasoning (Lightning: seconds of the smoke test)
        a, b = torch.randint(10, 100, (2, n), generator=torch.Generator().manual_seed(SEED)).tolist()
        problems = [{"prompt": f"{x}+{y}", "answer": str(x + y)} for x, y in zip(a, b)]
    else:
        from text_reasoning.data import Arithmetic

        problems = [{"prompt": p.prompt, "answer": p.answer} for p in Arithmetic(digits=2, ops="+").make(n, seed=SEED)]
    batches = [problems[i : i + args.prompts] for i in range(0, n, args.prompts)]

    def score(batch):  # 1 for the exact sum in the completion's last number, else 0
        answers = [s["answer"] for s in batch.samples]
        last = [(c.replace("=", " ").split() or [""])[-1].strip(".") for c in batch.completions]
        return batch.replace(rewards=torch.tensor([float(a == b) for a, b in zip(answers, last)], device=args.device))

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=2e-5)
    stepper = Stepper(optimizer, policy.trainable_parameters(), max_grad_norm=1.0)
    loss = RolloutCorrection(ClippedPolicyLoss(eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean"), cap=2.0)

    def loop(enabled: bool) -> Loop:
        return Loop(policy, score, GRPO(scale="group", eps=1e-6), loss, methods=[OneStepOffPolicy(enabled=enabled)],
                    group_size=args.group, micro_batch_size=16)

    return policy, batches, loop, stepper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="steps per repetition (the first is not counted)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--allow-shared", action="store_true", help="write the report even if the machine was loaded")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, 2 prompts x 2, 4 tokens; print, write nothing")
    args = ap.parse_args()
    if args.steps < 2 or args.reps < 1:
        raise SystemExit(f"--steps must be >= 2 and --reps >= 1, got {args.steps} and {args.reps}")
    if args.quick:
        args.prompts, args.group, args.new_tokens, args.steps, args.reps = 2, 2, 4, 2, 1
    setup_threads()
    load_before = os.getloadavg()
    torch.manual_seed(SEED)
    policy, batches, make_loop, stepper = build(args)
    prompts = iter(batches)
    arms = {"synchronous": False, "one-step overlap": True}
    per_step: dict[str, list[float]] = {k: [] for k in arms}
    collect_s: dict[str, list[float]] = {k: [] for k in arms}
    update_s: dict[str, list[float]] = {k: [] for k in arms}

    def repetition(name: str, counted: bool) -> None:
        loop = make_loop(arms[name])
        c_s, u_s = [], []
        for k in range(args.steps):
            t0 = time.perf_counter()
            got = loop.collect(next(prompts))
            t1 = time.perf_counter()
            loop.update(got.kept, stepper)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if k > 0:  # step 0 of the overlapped arm samples synchronously: the pipeline's start, not its steady state
                c_s.append(t1 - t0), u_s.append(t2 - t1)
        pending = loop.methods[0].pending
        if pending is not None:
            pending.result()  # the batch for a step that will not run: wait, untimed
        if counted:
            collect_s[name].append(sum(c_s) / len(c_s)), update_s[name].append(sum(u_s) / len(u_s))
            per_step[name].append((sum(c_s) + sum(u_s)) / len(c_s))

    for name in arms:  # warm-up
        repetition(name, counted=False)
    for r in progress(range(args.reps), "repetitions (both arms)"):
        for name in (arms if r % 2 == 0 else reversed(list(arms))):
            repetition(name, counted=True)
    load_after = os.getloadavg()

    sync = median(per_step["synchronous"])
    rows = [[name, f"{median(per_step[name]):.2f} s", f"{median(collect_s[name]):.2f} s", f"{median(update_s[name]):.2f} s",
             f"{median(per_step[name]) / sync:.2f}x"] for name in arms]
    model = "a tiny random Llama (--quick)" if args.quick else "bundled SmolLM2-135M-Instruct (float32)"
    body = (
        f"Work: {model} on {args.device}, {args.prompts} two-digit addition prompts x G = {args.group}, at most "
        f"{args.new_tokens} new tokens, GRPO + RolloutCorrection (TIS, C = 2), one AdamW step per batch; "
        f"{args.steps} steps per repetition (the first not counted), 1 warm-up + {args.reps} repetitions per arm, "
        f"alternating. Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in load_after)}.\n\n"
        + table(["loop", "s / step (median)", "of which collect (wait for the batch)", "of which update", "vs synchronous"],
                rows)
    )
    print(body)
    shared = load_before[0] >= (os.cpu_count() or 1) / 2
    if args.quick:
        return
    if shared and not args.allow_shared:
        print(f"not written: the 1-minute load average was {load_before[0]:.2f} at the start (>= half the "
              f"{os.cpu_count()} cores: the machine was shared); rerun on an idle machine or pass --allow-shared")
        return
    write_result("overlap", "One-step off-policy rollouts vs the synchronous loop", body)


if __name__ == "__main__":
    main()
