"""Local datasets: GSM8K / MATH files and any prompt/answer table (``text_reasoning.data.LocalFile``) work with the
default verifier of their format; a bad file is a one-line error naming it. Files are written by the tests (nothing
is downloaded); the answers below are worked out by hand from the rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.models import TinyLlama
from text_reasoning.data import LocalFile, ReasoningData
from text_reasoning.module import TextReasoningModule
from text_reasoning.rewards import TaskReward
from text_reasoning.tasks import local_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from startup import advlab_failure  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# GSM8K's format: a worked solution with calculator annotations, the final answer after "####" (commas allowed).
GSM8K = [
    {"question": f"Tom has {i} boxes of 100 pencils and buys {i + 1} more boxes. How many pencils does he have?",
     "answer": f"He has {i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1} boxes.\n"
               f"{2 * i + 1} * 100 = <<{2 * i + 1}*100={(2 * i + 1) * 100}>>{(2 * i + 1) * 100}\n"
               f"#### {(2 * i + 1) * 100:,}"}
    for i in range(12)
]  # row i: (2i + 1) * 100 pencils; row 5 -> "#### 1,100" -> "1100"
# MATH's format: a solution with the answer in \boxed{...} (nested braces), a "Level N" label.
MATH = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "solution": "Add: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$.",
     "level": "Level 2", "type": "Algebra"},
    {"problem": "Solve $x + 3 = 10$.", "solution": "Subtract 3 (not \\boxed{3}): $x = \\boxed{7}$.",
     "level": "Level 1", "type": "Algebra"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_gsm8k_file_is_scored_by_the_default_verifier(tmp_path):
    """The bug: the default verifier (TaskReward) raised on task "gsm8k". Now the answer after "####" is the gold
    (commas removed) and the completion's last number is checked against it."""
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    problems = local_problems(path, "gsm8k")
    assert [p.answer for p in problems] == [str((2 * i + 1) * 100) for i in range(12)]
    assert {p.task for p in problems} == {"gsm8k"} and problems[0].prompt == GSM8K[0]["question"]
    data = ReasoningData(tasks=[LocalFile(str(path))], train_size=8, val_size=4)
    data.setup()
    assert not {s["prompt"] for s in data.train_set} & {s["prompt"] for s in data.val_set}
    assert len(data.train_set) == 8 and len(data.val_set) == 4
    samples = data.train_set[:3]
    gold = [int(s["answer"]) for s in samples]
    right = [f"So {g // 100} boxes, that is {g:,} pencils." for g in gold]  # "1,100": the comma is a separator
    wrong = [f"#### {g + 100}" for g in gold]
    verifier = TextReasoningModule(policy=TinyLlama()).verifier  # the module's default verifier
    assert verifier(right, samples).tolist() == [1.0] * 3
    assert verifier(wrong, samples).tolist() == [0.0] * 3


def test_a_math_file_is_scored_by_math_verify(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH)
    problems = local_problems(path, "math")
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "2\\sqrt{2}", "7"]  # the last box, its braces balanced
    assert [p.level for p in problems] == [1, 2, 1] and {p.task for p in problems} == {"math"}
    samples = [p.as_sample() for p in problems]
    completions = ["It is \\boxed{0.5}.", "$\\boxed{\\sqrt{8}}$", "x = 7"]  # equal by value, not by text
    assert TaskReward()(completions, samples).tolist() == [1.0, 1.0, 1.0]
    assert TaskReward()(["\\boxed{1/3}", "\\boxed{2}", "x = 3"], samples).tolist() == [0.0, 0.0, 0.0]


def test_a_column_mapping_reads_any_jsonl_or_parquet_table(tmp_path):
    rows = {"instruction": ["Half of 9?", "Three quarters as a fraction?"], "target": ["4.5", "\\frac{3}{4}"],
            "level": [3, 4]}
    parquet = tmp_path / "mine.parquet"
    pq.write_table(pa.table(rows), parquet)
    jsonl = write_jsonl(tmp_path / "mine.jsonl", [dict(zip(rows, values)) for values in zip(*rows.values())])
    for path in (parquet, jsonl):
        source = LocalFile(str(path), format="plain", prompt_column="instruction", answer_column="target")
        problems = source.make(10, seed=0)  # n > rows: all of them, shuffled
        assert sorted((p.prompt, p.answer, p.level) for p in problems) == sorted(zip(*rows.values()))
        samples = [p.as_sample() for p in sorted(problems, key=lambda p: p.level)]
        assert TaskReward()(["\\boxed{9/2}", "it is 0.75"], samples).tolist() == [1.0, 1.0]
        assert TaskReward()(["4", "\\boxed{3/5}"], samples).tolist() == [0.0, 0.0]
    # a GSM8K-style file under other column names
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"q": r["question"], "sol": r["answer"]} for r in GSM8K[:2]])
    assert [p.answer for p in LocalFile(str(renamed), prompt_column="q", answer_column="sol").make(2, 0)] != []
    assert sorted(p.answer for p in local_problems(renamed, "gsm8k", "q", "sol")) == ["100", "300"]


