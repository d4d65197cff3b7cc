"""Micro-batches by tokens vs by rows on a workload with mixed completion lengths (one update's forward+backward).

    .venv/bin/python benchmarks/token_batches.py                 # SmolLM2-135M, 16 rows, lengths 16..256
    .venv/bin/python benchmarks/token_batches.py --quick         # smoke: tiny model, 8 rows
    .venv/bin/python benchmarks/token_batches.py --allow-shared  # write results although the machine was shared

Rows: random prompt tokens (P = 32) and random completions whose lengths are spread evenly over
[min_len, max_len] in shuffled order (what EOS leaves after sampling), right-padded to max_len; random
advantages. Each variant runs the loop's own update path over one minibatch (``Loop.micro_batches`` +
``Loop.micro_loss`` + backward, the clipped loss at ratio 1) on the same weights:

- rows: ``micro_batch_size`` rows per forward (every row padded to max_len, the path before token budgets);
- tokens: ``micro_batch_tokens`` = rows x (P + max_len) of the rows variant: rows sorted by length, packed to
  that padded-token budget, each micro-batch cut to its longest completion.

Reported: wall and CPU seconds (A B A B ...), tokens through the model (rows x padded width, summed over
micro-batches) and the max gradient difference relative to the rows variant's max |grad|. The 1-minute load
average is recorded before and after; on a shared machine (see benchmarks/logprobs.py) results are printed,
not written, unless --allow-shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import torch  # noqa: E402

from bench import fmt_s, median, progress, setup_threads, table  # noqa: E402
from packing import publish  # noqa: E402 (the shared-machine check and the write)


def make_batch(tokenizer_vocab: int, rows: int, prompt: int, min_len: int, max_len: int, seed: int = 0):
    from common.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, rows).round().long()[torch.randperm(rows, generator=g)]  # (B,)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, T)
    ids = torch.randint(3, tokenizer_vocab, (rows, max_len), generator=g) * mask  # (B, T), 0 past the end
    return RolloutBatch(completion_ids=ids, completion_mask=mask, group_ids=torch.arange(rows) // 4,
                        prompt_ids=torch.randint(3, tokenizer_vocab, (rows, prompt), generator=g),
                        prompt_mask=torch.ones(rows, prompt, dtype=torch.bool),
                        advantages=torch.randn(rows, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4, help="rows per micro-batch of the rows variant")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-shared", action="store_true")
    args = ap.parse_args()
    setup_threads(args.threads)
    load_before = os.getloadavg()
    from common.advantages.group import GRPO
    from common.loop import Loop
    from common.losses.ppo_clip import ClippedPolicyLoss
    from common.losses.aggregate import Normaliser
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling

    if args.quick:
        from common.models import TinyLlama

        source, args.rows, args.micro, args.min_len, args.max_len, args.reps = (
            TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet="0123456789", seed=0), 8, 2, 2, 12, 1)
        name = "TinyLlama (quick)"
    else:
        from common.models import BundledSmolLM2

        source, name = BundledSmolLM2(), "SmolLM2-135M-Instruct"
    policy = CausalLMPolicy(source, Sampling(max_new_tokens=args.max_len))
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    P = 8 if args.quick else 32
    batch = make_batch(vocab, args.rows, P, args.min_len, args.max_len)
    budget = args.micro * (P + args.max_len)
    loops = {"rows": Loop(policy, lambda b: b, GRPO(), ClippedPolicyLoss(), group_size=4, micro_batch_size=args.micro),
             "tokens": Loop(policy, lambda b: b, GRPO(), ClippedPolicyLoss(), group_size=4, micro_batch_tokens=budget)}
    params = list(policy.trainable_parameters())
    norm = Normaliser.of(batch.loss_mask, policy.horizon, None)

    def run(loop):
        for p in params:
            p.grad = None
        for micro in loop.micro_batches(batch)[0]:
            loop.micro_loss(micro, norm, 0)[0].loss.backward()
        return [p.grad.detach().clone() for p in params if p.grad is not None]

    tokens = {k: sum(m.batch_size * (P + m.completion_ids.shape[1]) for m in lp.micro_batches(batch)[0]) for k, lp in loops.items()}
    micros = {k: len(lp.micro_batches(batch)[0]) for k, lp in loops.items()}
    wall = {k: [] for k in loops}
    cpu = {k: [] for k in loops}
    grads = {k: run(lp) for k, lp in loops.items()}  # warm-up, and the gradients compared
    for _ in progress(range(args.reps), "rows, tokens: repetitions"):
        for k, lp in loops.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(lp)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    scale = max(g.abs().max().item() for g in grads["rows"])
    gap = max((a - b).abs().max().item() for a, b in zip(grads["rows"], grads["tokens"])) / scale
    setup = (f"{name}, {args.rows} rows, prompt {P} tokens, completion lengths {args.min_len}..{args.max_len} (evenly "
             f"spread, shuffled), {args.threads} thread(s), {args.reps} alternating reps after a warm-up. Token budget "
             f"= {args.micro} x ({P} + {args.max_len}) = {budget}.")
    body = table(["variant", "micro-batches", "tokens through the model", "wall median", "CPU median", "CPU / rows"],
                 [[k, micros[k], f"{tokens[k]:,}", fmt_s(median(wall[k])), fmt_s(median(cpu[k])),
                   f"{median(cpu[k]) / median(cpu['rows']):.2f}x"] for k in loops])
    body += f"\nmax |grad(tokens) − grad(rows)| / max |grad(rows)| = {gap:.1e} (float32 rounding: different shapes)\n"
    publish("token_batches", "Micro-batches by tokens vs by rows", setup, body, load_before, os.getloadavg(), args)

if __name__ == "__main__":
    main()
