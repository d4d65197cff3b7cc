"""Generate-and-rank in one rollout (F-GRPO, arXiv 2605.12995) on the shared update loop.

The policy reads a query and a pool of candidates and writes ``<slate> ... </slate> <rank> ... </rank>``.
The policy is ``common.policies.causal_lm.CausalLMPolicy`` (its chat template encodes the prompts); this
module only builds it from its arguments, says where each phase starts in the sampled tokens (the declared
field ``RolloutBatch.phase_starts``: the slate phase is every token up to and including the one that completes
``</slate>``; the ranking phase is the rest, ``<rank> ... </rank>`` and EOS), which answers are well-formed
(``correct``) and how validation is scored (greedy answers, torchmetrics NDCG@k, Recall@k, MRR). The rewards (coverage for the slate, NDCG for the ranking) and the advantage estimator come
from YAML: ``common.advantages.factorised.FactorisedGRPO`` is F-GRPO, ``common.advantages.group.GRPO`` on the
summed reward is the joint-reward baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from common.batch import RolloutBatch
from common.models import LoRA, PolicySource, TinyLlama
from common.module import PolicyOptimizationModule
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import RolloutBackend, Sampling
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
        policy: where the weights come from (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``).
        sampling: sampling options for training rollouts.
        rollout_backend: generation backend (default HF ``generate``; ``common.rollout.vllm.VLLMBackend``).
        lora: LoRA adapters (None = full fine-tuning; the reference is then the adapter switched off).
        share_prompt: run each group's prompt once in the update (exact; about G times fewer prompt tokens).
        logprob_chunk_size: rows per chunk of the chunked log-softmax.
        system_prompt: optional system message before every prompt.
        format_penalty: reward of malformed output for both phases when ``rewards`` is left empty.
        val_ndcg_k: NDCG cut-offs reported in validation (``val/ndcg@k``).
        val_recall_k: Recall cut-offs reported in validation (``val/recall@k``).
        **kwargs: everything of :class:`common.module.PolicyOptimizationModule` but ``policy``. With no
            ``rewards`` the defaults are ``[SlateCoverage(), RankingNDCG(k=5)]`` (phase order: slate, then ranking).
    """

    provides = ("correct", "phase_starts")

    def __init__(
        self,
        policy: PolicySource | None = None,
        sampling: Sampling | None = None,
        rollout_backend: RolloutBackend | None = None,
        lora: LoRA | None = None,
        share_prompt: bool = True,
        logprob_chunk_size: int = 1024,
        system_prompt: str | None = None,
        format_penalty: float = -1.0,
        val_ndcg_k: Sequence[int] = (3, 5),
        val_recall_k: Sequence[int] = (3, 5),
        **kwargs: Any,
    ):
        lm = CausalLMPolicy(policy if policy is not None else TinyLlama(), sampling, rollout_backend, lora,
                            system_prompt, share_prompt=share_prompt, logprob_chunk_size=logprob_chunk_size)
        if not kwargs.get("rewards"):
            kwargs["rewards"] = [SlateCoverage(format_penalty), RankingNDCG(5, format_penalty)]
        super().__init__(lm, **kwargs)
        self.val_metrics = RankingMetrics(val_ndcg_k, val_recall_k)
        self.val_format = MeanMetric()
        self.val_history: list[tuple[int, float, int]] = []  # (global step, greedy NDCG@3, prompts)

    def verify(self, rollouts: RolloutBatch) -> torch.Tensor:  # (B,) bool: well-formed (train/accuracy = format rate)
        ok = [parse(c, len(s["relevance"]), s["max_slate"], s["rank_k"]).ok for c, s in zip(rollouts.completions, rollouts.samples)]
        return torch.tensor(ok, dtype=torch.bool, device=self.device)

    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        """Rewards and ``correct`` (the shared score), and where each phase starts (B, 2)."""
        rollouts = super().score(rollouts)
        starts = phase_starts(self.policy.tokenizer, rollouts.completion_ids, rollouts.completion_mask)
        return rollouts.replace(phase_starts=torch.tensor(starts, dtype=torch.long, device=rollouts.completion_mask.device).view(-1, 2))

    def validation_step(self, prompts: Sequence[dict], batch_idx: int) -> None:
        greedy = self.policy.rollout(prompts, 1, greedy=True)
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
