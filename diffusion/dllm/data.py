"""The chain-sum task (domains.md §1(e)) and its DataModule.

Prompt: digits a_1 … a_k (k ∈ {3..6}); the policy reads ``BOS a_1 … a_k =`` (the char tokenizer's plain chat
template adds ``=``). Concise trace y*: the running sums mod 10, s_2 … s_k (s_1 = a_1, s_i = (s_{i−1} + a_i) mod 10),
then ``#``, then the answer s_k; EOS-padded to T = 12 by the model. Hints may come only from s_2 … s_{k−1} (never the
last sum, ``#`` or the answer): ``hint_positions`` lists them. Verbose trace (the SFT ablation): each step written
``a+s=s';`` (4 tokens after the first), truncated at T.

Samples are dicts: ``prompt``, ``answer`` (s_k), ``trace`` (concise y*), ``verbose`` (the verbose trace), ``task``,
``level`` (= k), ``hint_positions`` (trace positions that may be hints).

:class:`ReasoningTaskData` is the same for text_reasoning's generated tasks (the arithmetic generator by default):
text_reasoning's own ``ReasoningData`` (same tasks and seed -> the same problems and the same held-out split), each
sample given its reference trace (``text_reasoning.traces.reference_solution``, e.g. ``"23 + 45 = 68. The answer is
68."``) and the trace positions that may be hints: the trace's prefix that does not depend on the answer
(:func:`answer_free_prefix`: ``"23 + 45 = "``), so a hint never holds an answer character.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.data import SEED_STRIDE, ResumableData
from text_reasoning.data import ReasoningData, TaskSource
from text_reasoning.traces import reference_solution

ALPHABET = "0123456789#+;"  # digits, the answer separator, the verbose trace's symbols ('=' is the template's)


def chain_sum(n: int, ks: Sequence[int] = (3, 4, 5, 6), seed: int = 0, weights: Sequence[float] | None = None) -> list[dict]:
    """``n`` chain-sum problems with k drawn from ``ks`` (with ``weights``, default uniform)."""
    if n < 0 or not ks or any(k < 2 for k in ks):
        raise ValueError(f"chain_sum needs n >= 0 and every k >= 2, got n={n}, ks={list(ks)}")
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(ks), dtype=torch.float64)
    if w.shape[0] != len(ks) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(ks)} non-negative numbers with a positive sum, got {weights}")
    k_idx = torch.multinomial(w, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.long)
    digits = torch.randint(0, 10, (n, max(ks)), generator=g)
    out = []
    for i in range(n):  # ok: data generation, not a hot path
        k = int(ks[int(k_idx[i])])
        a = digits[i, :k].tolist()
        sums = [a[0]]
        for x in a[1:]:
            sums.append((sums[-1] + x) % 10)
        trace = "".join(map(str, sums[1:])) + "#" + str(sums[-1])
        verbose = "".join(f"{x}+{s}={t};" for x, s, t in zip(a[1:], sums[:-1], sums[1:])) + "#" + str(sums[-1])
        out.append({"prompt": "".join(map(str, a)), "answer": str(sums[-1]), "trace": trace, "verbose": verbose,
                    "task": "chain_sum", "level": k, "hint_positions": list(range(k - 2))})
    return out


class ChainSumData(ResumableData):
    """Training prompts (a mix of easy and hard k) and a held-out validation set of hard prompts.

    Args:
        train_ks: k values of the training prompts.
        train_weights: their mixing weights (§1(e): 70 % hard / 30 % easy = e.g. ks (3, 4, 5, 6), weights
            (0.15, 0.15, 0.35, 0.35)); default uniform.
        val_ks: k values of the validation prompts (the hard split).
        train_size, val_size: numbers of problems; no validation prompt is a training prompt.
        prompts_per_step, val_batch_size, seed: see ``common.data.ResumableData``.
    """

    def __init__(self, train_ks: Sequence[int] = (3, 4, 5, 6), train_weights: Sequence[float] | None = None,
                 val_ks: Sequence[int] = (5, 6), train_size: int = 4096, val_size: int = 200, prompts_per_step: int = 8,
                 val_batch_size: int = 100, seed: int = 0):
        super().__init__(prompts_per_step, val_batch_size, seed)
        self.train_ks, self.train_weights, self.val_ks = list(train_ks), train_weights, list(val_ks)
        self.train_size, self.val_size = train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        self.val_set = chain_sum(self.val_size, self.val_ks, self.seed + SEED_STRIDE)
        held_out = {s["prompt"] for s in self.val_set}
        drawn = chain_sum(self.train_size + len(held_out), self.train_ks, self.seed, self.train_weights)
        self.train_set = [s for s in drawn if s["prompt"] not in held_out][: self.train_size]


# The characters of text_reasoning's arithmetic prompts ("What is 23 + 45?") and reference traces ("23 + 45 = 68. The
# answer is 68.") for every digits (1-4) and ops ("+-*"): a TinyDiffusionLM alphabet that can write the task (tested).
ARITHMETIC_ALPHABET = "0123456789+-*= .?TWaehinrstw"
_SENTINEL = "\x00"  # never in an answer: where a trace written for this answer departs from the trace of the real one


def answer_free_prefix(sample: dict) -> int:
    """Length of the reference trace's prefix that does not depend on the answer: the common prefix of
    ``reference_solution(sample)`` and the trace written with the answer replaced by a sentinel character. Every
    position before it is the same whatever the answer (``"23 + 45 = "``); the first answer character is at it."""
    trace, other = reference_solution(sample), reference_solution({**sample, "answer": _SENTINEL})
    n = 0
    while n < min(len(trace), len(other)) and trace[n] == other[n]:  # ok: a few characters, data preparation
        n += 1
    return n


def with_trace(sample: dict) -> dict:
    """``sample`` plus ``trace`` (its reference solution) and ``hint_positions`` (the answer-free prefix's
    positions). Positions are characters: the token positions of a character tokenizer (``TinyDiffusionLM``)."""
    return {**sample, "trace": reference_solution(sample), "hint_positions": list(range(answer_free_prefix(sample)))}


class ReasoningTaskData(ReasoningData):
    """text_reasoning's generated tasks (default: ``text_reasoning.data.Arithmetic()``, two-digit addition) for a
    masked-diffusion LM: ``text_reasoning.data.ReasoningData`` with the same arguments, so the same seed gives the
    same training problems and the same held-out validation problems, each sample with ``trace`` and
    ``hint_positions`` (:func:`with_trace`, IGPO's hint source). Rewards and verifier: text_reasoning's own
    (``text_reasoning.rewards.TaskReward`` on the decoded completion).

    Args: those of ``text_reasoning.data.ReasoningData`` (tasks, train_size, val_size, prompts_per_step,
        val_batch_size, seed, val_tasks).
    """

    def __init__(self, tasks: list[TaskSource] | None = None, train_size: int = 4096, val_size: int = 200,
                 prompts_per_step: int = 8, val_batch_size: int = 100, seed: int = 0,
                 val_tasks: list[TaskSource] | None = None):
        super().__init__(tasks, train_size, val_size, prompts_per_step, val_batch_size, seed, val_tasks)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        super().setup(stage)
        try:
            self.train_set = [with_trace(s) for s in self.train_set]
            self.val_set = [with_trace(s) for s in self.val_set]
        except ValueError as e:  # a task without a reference solution (a local file): no hint source
            raise ValueError(f"ReasoningTaskData: tasks must be generated tasks with a reference solution "
                             f"(text_reasoning.data.Arithmetic, Countdown, KnightsKnaves): {e}") from None


__all__ = ["ALPHABET", "ARITHMETIC_ALPHABET", "ChainSumData", "ReasoningTaskData", "answer_free_prefix", "chain_sum",
           "with_trace"]
