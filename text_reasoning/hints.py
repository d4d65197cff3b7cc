"""ADHint rollouts (arXiv 2512.13095): per prompt, n naive (hint-free) samples estimate the difficulty, then G − n
samples start from a hint — a prefix of the reference solution, forced as the first tokens of the response — whose
length grows with the difficulty. Advantages and the hint-token masking are in ``common/advantages/adhint.py``, the
consistency-based gradient modulation of hint tokens (CGM) in ``common/losses/adhint.py``.

    Diff_q = 1 − mean reward of the n naive samples of prompt q       (rewards clamped to [0, 1])
    ω_q    = hint_ratio(Diff_q)  (0 when Diff_q = 0)                   hint = first ⌊ω_q·|y*|⌋ tokens of y*
    row layout: prompt = the chat-templated problem (as for naive rows); completion = hint tokens + sampled
    continuation; the declared field ``RolloutBatch.hint_len`` (B,) = the hint length (0 for naive rows), so the
    estimator and the loss can find them.

The method part is :class:`ADHintRollout` (``methods:`` in YAML, on the plain
``text_reasoning.module.TextReasoningModule``; it combines with others, e.g. SDPO's self-teacher).

The hint tokens were not sampled: their log-probs (old and new) are the policy's own, teacher-forced on the same
prompt, so the ratio on them is exact. Reference solutions y*: ``sample["solution"]`` if present, else built from the
task (arithmetic "a op b = c", countdown "<answer>expr</answer>", otherwise the answer). Nothing persists across
steps (the noise ξ comes from the global torch RNG, which the checkpoint holds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from common.advantages.adhint import hint_ratio
from common.batch import RolloutBatch
from common.methods.base import Method
from common.policies.causal_lm import CausalLMPolicy

if TYPE_CHECKING:
    from common.loop import Loop


def reference_solution(sample: Mapping[str, Any]) -> str:
    """The reference solution text y* of a sample (see the module docstring)."""
    if sample.get("solution"):
        return str(sample["solution"])
    if sample.get("task") == "arithmetic" and "operands" in sample:
        a, b = sample["operands"]
        return f"{a} {sample['op']} {b} = {sample['answer']}"
    if sample.get("task") == "countdown":
        return f"<answer>{sample['answer']}</answer>"
    return str(sample["answer"])


class ADHintRollout(Method):
    """ADHint's difficulty-scheduled hints as a method part (module docstring): it replaces the training rollout
    (``rollout``: n naive samples per prompt, scored with ``loop.score`` for the difficulty, then G − n hinted
    samples through ``loop.policy.generate``) and fills the declared field ``hint_len`` (B,), which
    ``common.advantages.adhint.ADHint`` and ``common.losses.adhint.ADHintLoss`` read. Validation rollouts are the
    policy's own (hint-free).

    Args:
        naive_samples: n, hint-free samples per prompt (the rest of ``group_size`` are hinted).
        omega_min: ω_min, hint ratio at difficulty 0+ (proposal 0; values unverified).
        omega_max: ω_max, hint ratio at difficulty 1 (proposal 0.8).
        noise: scale of ξ ~ U(0, noise) added to ω (proposal 0.05).
    """

    provides = ("hint_len",)

    def __init__(self, naive_samples: int = 4, omega_min: float = 0.0, omega_max: float = 0.8, noise: float = 0.05):
        super().__init__()
        problems = []
        if naive_samples < 1:
            problems.append(f"naive_samples must be >= 1, got {naive_samples}")
        if not 0 <= omega_min <= omega_max <= 1:
            problems.append(f"need 0 <= omega_min <= omega_max <= 1, got omega_min={omega_min}, omega_max={omega_max}")
        if noise < 0:
            problems.append(f"noise must be >= 0, got {noise}")
        if problems:
            raise ValueError("ADHintRollout: " + "; ".join(problems))
        self.naive_samples, self.omega_min, self.omega_max, self.noise = naive_samples, omega_min, omega_max, noise

    def setup(self, loop: "Loop") -> None:
        problems = []
        if not 1 <= self.naive_samples < loop.group_size:
            problems.append(f"naive_samples must be in [1, group_size) = [1, {loop.group_size}), got {self.naive_samples}")
        if not isinstance(loop.policy, CausalLMPolicy):  # hints are tokenised reference solutions
            problems.append(f"policy must be a common.policies.causal_lm.CausalLMPolicy, got {type(loop.policy).__name__}")
        if problems:
            raise ValueError("ADHintRollout: " + "; ".join(problems))

    def rollout(self, loop: "Loop", prompts: Sequence[dict], n: int) -> RolloutBatch:
        P, k = len(prompts), self.naive_samples
        policy = loop.policy
        naive = policy.rollout(prompts, k)
        with torch.no_grad():
            r = loop.score(naive).rewards.clamp(0.0, 1.0).view(P, k)  # (P, k)
        difficulty = 1.0 - r.mean(1)  # (P,)
        xi = self.noise * torch.rand(P).to(difficulty.device)  # (P,) ξ ~ U(0, noise)
        omega = hint_ratio(difficulty, omega_min=self.omega_min, omega_max=self.omega_max, noise=xi)  # (P,)
        refs = [policy.tokenizer(reference_solution(s), add_special_tokens=False)["input_ids"] for s in prompts]
        hints = [ids[: int(w * len(ids))] for ids, w in zip(refs, omega.tolist())]
        hinted = generate_with_hints(policy, prompts, hints, n - k)
        naive = naive.replace(behaviour_logprobs=None,  # hint tokens have no sampler log-probs
                              hint_len=torch.zeros(naive.batch_size, dtype=torch.long, device=naive.group_ids.device))
        batch = RolloutBatch.cat([naive, hinted])
        return batch.replace(group_ids=torch.cat([naive.group_ids, hinted.group_ids]))  # same prompt = same group

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, torch.Tensor]:
        hinted = batch.hint_len > 0  # (B,)
        mean_len = batch.hint_len.sum().float() / hinted.sum().clamp(min=1)  # () over hinted rows
        return {"hinted_frac": hinted.float().mean(), "hint_len": mean_len}


@torch.no_grad()
def generate_with_hints(policy: CausalLMPolicy, prompts: Sequence[dict], hints: Sequence[list[int]],
                        m: int) -> RolloutBatch:
    """``m`` samples per prompt continuing from its hint; the hint becomes the first tokens of the completion and
    ``hint_len`` its length. Shapes: -> a RolloutBatch of P·m rows, row p·m + j is sample j of prompt p."""
    pad = policy.tokenizer.pad_token_id
    ids, mask = policy.encode(prompts)  # (P, L) left-padded
    rows = [ids[p][mask[p]].tolist() + list(h) for p, h in enumerate(hints)]  # ok: host-side, P token lists
    width = max(len(x) for x in rows)
    hp_ids = torch.tensor([[pad] * (width - len(x)) + x for x in rows], device=ids.device)  # (P, width)
    hp_mask = torch.tensor([[False] * (width - len(x)) + [True] * len(x) for x in rows], device=ids.device)
    out = policy.generate(hp_ids, hp_mask, m)
    H = max(1, max(len(h) for h in hints))
    hint_table = torch.tensor([list(h) + [pad] * (H - len(h)) for h in hints], device=ids.device)  # (P, H)
    k = torch.tensor([len(h) for h in hints], device=ids.device).repeat_interleave(m)  # (B,)
    gen, gen_len = out.completion_ids, out.completion_mask.sum(1)  # (B, Tg), (B,)
    T = int((k + gen_len).max())
    t = torch.arange(T, device=ids.device)[None, :]  # (1, T)
    from_hint = t < k[:, None]  # (B, T)
    hint_tok = hint_table.repeat_interleave(m, 0).gather(1, t.clamp(max=H - 1).expand(len(k), T))  # (B, T)
    gen_tok = gen.gather(1, (t - k[:, None]).clamp(0, gen.shape[1] - 1))  # (B, T)
    cmask = from_hint | ((t >= k[:, None]) & (t - k[:, None] < gen_len[:, None]))  # (B, T)
    completion = torch.where(from_hint, hint_tok, gen_tok).masked_fill(~cmask, pad)  # (B, T)
    return RolloutBatch(
        prompt_ids=ids.repeat_interleave(m, 0), prompt_mask=mask.repeat_interleave(m, 0), completion_ids=completion,
        completion_mask=cmask, group_ids=torch.arange(len(prompts), device=ids.device).repeat_interleave(m),
        truncated=out.truncated, hint_len=k, samples=[dict(s) for s in prompts for _ in range(m)],
        completions=policy.decode(completion, cmask))
