"""Rollout throughput: our HF backend (transformers ``generate``) against vLLM, on the same model, prompts and sampling.

Work (both sides): the bundled SmolLM2-135M-Instruct, two-digit addition prompts (``text_reasoning.data.Arithmetic``)
through the tokenizer's chat template, left-padded, ``--prompts`` prompts x G = ``--group`` samples each, at most
``--new-tokens`` new tokens, temperature 1 (no top-p/top-k), behaviour log-probs returned (what training needs).
HF: ``common.rollout.hf.HFBackend`` (KV-cached ``generate``, each prompt prefilled once and its cache expanded to
its G samples). vLLM: ``common.rollout.vllm.VLLMBackend`` (in-process ``vllm.LLM``, eager mode, prefix caching,
``n`` = G per request). Both run the whole batch in one call; calls alternate A B A B after one warm-up each.

Columns: seconds per call (median), generated tokens per call (completion tokens up to and including EOS; the two
sides sample different completions, so the counts differ), tokens/s = tokens / seconds, and the ratio. The engine
start (model written to a temporary directory and loaded by vLLM) is a one-time cost, reported apart.

    python benchmarks/rollout.py                                # 64 prompts x G = 8, 128 new tokens, CPU
    python benchmarks/rollout.py --device cuda --dtype bfloat16 # the same on a GPU (`pip install -e ".[vllm]"`)
    python benchmarks/rollout.py --quick                        # smoke test: 2 x 2, 8 tokens, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
from bench import (  # noqa: E402  (before torch: threads, repo root)
    alternate, machine_header, median, setup_threads, table, write_result,
)

import torch  # noqa: E402

SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 2, 8 tokens, 1 rep; print, write nothing")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.group, args.new_tokens, args.reps = 2, 2, 8, 1
    setup_threads()

    from common.models import BundledSmolLM2
    from common.rollout.base import Sampling
    from common.rollout.hf import HFBackend
    from text_reasoning.data import Arithmetic

    policy, tok = BundledSmolLM2(dtype=args.dtype).load()
    policy.to(args.device).eval()
    problems = Arithmetic(digits=2, ops="+").make(args.prompts, seed=SEED)
    texts = [tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
             for p in problems]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids.to(args.device), enc.attention_mask.bool().to(args.device)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0, logprobs=True)

    t0 = time.perf_counter()
    from common.rollout.vllm import VLLMBackend

    vllm_backend = VLLMBackend(max_model_len=512, kv_cache_gib=1.0 if args.device == "cpu" else None)
    vllm_backend.start(policy, tok)
    start_s = time.perf_counter() - t0  # import + write the model + engine start
    hf_backend = HFBackend()
    tokens: dict[str, list[int]] = {"HF generate": [], "vLLM": []}

    def keep(name, out):
        tokens[name].append(int(out.completion_mask.sum()))

    def run(backend):
        return lambda: backend.generate(policy, tok, ids, mask, args.group, sampling)

    torch.manual_seed(SEED)
    times = alternate({"HF generate": run(hf_backend), "vLLM": run(vllm_backend)}, reps=args.reps, warmup=1,
                      device=args.device, on_result=keep)
    rows, tps = [], {}
    for name in times:
        s = median(times[name])
        n = median(tokens[name][1:])  # counted repetitions only
        tps[name] = n / s
        rows.append([name, f"{s:.2f} s", f"{n:.0f}", f"{tps[name]:.1f}", f"{tps[name] / tps['HF generate']:.2f}x"])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    body = (
        f"Work: bundled SmolLM2-135M-Instruct ({args.dtype}) on {args.device}, {args.prompts} two-digit addition prompts "
        f"x G = {args.group}, at most {args.new_tokens} new tokens, temperature 1, behaviour log-probs on; "
        f"1 warm-up + {args.reps} counted calls each, alternating. vLLM one-time start (import, model written, engine "
        f"built): {start_s:.1f} s. Load average at the end: {load}.\n\n"
        + table(["backend", "s / call (median)", "tokens / call", "tokens/s", "vs HF"], rows)
    )
    print(body)
    vllm_backend.close()
    if not args.quick:
        write_result("rollout", "Rollout throughput: HF generate vs vLLM", body)


if __name__ == "__main__":
    main()
