"""``advlab predict``: completions from a checkpoint for a prompt file or a task split, written as JSONL.

Lightning's own predict machinery does the work: :class:`PromptData` is the data module whose
``predict_dataloader`` serves the prompts (a file's rows, or the ``val``/``train`` split of the recipe's data module)
as :class:`PredictBatch` es; ``PolicyOptimizationModule.predict_step`` samples them with ``policy.rollout`` (greedy or
sampled, ``n`` per prompt) and scores them with the module's reward functions and verifier where the prompts carry
what those need; :class:`JSONLPredictionWriter` (a ``BasePredictionWriter``) appends one JSON line per completion:

    {"prompt_index": 0, "n": 1, "prompt": "What is 12 + 30?", "completion": "...", "truncated": false,
     "answer": "42", "reward": 1.0, "correct": true}

``answer``, ``reward`` and ``correct`` are present only where the prompt has an answer (a task split, or a JSONL
file with an ``answer`` column) and the module has a verifier. The file is written to ``<output>.partial`` and
renamed to ``<output>`` when prediction ends, so a killed run never leaves a file that looks complete. Under data
parallelism every rank writes ``<stem>.rank<r>.jsonl``.

Prompt files: ``.jsonl`` (one JSON object a line, the prompt in ``column``, other keys kept as the sample's fields:
``answer``, ``task``, ...) or any other suffix as plain text, one prompt a line (blank lines skipped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

MAX_PROMPT_CHARS = 1_000_000  # a longer line is not a prompt (a wrong file): refused, not tokenised


@dataclass
class PredictOptions:
    """What ``advlab predict`` generates (``--output``, ``--prompts``, ``--n``, ... on the command line).

    Args:
        output: the JSONL file to write (one line per completion); its folder is created.
        prompts: a prompt file (.jsonl with a ``column`` field, or plain text, one prompt a line). None = ``split``.
        split: the recipe's data split to predict on when no prompt file is given ("val" = the held-out set).
        column: the prompt field of a .jsonl file.
        n: completions per prompt.
        greedy: greedy decoding (then n must be 1); false = sample with the recipe's ``sampling`` settings.
        batch_size: prompts per predict batch.
        score: add reward and correctness; None = when the prompts carry an ``answer`` (a split always does).
    """

    output: str | None = None
    prompts: str | None = None
    split: Literal["val", "train"] = "val"
    column: str = "prompt"
    n: int = 1
    greedy: bool = True
    batch_size: int = 16
    score: bool | None = None

    def problems(self) -> list[str]:
        """One line per bad option (empty when all are good); the file itself is checked by :func:`read_prompts`."""
        out = []
        if not self.output:
            out.append("--output is required: the JSONL file to write (e.g. --output completions.jsonl)")
        elif Path(self.output).is_dir():
            out.append(f"--output {self.output!r} is a directory; expected a file path such as {self.output}/completions.jsonl")
        if self.n < 1:
            out.append(f"--n must be a positive integer, got {self.n}")
        elif self.greedy and self.n > 1:
            out.append(f"--n {self.n} with --greedy true gives {self.n} identical completions; "
                       "add --greedy false to sample")
        if self.batch_size < 1:
            out.append(f"--batch_size must be a positive integer, got {self.batch_size}")
        return out


def read_prompts(path: str | os.PathLike, column: str = "prompt") -> list[dict]:
    """The samples of a prompt file: ``{column: prompt, ...}`` rows of a .jsonl file (renamed to ``prompt``), or
    ``{"prompt": line}`` for every non-blank line of a text file. Raises ``ValueError``/``FileNotFoundError``
    naming ``--prompts``, the file and the line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist (resolved: {p.resolve()})")
    if not p.is_file():
        raise ValueError(f"--prompts {str(path)!r} is not a file; expected a .jsonl or text file of prompts")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {str(path)!r} cannot be read as UTF-8 text: {e}") from None
    samples = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"--prompts {str(path)!r} line {i} has {len(line)} characters (at most {MAX_PROMPT_CHARS})")
        if p.suffix != ".jsonl":
            samples.append({"prompt": line})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {str(path)!r} line {i} is not JSON ({e.msg}); expected one object a line") from None
        if not isinstance(row, dict) or not isinstance(row.get(column), str):
            raise ValueError(f"--prompts {str(path)!r} line {i} has no string field {column!r} "
                             f"(set --column to the prompt's field); got {str(row)[:120]}")
        row["prompt"] = row.pop(column)
        samples.append(row)
    if not samples:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt (empty or only blank lines)")
    return samples


