"""Padded rows vs token-budget micro-batches vs padding-free packing, on GRPO batches with mixed completion lengths
(one minibatch's forward + backward through the loop's own update path).

    .venv/bin/python benchmarks/packing.py                   # SmolLM2-135M's shape, 4 of its 30 layers (random init)
    .venv/bin/python benchmarks/packing.py --layers 30       # the full depth (bundled SmolLM2-135M-Instruct weights)
    .venv/bin/python benchmarks/packing.py --quick           # smoke: tiny Llama, 8 rows, lengths 2..12
    .venv/bin/python benchmarks/packing.py --allow-shared    # write results although the machine was shared

Workloads (rows = prompts x G, each group's G rows sharing one prompt; prompt lengths spread over 24..40 tokens, so
prompts are left-padded; completions right-padded to max_len, random tokens, random advantages):

- spread: completion lengths evenly over [min_len, max_len], shuffled;
- skewed: many short and a few long rows: 3/4 of the rows at min_len..2·min_len, 1/4 at max_len/2..max_len.

Variants, all on the same weights (the loop's ``micro_batches`` + ``micro_loss`` + backward, clipped loss at ratio 1):

- padded rows: ``micro_batch_size`` = micro rows, each micro-batch padded to max_len (group prompts shared);
- token micro-batches: ``micro_batch_tokens`` = micro x (P + max_len): rows sorted by length, cut to the widest;
- packed rows: ``pack=True`` with ``micro_batch_size``: each micro-batch one packed row (no padding, prompts once);
- packed tokens: ``pack=True`` with the token budget.

Reported: median wall and CPU seconds over alternating repetitions (A B C D A B C D ...), their ratio to padded
rows, the tokens through the decoder (counted at the embedding), the largest micro-batch's activations kept for
backward (bytes of the tensors autograd saves, summed: an upper bound of the activation peak, as views share
storage) and the max gradient difference relative to padded rows' max |grad|. The 1-minute load average is
recorded before and after; on a shared machine the results are printed, not written, unless --allow-shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import torch  # noqa: E402

from bench import fmt_bytes, fmt_s, median, progress, setup_threads, table, write_result  # noqa: E402

SHARED_LOAD = 0.5
VARIANTS = ("padded rows", "token micro-batches", "packed rows", "packed tokens")


class SmolLM2Shape:
    """SmolLM2-135M's configuration with ``layers`` decoder layers, randomly initialised (seeded), with its tokenizer:
    the real model's shapes at a depth this CPU can time in minutes (a PolicySource)."""

    def __init__(self, layers: int, seed: int = 0):
        self.layers, self.seed = layers, seed

    def load(self):
        from transformers import AutoConfig, LlamaForCausalLM

        from common.models import bundled_smollm2_path, load_tokenizer

        cfg = AutoConfig.from_pretrained(bundled_smollm2_path(), num_hidden_layers=self.layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(cfg)
        return model, load_tokenizer(bundled_smollm2_path())


def completion_lengths(kind: str, rows: int, min_len: int, max_len: int, g: torch.Generator) -> torch.Tensor:
    """(B,) long completion lengths of the workload, in shuffled order."""
    if kind == "spread":
        lengths = torch.linspace(min_len, max_len, rows).round().long()
    else:  # skewed: 3/4 short, 1/4 long
        n_long = max(rows // 4, 1)
        short = torch.randint(min_len, 2 * min_len + 1, (rows - n_long,), generator=g)
        long = torch.randint(max_len // 2, max_len + 1, (n_long,), generator=g)
        lengths = torch.cat([short, long])
    return lengths[torch.randperm(rows, generator=g)]


def make_batch(vocab: int, rows: int, G: int, prompt: tuple[int, int], lengths: torch.Tensor, max_len: int, seed: int = 0):
    """A GRPO batch: rows // G groups, each group's rows one left-padded prompt; right-padded completions."""
    from common.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    U, P = rows // G, prompt[1]
    p_len = torch.randint(prompt[0], prompt[1] + 1, (U,), generator=g)  # (U,)
    p_mask = torch.arange(P)[None, :] >= (P - p_len)[:, None]  # (U, P) left-padded
    p_ids = torch.randint(3, vocab, (U, P), generator=g) * p_mask
    mask = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, T)
    group = torch.arange(rows) // G  # (B,)
    return RolloutBatch(completion_ids=torch.randint(3, vocab, (rows, max_len), generator=g) * mask, completion_mask=mask,
                        group_ids=group, prompt_ids=p_ids[group], prompt_mask=p_mask[group],
                        advantages=torch.randn(rows, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2 shape (30 = the real model)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="G: rows per prompt")
    ap.add_argument("--micro", type=int, default=4, help="rows per micro-batch of the row variants")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", nargs="+", default=["spread", "skewed"], choices=["spread", "skewed"])
    ap.add_argument("--allow-shared", action="store_true")
    args = ap.parse_args()
    setup_threads(args.threads)
    load_before = os.getloadavg()
    from common.advantages.group import GRPO
    from common.loop import Loop
    from common.losses.aggregate import Normaliser
    from common.losses.ppo_clip import ClippedPolicyLoss
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling

    prompt = (24, 40)
    if args.quick:
        from common.models import TinyLlama

        source = TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet="0123456789", seed=0)
        args.rows, args.group, args.micro, args.min_len, args.max_len, args.reps, prompt = 8, 2, 2, 2, 12, 1, (3, 6)
        name = "TinyLlama (quick)"
    elif args.layers == 30:
        from common.models import BundledSmolLM2

        source, name = BundledSmolLM2(), "SmolLM2-135M-Instruct"
    else:
        source, name = SmolLM2Shape(args.layers), f"SmolLM2-135M's shape, {args.layers} of 30 layers (random init)"
    policies = {pack: CausalLMPolicy(source, Sampling(max_new_tokens=args.max_len), pack=pack) for pack in (False, True)}
    vocab = policies[False].model.get_output_embeddings().weight.shape[0]
    budget = args.micro * (prompt[1] + args.max_len)
    score = lambda b: b  # noqa: E731 (the batches come with advantages)

    def loop(pack: bool, tokens: bool) -> Loop:
        sizes = dict(micro_batch_tokens=budget) if tokens else dict(micro_batch_size=args.micro)
        return Loop(policies[pack], score, GRPO(), ClippedPolicyLoss(), group_size=args.group, **sizes)

    loops = dict(zip(VARIANTS, (loop(False, False), loop(False, True), loop(True, False), loop(True, True))))
    fed = [0]
    for pol in policies.values():  # tokens through the decoder, counted where they enter it
        pol.model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: fed.__setitem__(0, fed[0] + inp[0].numel()))

    body = ""
    for kind in args.workloads:
        g = torch.Generator().manual_seed(1)
        lengths = completion_lengths(kind, args.rows, args.min_len, args.max_len, g)
        batch = make_batch(vocab, args.rows, args.group, prompt, lengths, args.max_len)
        norm = Normaliser.of(batch.loss_mask, args.max_len, None)

        def run(lp: Loop) -> list[torch.Tensor]:
            params = lp.policy.trainable_parameters()
            for p in params:
                p.grad = None
            for micro in lp.micro_batches(batch)[0]:
                lp.micro_loss(micro, norm, 0)[0].loss.backward()
            return [p.grad.detach().clone() for p in params]

        def warm_up(lp: Loop) -> tuple[list[torch.Tensor], int, int]:
            """One untimed run: the gradients, the tokens fed to the decoder and the largest micro-batch's saved
            activations (bytes of every tensor autograd saves for backward)."""
            fed[0], saved, peak = 0, [0], 0

            def pack_hook(t):
                saved[0] += t.numel() * t.element_size()
                return t

            for p in lp.policy.trainable_parameters():
                p.grad = None
            for micro in lp.micro_batches(batch)[0]:
                saved[0] = 0
                with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                    loss = lp.micro_loss(micro, norm, 0)[0].loss
                peak = max(peak, saved[0])
                loss.backward()
            return [p.grad.detach().clone() for p in lp.policy.trainable_parameters()], fed[0], peak

        grads, tokens, kept = {}, {}, {}
        for k, lp in loops.items():
            grads[k], tokens[k], kept[k] = warm_up(lp)
        wall, cpu = {k: [] for k in loops}, {k: [] for k in loops}
        for _ in progress(range(args.reps), f"{kind}: {', '.join(VARIANTS)}: repetitions"):
            for k, lp in loops.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run(lp)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        scale = max(g_.abs().max().item() for g_ in grads["padded rows"])
        gap = {k: max((a - b).abs().max().item() for a, b in zip(grads["padded rows"], grads[k])) / scale for k in loops}
        micros = {k: len(lp.micro_batches(batch)[0]) for k, lp in loops.items()}
        valid = int(batch.prompt_mask[:: args.group].sum() + batch.completion_mask.sum())
        body += (f"### {kind}: completion lengths {lengths.min().item()}..{lengths.max().item()} (mean "
                 f"{lengths.float().mean():.0f}), {valid:,} real tokens (prompts once per group)\n\n")
        body += table(["variant", "micro-batches", "tokens through the decoder", "wall median", "CPU median",
                       "CPU / padded rows", "kept activations (largest micro-batch)", "max |Δgrad| / max |grad|"],
                      [[k, micros[k], f"{tokens[k]:,}", fmt_s(median(wall[k])), fmt_s(median(cpu[k])),
                        f"{median(cpu[k]) / median(cpu['padded rows']):.2f}x", fmt_bytes(kept[k]), f"{gap[k]:.1e}"]
                       for k in loops]) + "\n"
    load_after = os.getloadavg()
    setup = (f"{name}, {args.rows} rows (G = {args.group}), prompts {prompt[0]}..{prompt[1]} tokens, completions to "
             f"{args.max_len}, {args.threads} thread(s), {args.reps} alternating reps after a warm-up. Row variants: "
             f"{args.micro} rows per micro-batch; token variants: budget {args.micro} x ({prompt[1]} + {args.max_len}) "
             f"= {budget}.")
    publish("packing", "Padded rows, token micro-batches, packing", setup, body, load_before, load_after, args)


def publish(name: str, title: str, setup: str, body: str, load_before, load_after, args) -> None:
    """Write ``benchmarks/results/<name>[_quick].md``: the setup line with both load averages, then ``body``; on a
    shared machine (1-min load above SHARED_LOAD before, or above the run's threads after) the results are marked,
    and printed instead of written unless ``args.allow_shared``."""
    reasons = []
    if load_before[0] > SHARED_LOAD:
        reasons.append(f"1-min load {load_before[0]:.2f} before the run")
    if load_after[0] > args.threads + SHARED_LOAD:
        reasons.append(f"1-min load {load_after[0]:.2f} after it")
    text = f"**SHARED MACHINE: {'; '.join(reasons)}. Wall times are not clean.**\n\n" if reasons else ""
    text += (f"{setup} Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
             f"{', '.join(f'{x:.2f}' for x in load_after)}.\n\n{body}")
    if args.quick:
        text = "**QUICK smoke run, not the benchmark.**\n\n" + text
    if reasons and not args.allow_shared:
        print(text)
        print("NOT WRITTEN: the machine was shared; rerun on an idle machine or pass --allow-shared")
        sys.exit(3)
    write_result(name + ("_quick" if args.quick else ""), title, text)

if __name__ == "__main__":
    main()
