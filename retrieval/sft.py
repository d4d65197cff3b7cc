"""SFT warm start for generate-and-rank (F-GRPO trains "SFT warm start, then RL", arXiv 2605.12995), on the
shared SFT module (``common/sft.py``).

A pretrained chat model does not write ``<slate> ... </slate> <rank> ... </rank>`` by itself (the bundled
SmolLM2-135M-Instruct never does zero-shot), so every rollout gets the format penalty, every group is
all-equal and RL has no signal. The warm start teaches the format on teacher answers: the slate is the
first stage's top ``max_slate`` candidates and the ranking its top ``rank_k`` (with optional score noise, the
spec's "noisy teacher"). Loss: ``common.sft.NextTokenCE``, cross-entropy on the answer tokens only; the prompt is
the chat template of ``CausalLMPolicy`` (the text the RL recipes sample from).

    advlab fit --config configs/retrieval/sft.yaml        # writes runs/smollm2-sft (output_dir)
    python -m retrieval.sft --out runs/smollm2-sft --steps 100      # the same, as a plain loop
    # then policy: common.models.Pretrained(runs/smollm2-sft)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

import torch

from common.sft import InMemory, NextTokenCE, SFTSource, encode_examples, save_model, sft_update
from retrieval.rewards import format_answer


def teacher_answer(sample: dict, noise: float = 0.0, generator: torch.Generator | None = None) -> str:
    """Slate = top ``max_slate`` by first-stage score (+ Gaussian noise x score std), ranking = top ``rank_k`` of it."""
    s = torch.tensor(sample["first_stage"])  # (C,)
    if noise > 0:
        s = s + noise * s.std() * torch.randn(s.shape, generator=generator)
    slate = s.topk(min(sample["max_slate"], len(s))).indices  # (n,) in score order
    return format_answer((slate + 1).tolist(), (slate[: sample["rank_k"]] + 1).tolist())


class TeacherAnswers(SFTSource):
    """Generate-and-rank prompts (``retrieval.data.RetrievalData``'s training pools) with teacher answers, as an SFT
    source (``common.sft.SFTData``). The noise of each example's answer is drawn once, from the seed.

    Args:
        tasks: retrieval task sources (default ``Recommendation()`` and ``MultiHopQA()``).
        first_stage: "embedding" (all-MiniLM-L6-v2 builds the pools) or "latent" (no model).
        noise: teacher score noise (x the score std): 1.0 is a mediocre teacher.
        size: prompts made when the data module asks for all (``train_size`` None).
    """

    def __init__(self, tasks: list | None = None, first_stage: Literal["embedding", "latent"] = "embedding",
                 noise: float = 1.0, size: int = 256):
        from retrieval.data import MultiHopQA, Recommendation

        self.tasks = tasks if tasks is not None else [Recommendation(), MultiHopQA()]
        self.first_stage, self.noise, self.size = first_stage, noise, size

    def make(self, n: int | None, seed: int) -> list[dict]:
        from retrieval.data import RetrievalData

        data = RetrievalData(self.tasks, first_stage=self.first_stage, train_size=self.size if n is None else n,
                             val_size=len(self.tasks), seed=seed)
        data.setup()
        g = torch.Generator().manual_seed(seed)
        return [dict(s, response=teacher_answer(s, self.noise, g)) for s in data.train_set]


class _ChatPrompts:
    """``CausalLMPolicy``'s prompt encoding (its ``prompt_texts``: chat template, no system prompt or instruction)
    without a model, for :func:`sft_batch`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.system_prompt, self.instruction = tokenizer, None, ""

    def encode(self, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        from common.policies.causal_lm import CausalLMPolicy

        enc = self.tokenizer(CausalLMPolicy.prompt_texts(self, samples), return_tensors="pt", padding=True,
                             add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"].bool()


def sft_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-templated prompt (``CausalLMPolicy``'s) + answer + EOS, one example a row (right-padded); labels are
    -100 outside the answer. Shapes: -> input_ids (b, L), attention_mask (b, L), labels (b, L)."""
    batch = encode_examples(_ChatPrompts(tokenizer), NextTokenCE(), [{"prompt": p, "response": a} for p, a in zip(prompts, answers)])
    return batch.input_ids, batch.attention_mask.long(), batch.input_ids.masked_fill(~batch.target_mask, -100)


def sft_warm_start(model, tokenizer, samples: Sequence[dict], *, steps: int = 100, batch_size: int = 4, lr: float = 5e-5,
                   noise: float = 0.0, seed: int = 0) -> list[float]:
    """Train ``model`` in place on teacher answers (a fresh noisy answer at every draw), ``steps`` AdamW steps of
    ``batch_size`` examples through ``common.sft.sft_update``; returns the loss of every step."""
    from common.loop import Stepper
    from common.policies.causal_lm import CausalLMPolicy

    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    policy = CausalLMPolicy(InMemory(model, tokenizer))
    objective = NextTokenCE()
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = Stepper(torch.optim.AdamW(params, lr=lr), params, max_grad_norm=1.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=g).tolist()
        batch = [{"prompt": samples[i]["prompt"], "response": teacher_answer(samples[i], noise, g)} for i in idx]
        loss, _, _ = sft_update(policy, objective, encode_examples(policy, objective, batch).to(policy.device), stepper)
        losses.append(float(loss))
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
    save_model(model, tok, args.out)


if __name__ == "__main__":
    main()