def test_validation_from_a_separate_test_file(tmp_path):
    """val_tasks: GSM8K's test split beside its train split; a prompt in both files is never trained on."""
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K[:8])
    test = write_jsonl(tmp_path / "test.jsonl", GSM8K[6:])  # rows 6, 7 are in both files
    data = ReasoningData(tasks=[LocalFile(str(train))], val_tasks=[LocalFile(str(test))], train_size=100, val_size=6)
    data.setup()
    assert sorted(s["prompt"] for s in data.val_set) == sorted(r["question"] for r in GSM8K[6:])
    assert sorted(s["prompt"] for s in data.train_set) == sorted(r["question"] for r in GSM8K[:6])


def test_same_seed_same_draw(tmp_path):
    source = LocalFile(str(write_jsonl(tmp_path / "g.jsonl", GSM8K)))
    assert source.make(5, 3) == source.make(5, 3) and source.make(5, 3) != source.make(5, 4)
    assert len(source.make(5, 3)) == 5 == len({p.prompt for p in source.make(5, 3)})


def _bad_files(tmp: Path) -> dict[str, tuple[dict, str]]:
    """name -> (LocalFile arguments, what the one-line message must contain besides the path)."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n\n  \n")
    (tmp / "broken.jsonl").write_text(json.dumps(GSM8K[0]) + "\n{\"question\": \"x\", \n")
    (tmp / "list.jsonl").write_text("[1, 2]\n")
    (tmp / "fake.parquet").write_text("not parquet at all")
    (tmp / "latin1.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    (tmp / "dir.jsonl").mkdir()
    write_jsonl(tmp / "math.jsonl", MATH)
    write_jsonl(tmp / "nomarker.jsonl", [GSM8K[0], {"question": "q", "answer": "42"}])
    write_jsonl(tmp / "nobox.jsonl", [{"problem": "p", "solution": "the answer is 3"}])
    write_jsonl(tmp / "emptyprompt.jsonl", [{"prompt": "  ", "answer": "1"}])
    return {
        "empty": ({"path": "empty.jsonl"}, "no rows"),
        "blank lines only": ({"path": "blank.jsonl"}, "no rows"),
        "missing": ({"path": "nowhere.jsonl"}, "does not exist"),
        "a directory": ({"path": "dir.jsonl"}, "not a file"),
        "wrong suffix": ({"path": "data.csv"}, ".jsonl, .json or .parquet"),
        "invalid JSON line": ({"path": "broken.jsonl"}, "line 2 is not valid JSON"),
        "a row that is not an object": ({"path": "list.jsonl"}, "row 1 is list"),
        "not parquet": ({"path": "fake.parquet"}, "not a readable parquet file"),
        "not UTF-8": ({"path": "latin1.jsonl"}, "not UTF-8"),
        "missing prompt column": ({"path": "math.jsonl", "format": "math", "prompt_column": "question"},
                                  "no column 'question' (prompt_column"),
        "missing answer column": ({"path": "math.jsonl", "format": "gsm8k", "prompt_column": "problem"},
                                  "no column 'answer' (answer_column"),
        "no #### marker": ({"path": "nomarker.jsonl"}, "row 2: answer_column 'answer' holds no final answer"),
        "no boxed answer": ({"path": "nobox.jsonl", "format": "math"}, "row 1: answer_column 'solution'"),
        "empty prompt": ({"path": "emptyprompt.jsonl", "format": "plain"}, "row 1: prompt_column 'prompt'"),
        "unknown format": ({"path": "math.jsonl", "format": "csv"}, "format must be one of"),
    }


def test_a_bad_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, (kwargs, expected) in _bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            LocalFile(**kwargs)
        message = str(info.value)
        assert "\n" not in message and expected in message, f"{name}: {message}"
        assert kwargs["path"] in message or name == "unknown format", f"{name}: {message}"


def test_advlab_with_an_empty_file_fails_in_seconds_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc, extra_s = advlab_failure("fit", "--config", str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"),
                                   "--model.init_args.policy", "common.models.TinyLlama", "--data.init_args.tasks",
                                   json.dumps([{"class_path": "text_reasoning.data.LocalFile",
                                                "init_args": {"path": "empty.jsonl"}}]), cwd=tmp_path)
    assert "empty.jsonl holds no rows" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert extra_s < 10.0, f"{extra_s:.1f} s beyond importing the CLI"
    assert not (tmp_path / "runs/lightning_logs/version_0").exists() or not any((tmp_path / "runs/lightning_logs/version_0").iterdir())


def test_advlab_trains_on_a_gsm8k_file_with_the_readme_keys(tmp_path):
    """The README's recipe: the arithmetic recipe with its data replaced by a local GSM8K file (a second --config),
    shrunk to the tiny model; one step, then held-out accuracy by the default verifier."""
    write_jsonl(tmp_path / "gsm8k_train.jsonl", GSM8K)
    (tmp_path / "gsm8k.yaml").write_text(
        "data:\n"
        "  class_path: text_reasoning.data.ReasoningData\n"
        "  init_args:\n"
        "    tasks:\n"
        "      - class_path: text_reasoning.data.LocalFile\n"
        "        init_args: {path: gsm8k_train.jsonl, format: gsm8k}\n"
        "    train_size: 8\n"
        "    val_size: 4\n"
        "    prompts_per_step: 2\n"
    )
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"),
           "--config", "gsm8k.yaml", "--model.init_args.policy", "common.models.TinyLlama",
           "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.group_size", "2",
           "--trainer.max_steps", "1", "--trainer.logger", "false",
           "--evaluate", "true"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: before" in proc.stdout and "(4 problems)" in proc.stdout, proc.stdout[-2000:]
