"""SFT warm start for generate-and-rank (F-GRPO trains "SFT warm start, then RL", arXiv 2605.12995).

A pretrained chat model does not write ``<slate> ... </slate> <rank> ... </rank>`` by itself (the bundled
SmolLM2-135M-Instruct never does zero-shot), so every rollout gets the format penalty, every group is
all-equal and RL has no signal. The warm start teaches the format on teacher answers: the slate is the
first stage's top ``max_slate`` candidates and the ranking its top ``rank_k`` (with optional score noise, the
spec's "noisy teacher"). Loss: cross-entropy on the answer tokens only.

    python -m retrieval.sft --out runs/smollm2-sft --steps 100      # then policy: common.models.Pretrained(runs/smollm2-sft)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from retrieval.rewards import format_answer


def teacher_answer(sample: dict, noise: float = 0.0, generator: torch.Generator | None = None) -> str:
    """Slate = top ``max_slate`` by first-stage score (+ Gaussian noise x score std), ranking = top ``rank_k`` of it."""
    s = torch.tensor(sample["first_stage"])  # (C,)
    if noise > 0:
        s = s + noise * s.std() * torch.randn(s.shape, generator=generator)
    slate = s.topk(min(sample["max_slate"], len(s))).indices  # (n,) in score order
    return format_answer((slate + 1).tolist(), (slate[: sample["rank_k"]] + 1).tolist())


def sft_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-templated prompt + answer + EOS, left-padded; labels are -100 outside the answer.
    Shapes: -> input_ids (b, L), attention_mask (b, L), labels (b, L)."""
    rows, labels = [], []
    for p, a in zip(prompts, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        pi = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ai = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    L = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    att = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    lab = torch.tensor([[-100] * (L - len(r)) + r for r in labels])
    return ids, att, lab


def sft_warm_start(model, tokenizer, samples: Sequence[dict], *, steps: int = 100, batch_size: int = 4, lr: float = 5e-5,
                   noise: float = 0.0, seed: int = 0) -> list[float]:
    """Train ``model`` in place on teacher answers; returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    was_training = model.training
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=g).tolist()
        batch = [samples[i] for i in idx]
        ids, att, lab = sft_batch(tokenizer, [s["prompt"] for s in batch], [teacher_answer(s, noise, g) for s in batch])
        pos = (att.cumsum(1) - 1).clamp(min=0)
        loss = model(input_ids=ids, attention_mask=att, position_ids=pos, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.train(was_training)
    return losses


def main() -> None:
    from common.models import BundledSmolLM2
    from retrieval.data import MultiHopQA, Recommendation, RetrievalData

    ap = argparse.ArgumentParser(description="SFT warm start of the bundled SmolLM2 on the generate-and-rank format")
    ap.add_argument("--out", required=True, help="directory for the fine-tuned model (load it with common.models.Pretrained)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--noise", type=float, default=1.0, help="teacher score noise (x the score std): a mediocre teacher")
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--first-stage", choices=("embedding", "latent"), default="embedding")
    args = ap.parse_args()
    data = RetrievalData([Recommendation(), MultiHopQA()], first_stage=args.first_stage, train_size=args.train_size, val_size=2)
    data.setup()
    model, tok = BundledSmolLM2().load()
    losses = sft_warm_start(model, tok, data.train_set, steps=args.steps, batch_size=args.batch_size, lr=args.lr, noise=args.noise)
    print(f"SFT loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10 steps)")
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
