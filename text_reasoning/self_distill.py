"""Self-distillation from an EMA self-teacher re-prompted with a successful sibling's answer: SDPO (arXiv
2601.20802) and SRPO (arXiv 2604.02288). The losses are in ``common/losses/self_distill.py`` and
``common/losses/srpo.py``; the method part :class:`SelfDistillation` (``methods:`` in YAML, on the plain
``text_reasoning.module.TextReasoningModule``) supplies what they need from the model, at three hooks:

    1. teacher context (``after_score``): x̃_i = reprompt(x, solution_i), chat-templated into the declared fields
       RolloutBatch.teacher_prompt_ids / teacher_prompt_mask (B, P'), and has_teacher (B,) = h_i
           "{prompt}\\nCorrect solution:\\n\\n{solution}\\n\\n\\n\\nCorrectly solve the original question."
       (templates as in the SDPO code's config: reprompt "{prompt}{solution}{feedback}\\n\\nCorrectly solve the original
       question.", solution "\\nCorrect solution:\\n\\n{successful_previous_attempt}\\n\\n"; no feedback here)
       solution_i = the first successful sibling j ≠ i of the same prompt (reward >= success_threshold), thinking
       tags stripped; h_i = 1 iff one exists (no environment feedback in these tasks)
    2. in the update (``loss_inputs``), from the micro-batch's one policy forward (its hidden states): the student's
       full next-token log-probs at the completion positions, its top-k indices, and the EMA teacher's log-probs on
       x̃_i + y_i gathered there (teacher-forced, no gradient), plus the teacher's full-vocabulary entropy (SRPO's
       weight); passed to the loss as ``distill``, which the loop calls once
    3. after every update (``after_update``): θ̄ ← (1 − η)θ̄ + ηθ. The teacher's weights are a submodule of the
       method, so they are in the Lightning checkpoint and a resumed run continues with the same teacher.

The full (N, V) logits of the micro-batch's completion tokens are materialised (N = valid tokens): choose
``micro_batch_size`` accordingly (SmolLM2: 49,152 x 4 bytes per token).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.losses.self_distill import Distillation, SDPOLoss, ema_update_, topk_with_tail
from common.methods.base import Method
from common.policies.base import PolicyOutput
from common.policies.causal_lm import CausalLMPolicy

if TYPE_CHECKING:
    from common.loop import Loop

MAX_DEMONSTRATION_CHARS = 10_000  # a sibling's completion is cut to its first this many characters before any scan


def strip_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` spans (each ``<think>`` up to the first ``</think>`` after it; an
    unclosed ``<think>`` and what follows stay), as ``re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)``
    but in one left-to-right pass of ``str.find``: linear in ``len(text)`` (the lazy regex is quadratic on a long
    unclosed ``<think>``: it rescans the tail from every ``<think>``)."""
    out, pos = [], 0
    while (start := text.find("<think>", pos)) >= 0:
        end = text.find("</think>", start + len("<think>"))
        if end < 0:
            break  # no closing tag after this one, so none after any later <think> either
        out.append(text[pos:start])
        pos = end + len("</think>")
    out.append(text[pos:])
    return "".join(out)


def teacher_contexts(prompts: Sequence[str], completions: Sequence[str], success: Sequence[bool],
                     group_ids: Sequence[int], *, dont_reprompt_on_self_success: bool = True,
                     remove_thinking: bool = True,
                     reprompt_template: str = "{prompt}{solution}\n\nCorrectly solve the original question.",
                     solution_template: str = "\nCorrect solution:\n\n{solution}\n\n") -> list[str | None]:
    """The teacher's prompt for every row, or None where no successful sibling exists (SDPO code
    ``_maybe_build_self_distillation_batch``): the first successful row of the same group, excluding the row
    itself when ``dont_reprompt_on_self_success``. The demonstration is the sibling's first
    ``MAX_DEMONSTRATION_CHARS`` characters (its thinking stripped in linear time). Host-side text: one pass over B
    strings."""
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
        text = completions[donors[0]][:MAX_DEMONSTRATION_CHARS]  # model output is hostile input: bounded first
        if remove_thinking:
            text = strip_thinking(text).strip()
        out.append(reprompt_template.format(prompt=prompts[i], solution=solution_template.format(solution=text)))
    return out


