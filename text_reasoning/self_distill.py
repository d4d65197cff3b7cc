"""Self-distillation from an EMA self-teacher re-prompted with a successful sibling's answer: SDPO (arXiv
2601.20802) and SRPO (arXiv 2604.02288). The losses are in ``common/losses/self_distill.py`` and
``common/losses/srpo.py``; this module supplies what they need from the model:

    1. teacher context (after scoring):  x̃_i = reprompt(x, solution_i)
           "{prompt}\\nCorrect solution:\\n\\n{solution}\\n\\n\\n\\nCorrectly solve the original question."
       (templates as in the SDPO code's config: reprompt "{prompt}{solution}{feedback}\\n\\nCorrectly solve the original
       question.", solution "\\nCorrect solution:\\n\\n{successful_previous_attempt}\\n\\n"; no feedback here)
       solution_i = the first successful sibling j ≠ i of the same prompt (reward >= success_threshold), thinking
       tags stripped; h_i = 1 iff one exists (no environment feedback in these tasks)
    2. in the update, from the micro-batch's single policy forward: the student's full next-token log-probs at the
       completion positions, its top-k indices, and the EMA teacher's log-probs on x̃_i + y_i gathered there
       (teacher-forced, no gradient), plus the teacher's full-vocabulary entropy (SRPO's weight)
    3. after every update: θ̄ ← (1 − η)θ̄ + ηθ. The teacher's weights are a submodule, so they are in the
       Lightning checkpoint and a resumed run continues with the same teacher.

The full (N, V) logits of the micro-batch's completion tokens are materialised (N = valid tokens): choose
``micro_batch_size`` accordingly (SmolLM2: 49,152 x 4 bytes per token).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.losses.self_distill import Distillation, SDPOLoss, ema_update_, topk_with_tail
from text_reasoning.module import TextReasoningModule

_THINKING = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def teacher_contexts(prompts: Sequence[str], completions: Sequence[str], success: Sequence[bool],
                     group_ids: Sequence[int], *, dont_reprompt_on_self_success: bool = True,
                     remove_thinking: bool = True,
                     reprompt_template: str = "{prompt}{solution}\n\nCorrectly solve the original question.",
                     solution_template: str = "\nCorrect solution:\n\n{solution}\n\n") -> list[str | None]:
    """The teacher's prompt for every row, or None where no successful sibling exists (SDPO code
    ``_maybe_build_self_distillation_batch``): the first successful row of the same group, excluding the row
    itself when ``dont_reprompt_on_self_success``. Host-side text: one pass over B strings."""
    n = len(prompts)
    if not (len(completions) == len(success) == len(group_ids) == n):
        raise ValueError(f"prompts, completions, success and group_ids must have one entry per row, got lengths "
                         f"{n}, {len(completions)}, {len(success)}, {len(group_ids)}")
    successes: dict[int, list[int]] = {}
    for i, (g, ok) in enumerate(zip(group_ids, success)):  # ok: host-side text assembly
        if ok:
            successes.setdefault(g, []).append(i)
    out: list[str | None] = []
    for i, g in enumerate(group_ids):  # ok: host-side text assembly
        donors = [j for j in successes.get(g, []) if not (dont_reprompt_on_self_success and j == i)]
        if not donors:
            out.append(None)
            continue
        text = completions[donors[0]]
        if remove_thinking:
            text = _THINKING.sub("", text).strip()
        out.append(reprompt_template.format(prompt=prompts[i], solution=solution_template.format(solution=text)))
    return out


class SelfDistillationModule(TextReasoningModule):
    """Text reasoning with an EMA self-teacher (module docstring); ``loss`` must be an
    ``common.losses.self_distill.SDPOLoss`` or ``common.losses.srpo.SRPOLoss``.

    Args:
        ema_rate: η of the teacher update θ̄ ← (1 − η)θ̄ + ηθ (code 0.05; 1 = the teacher is the current student).
        success_threshold: a rollout with reward >= this is a successful demonstration (code 0.5).
        dont_reprompt_on_self_success: never use a row's own answer as its demonstration (code True).
        remove_thinking: strip ``<think>...</think>`` from demonstrations (code True).
        reprompt_template: the teacher's user message, with ``{prompt}`` and ``{solution}``.
        solution_template: how the demonstration is inserted, with ``{solution}``.
        **kwargs: everything of :class:`text_reasoning.module.TextReasoningModule`.
    """

    def __init__(
        self,
        *args: Any,
        ema_rate: float = 0.05,
        success_threshold: float = 0.5,
        dont_reprompt_on_self_success: bool = True,
        remove_thinking: bool = True,
        reprompt_template: str = "{prompt}{solution}\n\nCorrectly solve the original question.",
        solution_template: str = "\nCorrect solution:\n\n{solution}\n\n",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        problems = []
        if not isinstance(self.loss_fn, SDPOLoss):
            problems.append(f"loss must be a common.losses.self_distill.SDPOLoss or common.losses.srpo.SRPOLoss, "
                            f"got {type(self.loss_fn).__name__}")
        if not 0 < ema_rate <= 1:
            problems.append(f"ema_rate must be in (0, 1], got {ema_rate}")
        for name, template, keys in (("reprompt_template", reprompt_template, ("{prompt}", "{solution}")),
                                     ("solution_template", solution_template, ("{solution}",))):
            missing = [k for k in keys if k not in template]
            if missing:
                problems.append(f"{name} must contain {' and '.join(keys)}, missing {missing}: {template!r}")
        if problems:
            raise ValueError("SelfDistillationModule: " + "; ".join(problems))
        self.ema_rate, self.success_threshold = ema_rate, success_threshold
        self.dont_reprompt_on_self_success, self.remove_thinking = dont_reprompt_on_self_success, remove_thinking
        self.reprompt_template, self.solution_template = reprompt_template, solution_template
        self.teacher = copy.deepcopy(self.policy).eval().requires_grad_(False)  # θ̄, checkpointed as a submodule
        self._hidden: tuple[RolloutBatch, Tensor] | None = None  # the latest policy forward, read by auxiliary_loss

    # ------------------------------------------------------------------ 1. teacher context
    def score(self, rollouts: RolloutBatch) -> RolloutBatch:
        rollouts = super().score(rollouts)
        contexts = teacher_contexts(
            [s["prompt"] for s in rollouts.samples], rollouts.completions,
            (rollouts.rewards >= self.success_threshold).tolist(), rollouts.group_ids.tolist(),
            dont_reprompt_on_self_success=self.dont_reprompt_on_self_success, remove_thinking=self.remove_thinking,
            reprompt_template=self.reprompt_template, solution_template=self.solution_template)
        return rollouts.replace(samples=[dict(s, teacher_prompt=c) for s, c in zip(rollouts.samples, contexts)])

    # ------------------------------------------------------------------ 2. distributions in the update
    def completion_hidden(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
        hidden = super().completion_hidden(model, batch)  # (B, T, H)
        if model is self.policy and torch.is_grad_enabled():
            self._hidden = (batch, hidden)
        return hidden

    def _full_logprobs(self, model: torch.nn.Module, hidden: Tensor) -> Tensor:
        head = model.get_output_embeddings()
        logits = F.linear(hidden, head.weight, head.bias).float() / self.sampling.temperature  # (N, V)
        return torch.log_softmax(logits, dim=-1)

    def distillation(self, micro: RolloutBatch, hidden: Tensor) -> tuple[Distillation, Tensor, Tensor]:
        """Student/teacher top-k (+ tail) distributions, and the student's log-probs and entropy of the sampled
        tokens, all from the policy forward ``hidden (B, T, H)``. -> Distillation, (B, T), (B, T)."""
        m = micro.completion_mask  # (B, T)
        B, T = m.shape
        logp = self._full_logprobs(self.policy, hidden[m])  # (N, V) with gradient
        index = logp.detach().topk(min(self.loss_fn.top_k, logp.shape[-1]), dim=-1).indices  # (N, K) student's top-k
        student = topk_with_tail(logp, index, add_tail=self.loss_fn.add_tail)  # (N, C)
        with torch.no_grad():
            has_teacher = torch.tensor([s.get("teacher_prompt") is not None for s in micro.samples], dtype=torch.bool,
                                       device=m.device)  # (B,)
            ids, mask = self.encode_prompts([{"prompt": s.get("teacher_prompt") or s["prompt"]} for s in micro.samples])
            t_hidden = self.completion_hidden(self.teacher, micro.replace(prompt_ids=ids, prompt_mask=mask))  # (B, T, H)
            t_logp = self._full_logprobs(self.teacher, t_hidden[m])  # (N, V)
            teacher = topk_with_tail(t_logp, index, add_tail=self.loss_fn.add_tail)  # (N, C)
            t_entropy = -(t_logp.exp() * t_logp).sum(-1)  # (N,)
        C = student.shape[-1]
        uniform = -math.log(C)  # off the mask: any valid distribution (never read by the loss)
        scatter = lambda x: x.new_full((B, T, C), uniform).index_put((m,), x)  # noqa: E731 (N, C) -> (B, T, C)
        tokens = logp.gather(-1, micro.completion_ids[m][:, None]).squeeze(-1)  # (N,) ℓ of the sampled tokens
        entropy = -(logp.detach().exp() * logp.detach()).sum(-1)  # (N,)
        zeros = torch.zeros((B, T), dtype=logp.dtype, device=logp.device)
        distill = Distillation(student=scatter(student), teacher=scatter(teacher),
                               teacher_entropy=zeros.index_put((m,), t_entropy), has_teacher=has_teacher)
        return distill, zeros.index_put((m,), tokens), zeros.index_put((m,), entropy)

    def auxiliary_loss(self, micro: RolloutBatch, out: LossOutput, normaliser: Normaliser) -> LossOutput:
        """Replace the plain loop's loss (no logits there) by the self-distillation loss of this micro-batch."""
        cached, self._hidden = self._hidden, None
        if cached is None or cached[0] is not micro:
            raise RuntimeError("SelfDistillationModule: no policy forward cached for this micro-batch")
        distill, logprobs, entropy = self.distillation(micro, cached[1])
        old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
        new = self.loss_fn(logprobs, old, micro.advantages, micro.completion_mask, ref_logprobs=micro.ref_logprobs,
                           entropy=entropy, normaliser=normaliser, batch=micro, distill=distill)
        return LossOutput(loss=out.loss + new.loss, metrics={**out.metrics, **new.metrics})

    # ------------------------------------------------------------------ 3. EMA teacher
    def update(self, rollouts: RolloutBatch) -> dict[str, Tensor]:
        metrics = super().update(rollouts)
        ema_update_(self.teacher, self.policy, self.ema_rate)
        return metrics
