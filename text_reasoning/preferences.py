"""The offline preference path for DPO / ADPO (``common/losses/preference.py``): fixed candidate completions per
prompt, read from a local jsonl file or generated, go through the same update loop as online rollouts.

The method part :class:`OfflineCandidates` replaces the training rollout: it returns each prompt's candidates as
the rows of one group (teacher-forced, nothing is sampled), with their labels in the declared field
``preference_score`` (chosen 1, rejected 0, or a list's scores) and the rewards already set from them, so the loop
does not score them. ``DPOLoss`` then pairs the best with the worst candidate, ``ADPOLoss`` fits the whole list.
Validation and pass@k still sample from the policy (the task's verifier scores them).

jsonl rows (TRL's pairwise format, or a list):
    {"prompt": "...", "chosen": "...", "rejected": "..."}            optional "answer", "task" for validation
    {"prompt": "...", "completions": ["...", ...], "scores": [0.2, ...]}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.batch import RolloutBatch
from common.methods.base import Method
from common.policies.causal_lm import CausalLMPolicy
from text_reasoning import tasks
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

if TYPE_CHECKING:
    from common.loop import Loop


class PreferenceFile(TaskSource):
    """Preference data from a local jsonl file (see the module docstring), read with HF ``datasets``.

    Args:
        path: the .jsonl file.
    """

    def __init__(self, path: str):
        if Path(path).suffix not in (".jsonl", ".json"):
            raise ValueError(f"path must end in .jsonl or .json, got {path!r}")
        self.path = path

    def make(self, n: int, seed: int) -> list[Problem]:
        import datasets

        ds = datasets.load_dataset("json", data_files=str(self.path), split="train")
        pairwise = {"prompt", "chosen", "rejected"} <= set(ds.column_names)
        listwise = {"prompt", "completions", "scores"} <= set(ds.column_names)
        if not (pairwise or listwise):
            raise ValueError(f"{self.path}: rows need prompt/chosen/rejected or prompt/completions/scores, "
                             f"got columns {ds.column_names}")
        rows = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
        out = []
        for i, row in enumerate(rows):  # ok: host-side file reading
            if pairwise:
                candidates = [[row["chosen"], 1.0], [row["rejected"], 0.0]]
            else:
                if len(row["completions"]) != len(row["scores"]) or len(row["completions"]) < 2:
                    raise ValueError(f"{self.path} row {i}: completions and scores must be lists of the same length >= 2")
                candidates = [[c, float(s)] for c, s in zip(row["completions"], row["scores"])]
            out.append(Problem(prompt=row["prompt"], answer=str(row.get("answer") or ""),
                               task=row.get("task") or "preference", level=0, meta={"candidates": candidates}))
        return out


class ArithmeticPreferences(TaskSource):
    """Generated preference data on arithmetic: chosen "a op b = c" (score 1) against ``num_wrong`` answers with a
    wrong result c + δ, δ ≠ 0 (score 0). With ``num_wrong`` > 1 each prompt is a list (ADPO's listwise case).

    Args:
        digits: digits per operand.
        ops: operators, a subset of "+-*".
        num_wrong: wrong candidates per prompt.
    """

    def __init__(self, digits: int = 2, ops: str = "+", num_wrong: int = 1):
        if num_wrong < 1:
            raise ValueError(f"num_wrong must be >= 1, got {num_wrong}")
        self.digits, self.ops, self.num_wrong = digits, ops, num_wrong

    def make(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(seed + 7919)
        out = []
        for p in tasks.arithmetic(n, digits=self.digits, ops=self.ops, seed=seed):  # ok: host-side data generation
            a, b = p.meta["operands"]
            deltas = rng.sample([d for d in range(-9, 10) if d], self.num_wrong)
            candidates = [[f"{a} {p.meta['op']} {b} = {p.answer}", 1.0]]
            candidates += [[f"{a} {p.meta['op']} {b} = {int(p.answer) + d}", 0.0] for d in deltas]
            out.append(Problem(p.prompt, p.answer, p.task, p.level, {**p.meta, "candidates": candidates}))
        return out


class OfflineCandidates(Method):
    """DPO / ADPO on fixed candidates (module docstring): the training rollout returns the candidates of each prompt
    as one group, teacher-forced, with ``preference_score`` (B,) and ``rewards`` = the labels, ``correct`` = label
    > 0.5. Completions longer than ``sampling.max_new_tokens`` are cut there (``truncated``); each gets the EOS
    token the policy would end with. The loop's ``group_size`` is unused in training (a group is a prompt's list).
    """

    provides = ("preference_score",)

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.policy, CausalLMPolicy):
            raise ValueError(f"OfflineCandidates tokenises text candidates for a CausalLMPolicy, got {type(loop.policy).__name__}")

    def rollout(self, loop: "Loop", prompts: Sequence[dict], n: int) -> RolloutBatch:
        missing = [i for i, s in enumerate(prompts) if not s.get("candidates")]
        if missing:
            raise ValueError(f"OfflineCandidates: prompts {missing[:5]} have no 'candidates'; use a preference "
                             "task source (text_reasoning.preferences.PreferenceFile / ArithmeticPreferences)")
        policy = loop.policy
        device, tok = policy.device, policy.tokenizer
        texts = [c[0] for s in prompts for c in s["candidates"]]
        score = torch.tensor([float(c[1]) for s in prompts for c in s["candidates"]], device=device)  # (B,)
        counts = torch.tensor([len(s["candidates"]) for s in prompts], device=device)  # (P,)
        ids, mask = policy.encode(prompts)  # (P, L)
        limit = policy.sampling.max_new_tokens
        tokens = [t + [tok.eos_token_id] for t in tok(texts, add_special_tokens=False)["input_ids"]]
        truncated = torch.tensor([len(t) > limit for t in tokens], device=device)  # (B,)
        tokens = [t[:limit] for t in tokens]
        T = max(len(t) for t in tokens)
        completion = torch.tensor([t + [tok.pad_token_id] * (T - len(t)) for t in tokens], device=device)  # (B, T)
        cmask = torch.tensor([[True] * len(t) + [False] * (T - len(t)) for t in tokens], device=device)  # (B, T)
        return RolloutBatch(prompt_ids=ids.repeat_interleave(counts, 0), prompt_mask=mask.repeat_interleave(counts, 0),
                            completion_ids=completion, completion_mask=cmask,
                            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(counts),
                            truncated=truncated, preference_score=score, rewards=score, reward_components=score[:, None],
                            reward_names=("preference",), correct=score > 0.5,
                            samples=[dict(s) for s in prompts for _ in s["candidates"]], completions=texts)