@dataclass
class PredictBatch:
    """One predict batch: the prompts' samples, their indices in the prompt set, and how to sample them."""

    samples: list[dict]
    indices: list[int]
    n: int = 1
    greedy: bool = True
    score: bool = False


class PromptData(L.LightningDataModule):
    """A data module for prediction only: ``samples`` in batches of ``batch_size`` (in order), each a
    :class:`PredictBatch` that says how many completions to draw, greedy or not, and whether to score them."""

    def __init__(self, samples: list[dict], batch_size: int = 16, n: int = 1, greedy: bool = True, score: bool = False):
        super().__init__()
        self.samples, self.batch_size, self.n, self.greedy, self.score = samples, batch_size, n, greedy, score

    def predict_dataloader(self) -> DataLoader:
        def collate(rows: list[tuple[int, dict]]) -> PredictBatch:
            return PredictBatch([s for _, s in rows], [i for i, _ in rows], self.n, self.greedy, self.score)

        return DataLoader(list(enumerate(self.samples)), batch_size=self.batch_size, shuffle=False, collate_fn=collate)


def prediction_records(batch: PredictBatch, rollouts) -> list[dict]:
    """One JSON-ready dict per completion of ``rollouts`` (B = len(batch.samples) x n rows, prompt-major)."""
    n = batch.n
    truncated = rollouts.truncated.tolist() if rollouts.truncated is not None else [None] * rollouts.batch_size
    scored = batch.score and rollouts.rewards is not None
    rewards = rollouts.rewards.tolist() if scored else None
    correct = rollouts.correct.tolist() if scored and rollouts.correct is not None else None
    out = []
    for b, completion in enumerate(rollouts.completions):  # ok: host-side, one JSON line per completion
        sample = batch.samples[b // n]
        rec = {"prompt_index": batch.indices[b // n], "n": b % n, "prompt": sample.get("prompt"), "completion": completion}
        if truncated[b] is not None:
            rec["truncated"] = bool(truncated[b])
        if "answer" in sample:
            rec["answer"] = sample["answer"]
        if rewards is not None:
            rec["reward"] = float(rewards[b])
            for k, name in enumerate(rollouts.reward_names):
                if len(rollouts.reward_names) > 1:
                    rec.setdefault("rewards", {})[name] = float(rollouts.reward_components[b, k])
        if correct is not None:
            rec["correct"] = bool(correct[b])
        out.append(rec)
    return out


class JSONLPredictionWriter(BasePredictionWriter):
    """Writes every predict batch's records (``predict_step``'s list of dicts) as JSON lines to ``output``.

    Lines go to ``<output>.partial`` as batches finish (flushed, so a long run can be followed with ``tail -f``)
    and the file is renamed to ``output`` at the end of prediction. Counts lines, scored lines and correct ones.
    """

    def __init__(self, output: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.path: Path | None = None
        self._file = None
        self.lines = self.scored = self.correct = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = self.output
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path.with_name(path.name + ".partial"), "w", encoding="utf-8")
        self.lines = self.scored = self.correct = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for rec in prediction:
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.lines += 1
            if "correct" in rec:
                self.scored += 1
                self.correct += int(rec["correct"])
        self._file.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        os.replace(self.path.with_name(self.path.name + ".partial"), self.path)

    def summary(self) -> str:
        text = f"wrote {self.lines} completions to {self.path}"
        if self.scored:
            text += f" (correct {self.correct}/{self.scored} = {self.correct / self.scored:.3f})"
        return text
