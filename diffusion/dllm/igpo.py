"""IGPO — Inpainting-Guided Policy Optimization for masked-diffusion LMs (Zhao et al. 2025, arXiv 2509.10396), as a
method part on the shared loop (domains.md §1(b) steps 3-7). The loss is diffu-GRPO's; only the sampling changes.

After scoring (``after_score``), for every group whose G samples are all wrong (``batch.correct``):

1. draw η_j ~ U[η_lo, η_hi] for its G regenerated samples, sorted ascending;
2. chunk the reference trace's hint region (``sample["hint_positions"]``: never the last sum, ``#`` or the answer;
   the paper's version, no answer leak) left to right into chunks of ~U{c_min..c_max} tokens, stopping when fewer
   than c_min remain; hide ⌊(1 − η_j)·n_c⌋ chunks chosen uniformly, the rest are hints, placed at the trace's own
   offsets (s = 1: |y*| ≤ T in the toy);
3. inpaint: the LLaDA sampler from z^hint, hint positions frozen (``hint_mask`` marks exactly them);
4. score the inpainted samples; replace the group's first n_rep = min(|C_p|, λ_max) original samples by n_rep
   correct inpainted ones drawn uniformly (with their hint masks). A group with no correct inpainted sample stays
   all-wrong.

Advantages are the loop's estimator on the mixed group (IGPO: r − mean, ``GRPO(scale="none")``). The entropy filter
(step 7): among each row's hint positions keep the k = max(1, ⌊τ·|S|⌋) with the largest old-policy entropy, every
non-hint position is kept (``hint_keep``, applied to the loss mask in ``loss_inputs``). The old entropies are
computed once, after the replacement, with the epoch-0 estimator: IGPO does not mask the prompt (``p_mask = 0``), so
they are the same for every inner epoch (with ``p_mask > 0`` this uses epoch 0's draw — an approximation). The
filtered hint tokens leave the loss's numerator; the loop's normaliser still counts them (IGPO's code divides by
Σ M after the filter: with the ``token_mean`` aggregation our filtered loss is smaller by Σ M / Σ mask).

With ``max_replacements = 0`` nothing is sampled or changed (no random number drawn): IGPO is then diffu-GRPO bit
for bit (tested). Randomness (η, chunks, which chunks hide, which correct samples replace) comes from the global
torch RNG, which the checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from diffusion.dllm.policy import MaskedDiffusionPolicy
from diffusion.dllm.sampler import most_confident

if TYPE_CHECKING:
    from common.loop import Loop


def entropy_filter(entropy: Tensor, hint_mask: Tensor, keep_frac: float) -> Tensor:
    """IGPO's step 7: per row, the k = max(1, ⌊keep_frac·n⌋) hint positions of largest entropy (n = the row's hint
    count; ties leftmost) and every non-hint position. Shapes: entropy (B, T), hint_mask (B, T) bool -> (B, T) bool."""
    n = hint_mask.sum(1)  # (B,)
    k = torch.where(n > 0, (keep_frac * n.double()).floor().long().clamp(min=1), torch.zeros_like(n))  # (B,)
    return ~hint_mask | most_confident(entropy.detach(), hint_mask, k)


def hint_region(sample: Mapping[str, Any], trace_len: int) -> list[int]:
    """Trace positions that may be hints: ``sample["hint_positions"]``, else all but the last two (``#`` answer)."""
    return [int(i) for i in sample.get("hint_positions", range(max(0, trace_len - 2))) if int(i) < trace_len]


def chunk(region: list[int], c_min: int, c_max: int) -> list[list[int]]:
    """Consecutive chunks of ~U{c_min..c_max} positions of ``region``, left to right, until fewer than c_min remain."""
    out, i = [], 0
    while len(region) - i >= c_min:
        size = min(int(torch.randint(c_min, c_max + 1, ())), len(region) - i)
        out.append(region[i : i + size])
        i += size
    return out


class IGPO(Method):
    """IGPO's inpainting of all-wrong groups, replacement and entropy filter (module docstring).

    Args:
        eta_low, eta_high: the range of η, the fraction of chunks revealed (paper U[0.2, 0.6]; 1.0 = full hints).
        chunk_min, chunk_max: chunk sizes in tokens (paper 5..10; toy 1..2).
        max_replacements: λ_max, wrong samples replaced per group (paper 4 of 8; 0 = diffu-GRPO).
        entropy_keep: τ, the fraction of hint tokens kept by the entropy filter (paper 0.2; 1.0 = no filter).
        trace_key: the sample's reference-trace field.
        max_groups: inpaint at most this many all-wrong groups a step (the first ones; None = all): caps the extra
            samples, e.g. to stop a run at an exact sample budget (``reproductions/igpo.py``).
    """

    requires = ("correct",)
    provides = ("hint_mask", "hint_keep")

    def __init__(self, eta_low: float = 0.2, eta_high: float = 0.6, chunk_min: int = 1, chunk_max: int = 2,
                 max_replacements: int = 4, entropy_keep: float = 0.2, trace_key: str = "trace",
                 max_groups: int | None = None):
        super().__init__()
        problems = []
        if not 0 <= eta_low <= eta_high <= 1:
            problems.append(f"need 0 <= eta_low <= eta_high <= 1, got {eta_low}, {eta_high}")
        if not 1 <= chunk_min <= chunk_max:
            problems.append(f"need 1 <= chunk_min <= chunk_max, got {chunk_min}, {chunk_max}")
        if max_replacements < 0:
            problems.append(f"max_replacements must be >= 0, got {max_replacements}")
        if not 0 < entropy_keep <= 1:
            problems.append(f"entropy_keep must be in (0, 1], got {entropy_keep}")
        if max_groups is not None and max_groups < 0:
            problems.append(f"max_groups must be >= 0 or None, got {max_groups}")
        if problems:
            raise ValueError("IGPO: " + "; ".join(problems))
        self.eta_low, self.eta_high, self.chunk_min, self.chunk_max = eta_low, eta_high, chunk_min, chunk_max
        self.max_replacements, self.entropy_keep, self.trace_key = max_replacements, entropy_keep, trace_key
        self.max_groups = max_groups

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.policy, MaskedDiffusionPolicy):
            raise ValueError(f"IGPO: policy must be a diffusion.dllm.policy.MaskedDiffusionPolicy, got {type(loop.policy).__name__}")

    # ------------------------------------------------------------------ hints
    def hints(self, policy: MaskedDiffusionPolicy, samples: list[dict], G: int) -> tuple[Tensor, Tensor]:
        """z^hint for G regenerated samples of each listed prompt (host-side: a few chunks per all-wrong group).
        Shapes: -> hint_ids (len(samples)·G, T) long, hint_mask (len(samples)·G, T) bool."""
        T = policy.gen_length
        ids = torch.zeros(len(samples) * G, T, dtype=torch.long)
        mask = torch.zeros(len(samples) * G, T, dtype=torch.bool)
        for p, s in enumerate(samples):  # ok: all-wrong groups only, host-side token lists
            trace = policy.tokenizer(str(s[self.trace_key]), add_special_tokens=False)["input_ids"][:T]
            eta = (self.eta_low + (self.eta_high - self.eta_low) * torch.rand(G, dtype=torch.float64)).sort().values
            chunks = chunk(hint_region(s, len(trace)), self.chunk_min, self.chunk_max)
            for j in range(G):
                hidden = set(torch.randperm(len(chunks))[: int((1 - float(eta[j])) * len(chunks))].tolist())
                for c in (c for i, c in enumerate(chunks) if i not in hidden):
                    for pos in c:
                        ids[p * G + j, pos], mask[p * G + j, pos] = trace[pos], True
        return ids.to(policy.device), mask.to(policy.device)

    # ------------------------------------------------------------------ hooks
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        policy: MaskedDiffusionPolicy = loop.policy  # type: ignore[assignment]
        batch.require("IGPO", "correct", "prompt_ids")
        batch = batch.replace(hint_mask=torch.zeros_like(batch.completion_mask),
                              hint_keep=torch.ones_like(batch.completion_mask))
        if self.max_replacements == 0:
            return batch
        groups, inverse = torch.unique(batch.group_ids, return_inverse=True)  # (U,), (B,)
        n_correct = torch.zeros(len(groups), dtype=torch.long, device=inverse.device).index_add_(0, inverse, batch.correct.long())
        wrong_groups = (n_correct == 0).nonzero().squeeze(1).tolist()  # ok: one sync per step, host-side bookkeeping
        wrong_groups = wrong_groups[: self.max_groups]  # None: all
        if not wrong_groups:
            return batch
        members = [(inverse == g).nonzero().squeeze(1) for g in wrong_groups]  # rows of each all-wrong group
        G = int(max(len(m) for m in members))
        first = torch.stack([m[0] for m in members])  # (W,) a row of each group: its prompt and sample
        hint_ids, hint_mask = self.hints(policy, [batch.samples[int(i)] for i in first], G)  # (W·G, T)
        rows = first.repeat_interleave(G)  # (W·G,)
        hinted = policy.sample_batch(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.group_ids[rows],
                                     [batch.samples[int(i)] for i in rows], hint_ids=hint_ids, hint_mask=hint_mask)
        hinted = loop.score(hinted.replace(hint_mask=hint_mask, hint_keep=torch.ones_like(hint_mask)))
        index = torch.arange(batch.batch_size, device=inverse.device)
        for w, m in enumerate(members):  # ok: all-wrong groups only
            good = (hinted.correct[w * G : (w + 1) * G]).nonzero().squeeze(1)
            n_rep = min(len(good), self.max_replacements, len(m))
            if n_rep:
                chosen = good[torch.randperm(len(good))[:n_rep].to(good.device)]
                index[m[:n_rep]] = batch.batch_size + w * G + chosen
        both = RolloutBatch.cat([batch, hinted.replace(reward_names=batch.reward_names)])
        out = both.select(index).replace(group_ids=batch.group_ids)
        if out.hint_mask.any():
            with torch.no_grad():
                entropy = policy(out, epoch=0).entropy  # (B, T) under π_old
            out = out.replace(hint_keep=entropy_filter(entropy, out.hint_mask, self.entropy_keep))
        return out

    def loss_inputs(self, loop: "Loop", micro: RolloutBatch, out, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"mask": inputs["mask"] & micro.hint_keep} if micro.hint_keep is not None else {}

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        """All-wrong rate before and after inpainting, rescued groups, replacements, hint vs generated old log-probs."""
        groups, inverse = torch.unique(batch.group_ids, return_inverse=True)
        U = len(groups)
        count = lambda v: torch.zeros(U, device=inverse.device).index_add_(0, inverse, v.float())  # noqa: E731 (U,)
        hinted_rows = batch.hint_mask.any(1)  # (B,)
        rescued = count(hinted_rows) > 0  # (U,)
        wrong_after = count(batch.correct) == 0  # (U,)
        m = batch.completion_mask
        old = batch.old_logprobs[..., 0] if batch.old_logprobs is not None and batch.old_logprobs.dim() == 3 else batch.old_logprobs
        metrics = {"all_wrong_before": (wrong_after | rescued).float().mean(), "all_wrong_after": wrong_after.float().mean(),
                   "rescued_groups": rescued.float().sum(), "replacements": hinted_rows.float().sum(),
                   "hint_token_frac": (batch.hint_mask & m).sum() / m.sum().clamp(min=1)}
        if old is not None:
            h, g = batch.hint_mask & m, ~batch.hint_mask & m
            metrics["hint_logprob"] = (old * h).sum() / h.sum().clamp(min=1)
            metrics["generated_logprob"] = (old * g).sum() / g.sum().clamp(min=1)
        return metrics


__all__ = ["IGPO", "chunk", "entropy_filter", "hint_region"]
