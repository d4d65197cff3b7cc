"""Generate-and-rank in one rollout (F-GRPO, arXiv 2605.12995) on the shared update loop.

The policy reads a query and a pool of candidates and writes ``<slate> ... </slate> <rank> ... </rank>``.
This module only says how prompts become token ids, where each phase starts in the sampled tokens (the
slate phase is every token up to and including the one that completes ``</slate>``; the ranking phase is the
rest, ``<rank> ... </rank>`` and EOS) and how validation is scored (greedy answers, torchmetrics NDCG@k,
Recall@k, MRR). The rewards (coverage for the slate, NDCG for the ranking) and the advantage estimator come
from YAML: ``common.advantages.factorised.FactorisedGRPO`` is F-GRPO, ``common.advantages.group.GRPO`` on the
summed reward is the joint-reward baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from common.batch import RolloutBatch
from common.module import PolicyOptimizationModule
from retrieval.metrics import RankingMetrics
from retrieval.rewards import SLATE_CLOSE, RankingNDCG, SlateCoverage, parse


def phase_starts(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, marker: str = SLATE_CLOSE) -> list[list[int]]:
    """Token index where the second phase starts in each completion: the length of the shortest prefix whose
    text contains ``marker`` (binary search over prefixes, O(log T) decodes per row); the whole completion
    when the marker is absent. Shapes: (B, T), (B, T) -> B lists [0, start]."""
    out = []
    for ids, n in zip(completion_ids.tolist(), mask.sum(1).tolist()):  # ok: host-side text search per completion
        def has(k: int) -> bool:
            return marker in tokenizer.decode(ids[:k], skip_special_tokens=True)

        if not has(n):
            out.append([0, n])
            continue
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has(mid) else (mid + 1, hi)
        out.append([0, lo])
    return out


class RetrievalModule(PolicyOptimizationModule):
    """Slate generation and ranking with a chat-tuned causal LM.

    Args:
        system_prompt: optional system message before every prompt.
        format_penalty: reward of malformed output for both phases when ``rewards`` is left empty.
        val_ndcg_k: NDCG cut-offs reported in validation (``val/ndcg@k``).
        val_recall_k: Recall cut-offs reported in validation (``val/recall@k``).
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule`. With no ``rewards`` the
            defaults are ``[SlateCoverage(), RankingNDCG(k=5)]`` (phase order: slate, then ranking).
    """

    def __init__(self, *args: Any, system_prompt: str | None = None, format_penalty: float = -1.0,
                 val_ndcg_k: Sequence[int] = (3, 5), val_recall_k: Sequence[int] = (3, 5), **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not self.reward_fns:
            self.reward_fns = [SlateCoverage(format_penalty), RankingNDCG(5, format_penalty)]
            self.reward_weights = torch.ones(2)
        self.system_prompt = system_prompt
        self.val_metrics = RankingMetrics(val_ndcg_k, val_recall_k)
        self.val_format = MeanMetric()
        self.val_history: list[tuple[int, float, int]] = []  # (global step, greedy NDCG@3, prompts)

    def encode_prompts(self, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-template and left-pad prompts. Shapes: -> ids (P, L) long, mask (P, L) bool."""
        texts = []
        for s in samples:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": s["prompt"]})
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def rollout(self, prompts: Sequence[dict], *, greedy: bool = False, num_samples: int | None = None) -> RolloutBatch:
        n = num_samples or (1 if greedy else self.group_size)
        ids, mask = self.encode_prompts(prompts)
        batch = self.backend.generate(self.policy, self.tokenizer, ids, mask, n, self.sampling, greedy=greedy)
        starts = phase_starts(self.tokenizer, batch.completion_ids, batch.completion_mask)
        samples = [dict(s, phase_starts=st) for s, st in zip((s for s in prompts for _ in range(n)), starts)]
        return batch.replace(samples=samples)

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        rollouts = super().score(rollouts)
        ok = [parse(c, len(s["relevance"]), s["max_slate"], s["rank_k"]).ok for c, s in zip(rollouts.completions, rollouts.samples)]
        return rollouts.replace(correct=torch.tensor(ok, device=self.device))  # train/accuracy = well-formed rate

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        greedy = self.rollout(prompts, greedy=True)
        parsed = [parse(c, len(s["relevance"]), s["max_slate"], s["rank_k"]) for c, s in zip(greedy.completions, greedy.samples)]
        self.val_metrics.update([p.ranking for p in parsed], [s["relevance"] for s in greedy.samples])
        self.val_format.update(torch.tensor([float(p.ok) for p in parsed]))

    def on_validation_epoch_end(self) -> None:
        n = self.val_metrics.queries
        values = self.val_metrics.compute()
        for k, v in values.items():
            self.log(f"val/{k}", v, prog_bar=k == "ndcg@3")
        self.log("val/format_ok", self.val_format.compute())
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(values.get("ndcg@3", next(iter(values.values())))), n))
        self.val_metrics.reset()
        self.val_format.reset()
