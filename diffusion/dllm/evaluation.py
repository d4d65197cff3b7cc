"""Evaluation records: the settings an accuracy of a masked-diffusion LM was measured under.

An accuracy of a diffusion LM depends on more than its weights: the prompt template, where a completion ends (the
EOS rule), the generation length T, the number of denoising steps, the block length, the sampler's temperature and
which problems were asked. The issue asks that every reported accuracy carry them; :class:`EvaluationRecord` holds
them, :func:`split_hash` names the problems, and ``DiffusionLMModule``'s validation writes one record per validation
(``evaluation_records.jsonl`` in the run's log folder) beside ``val/accuracy``.

    record = EvaluationRecord.of(policy, problems, greedy=True, verifier=ChainSumCorrect())
    record.write("runs/x/evaluation_record.json", accuracy=0.31, correct=62, n=200)
    print(record.markdown())   # a line for a report
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROBLEM_KEYS = ("prompt", "answer")  # what identifies a problem of a split (the verifier reads ``answer``)
PROMPT_SLOT = "{prompt}"  # where the problem's prompt goes in ``EvaluationRecord.prompt_template``


def split_hash(problems: Sequence[Mapping[str, Any]], keys: Sequence[str] = PROBLEM_KEYS) -> str:
    """SHA-256 (first 16 hex digits) of a split: the sorted canonical JSON of each problem's ``keys`` (missing keys
    are left out). Order-free: the same problems in another order give the same hash; changing, adding or removing
    a problem changes it."""
    rows = sorted(json.dumps({k: p[k] for k in keys if k in p}, sort_keys=True, default=str, ensure_ascii=False)
                  for p in problems)
    h = hashlib.sha256()
    for row in rows:  # ok: hashing, not a hot path
        h.update(row.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class EvaluationRecord:
    """What an accuracy was measured under (module docstring).

    prompt_template: the exact text the model reads, with ``{prompt}`` where the problem's prompt goes (BOS, chat
        template, instruction included).
    eos_rule: where a completion ends for the verifier and for the loss.
    gen_length, steps, block_length: T, denoising steps in all, positions per block (LLaDA sampler).
    temperature: the sampler's Gumbel-max temperature (0 = greedy argmax).
    split_hash: :func:`split_hash` of the problems; n_problems: how many.
    sampler: which sampler produced the completions.
    verifier: the class deciding correctness.
    shift: Dream's shift of the model (token i predicted at position i − 1).
    """

    prompt_template: str
    eos_rule: str
    gen_length: int
    steps: int
    block_length: int
    temperature: float
    split_hash: str
    n_problems: int
    sampler: str = "LLaDA low-confidence remasking (diffusion.dllm.sampler.sample)"
    verifier: str = ""
    shift: bool = False

    @classmethod
    def of(cls, policy: Any, problems: Sequence[Mapping[str, Any]], *, greedy: bool = True,
           verifier: Any = None) -> "EvaluationRecord":
        """The record of ``policy`` (a ``MaskedDiffusionPolicy``) evaluated on ``problems``: greedy (temperature 0)
        or at the policy's sampling temperature."""
        tok = policy.tokenizer
        body = tok.apply_chat_template([{"role": "user", "content": PROMPT_SLOT + policy.instruction}], tokenize=False,
                                       add_generation_prompt=True)
        eos = tok.eos_token
        rule = (f"the completion is the text before the first {eos!r} (id {tok.eos_token_id}); the loss covers "
                + ("all T positions (EOS padding included)" if policy.include_eos_padding
                   else "the tokens up to and including the first EOS") + "; a completion without EOS is truncated")
        return cls(prompt_template=tok.bos_token + body, eos_rule=rule, gen_length=int(policy.gen_length),
                   steps=int(policy.steps), block_length=int(policy.block_length),
                   temperature=0.0 if greedy else float(policy.temperature), split_hash=split_hash(problems),
                   n_problems=len(problems), verifier="" if verifier is None else
                   f"{type(verifier).__module__}.{type(verifier).__qualname__}",
                   shift=bool(getattr(policy.model, "shift", False)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path, **result: Any) -> Path:
        """Write the record and ``result`` (accuracy, n correct, step, ...) as one JSON object to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "record": self.to_dict()}, indent=2, ensure_ascii=False) + "\n")
        return path

    def append(self, path: str | Path, **result: Any) -> Path:
        """Append the record and ``result`` as one JSON line to ``path`` (one line per validation)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({**result, "record": self.to_dict()}, ensure_ascii=False) + "\n")
        return path

    def markdown(self) -> str:
        """One line for a report."""
        sampling = "greedy (temperature 0)" if self.temperature == 0 else f"temperature {self.temperature:g}"
        template = self.prompt_template.replace("\n", "\\n")
        return (f"prompt template `{template}`; EOS rule: {self.eos_rule}; T = {self.gen_length}, {self.steps} steps, "
                f"block {self.block_length}, {sampling}; shift {self.shift}; split hash `{self.split_hash}` "
                f"({self.n_problems} problems); verifier {self.verifier or '-'}")


__all__ = ["EvaluationRecord", "PROMPT_SLOT", "split_hash"]