class SelfDistillation(Method):
    """SDPO / SRPO's EMA self-teacher as a method part (module docstring). It wires: the loss
    (``common.losses.self_distill.SDPOLoss`` or ``common.losses.srpo.SRPOLoss``, checked once in ``setup``), which it
    feeds ``distill`` from the update's one policy forward; the teacher contexts, as the declared batch fields
    ``teacher_prompt_ids``, ``teacher_prompt_mask`` and ``has_teacher``; the EMA teacher θ̄, a frozen copy of the
    policy's model made in ``setup`` (a submodule, so it is in the checkpoint).

    Args:
        ema_rate: η of the teacher update θ̄ ← (1 − η)θ̄ + ηθ (code 0.05; 1 = the teacher is the current student).
        success_threshold: a rollout with reward >= this is a successful demonstration (code 0.5).
        dont_reprompt_on_self_success: never use a row's own answer as its demonstration (code True).
        remove_thinking: strip ``<think>...</think>`` from demonstrations (code True).
        reprompt_template: the teacher's user message, with ``{prompt}`` and ``{solution}``.
        solution_template: how the demonstration is inserted, with ``{solution}``.
    """

    provides = ("teacher_prompt_ids", "teacher_prompt_mask", "has_teacher")
    needs_hidden = True

    def __init__(
        self,
        ema_rate: float = 0.05,
        success_threshold: float = 0.5,
        dont_reprompt_on_self_success: bool = True,
        remove_thinking: bool = True,
        reprompt_template: str = "{prompt}{solution}\n\nCorrectly solve the original question.",
        solution_template: str = "\nCorrect solution:\n\n{solution}\n\n",
    ):
        super().__init__()
        problems = []
        if not 0 < ema_rate <= 1:
            problems.append(f"ema_rate must be in (0, 1], got {ema_rate}")
        for name, template, keys in (("reprompt_template", reprompt_template, ("{prompt}", "{solution}")),
                                     ("solution_template", solution_template, ("{solution}",))):
            missing = [k for k in keys if k not in template]
            if missing:
                problems.append(f"{name} must contain {' and '.join(keys)}, missing {missing}: {template!r}")
        if problems:
            raise ValueError("SelfDistillation: " + "; ".join(problems))
        self.ema_rate, self.success_threshold = ema_rate, success_threshold
        self.dont_reprompt_on_self_success, self.remove_thinking = dont_reprompt_on_self_success, remove_thinking
        self.reprompt_template, self.solution_template = reprompt_template, solution_template
        self.teacher: torch.nn.Module | None = None

    def setup(self, loop: "Loop") -> None:
        problems = []
        if not isinstance(loop.loss, SDPOLoss):
            problems.append(f"loss must be a common.losses.self_distill.SDPOLoss or common.losses.srpo.SRPOLoss, "
                            f"got {type(loop.loss).__name__}")
        if not isinstance(loop.policy, CausalLMPolicy):  # re-prompting needs text prompts and a chat template
            problems.append(f"policy must be a common.policies.causal_lm.CausalLMPolicy, got {type(loop.policy).__name__}")
        if problems:
            raise ValueError("SelfDistillation: " + "; ".join(problems))
        # θ̄: made here, inside the module's __init__, so a checkpoint's teacher weights load into it
        self.teacher = copy.deepcopy(loop.policy.model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ 1. teacher context
    def after_score(self, loop: "Loop", batch: RolloutBatch) -> RolloutBatch:
        contexts = teacher_contexts(
            [s["prompt"] for s in batch.samples], batch.completions,
            (batch.rewards >= self.success_threshold).tolist(), batch.group_ids.tolist(),
            dont_reprompt_on_self_success=self.dont_reprompt_on_self_success, remove_thinking=self.remove_thinking,
            reprompt_template=self.reprompt_template, solution_template=self.solution_template)
        # rows without a teacher keep their own prompt (never read by the loss: h_i = 0)
        ids, mask = loop.policy.encode([{"prompt": c if c is not None else s["prompt"]}
                                        for s, c in zip(batch.samples, contexts)])  # (B, P') left-padded
        has_teacher = torch.tensor([c is not None for c in contexts], dtype=torch.bool, device=ids.device)  # (B,)
        return batch.replace(teacher_prompt_ids=ids, teacher_prompt_mask=mask, has_teacher=has_teacher)

    # ------------------------------------------------------------------ 2. distributions in the update
    def distillation(self, loop: "Loop", micro: RolloutBatch, hidden: Tensor) -> tuple[Distillation, Tensor, Tensor]:
        """Student/teacher top-k (+ tail) distributions, and the student's log-probs and entropy of the sampled
        tokens, all from the policy forward ``hidden (B, T, H)``. -> Distillation, (B, T), (B, T)."""
        policy = loop.policy
        m = micro.completion_mask  # (B, T)
        B, T = m.shape
        logp = policy.full_logprobs(hidden[m])  # (N, V) with gradient
        index = logp.detach().topk(min(loop.loss.top_k, logp.shape[-1]), dim=-1).indices  # (N, K) student's top-k
        student = topk_with_tail(logp, index, add_tail=loop.loss.add_tail)  # (N, C)
        with torch.no_grad():
            teacher_rows = micro.replace(prompt_ids=micro.teacher_prompt_ids, prompt_mask=micro.teacher_prompt_mask)
            t_hidden = policy.completion_hidden(self.teacher, teacher_rows)  # (B, T, H)
            t_logp = policy.full_logprobs(t_hidden[m], teacher=self.teacher)  # (N, V)
            teacher = topk_with_tail(t_logp, index, add_tail=loop.loss.add_tail)  # (N, C)
            t_entropy = -(t_logp.exp() * t_logp).sum(-1)  # (N,)
        C = student.shape[-1]
        uniform = -math.log(C)  # off the mask: any valid distribution (never read by the loss)
        scatter = lambda x: x.new_full((B, T, C), uniform).index_put((m,), x)  # noqa: E731 (N, C) -> (B, T, C)
        tokens = logp.gather(-1, micro.completion_ids[m][:, None]).squeeze(-1)  # (N,) ℓ of the sampled tokens
        entropy = -(logp.detach().exp() * logp.detach()).sum(-1)  # (N,)
        zeros = torch.zeros((B, T), dtype=logp.dtype, device=logp.device)
        distill = Distillation(student=scatter(student), teacher=scatter(teacher),
                               teacher_entropy=zeros.index_put((m,), t_entropy),
                               has_teacher=micro.has_teacher.to(m.device))
        return distill, zeros.index_put((m,), tokens), zeros.index_put((m,), entropy)

    def loss_inputs(self, loop: "Loop", micro: RolloutBatch, out: PolicyOutput,
                    inputs: dict[str, Any]) -> dict[str, Any]:
        """``distill`` for the loss, with the sampled tokens' log-probs and entropies read from the same full
        distribution (π_old = those log-probs detached when the loop computed no old log-probs)."""
        distill, logprobs, entropy = self.distillation(loop, micro, out.hidden)
        extra = dict(distill=distill, logprobs=logprobs, entropy=entropy)
        if micro.old_logprobs is None:
            extra["old_logprobs"] = logprobs.detach()
        return extra

    # ------------------------------------------------------------------ 3. EMA teacher
    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        ema_update_(self.teacher, loop.policy.model, self.ema_rate)
        return {}
