"""The completions log (common/completions_log.py): a real `advlab fit` writes one JSON line per sampled row beside
TensorBoard, and every column is checked against an independent computation from the logged text (the length
reward by its formula, the weighted total, GRPO's advantage by hand, the step's mean reward in TensorBoard); the
switch and the step schedule in process; hostile text round-trips and stays bounded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from common.batch import RolloutBatch
from common.completions_log import CompletionsLog, completion_rows
from common.models import TinyLlama
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from resume import ROOT, events
from text_reasoning.module import TextReasoningModule

REWARDS = ('[{"class_path": "text_reasoning.rewards.TaskReward"}, '
           '{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 20}}]')


def grpo_by_hand(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """(r - mean) / (unbiased std + eps) of one group, in float64; an all-equal group gives 0."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [0.0 if std == 0 else (r - mean) / (std + eps) for r in rewards]


def test_advlab_fit_writes_one_row_per_sample_that_matches_the_batch(tmp_path):
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"),
           "--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
           "--model.init_args.group_size", "4", "--model.init_args.rewards", REWARDS,
           "--model.init_args.reward_weights", "[1.0, 0.5]", "--data.init_args.prompts_per_step", "2",
           "--data.init_args.train_size", "16", "--data.init_args.val_size", "4", "--trainer.max_steps", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/lightning_logs/version_0"
    assert sorted(p.name for p in (run / "completions").iterdir()) == ["rank0.jsonl"]
    rows = [json.loads(line) for line in (run / "completions/rank0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["global_step"], r["rank"], r["row"], r["group"]) for r in rows] == \
        [(s, s + 1, 0, i, i // 4) for s in range(2) for i in range(8)]  # 2 prompts x G = 4 a step, one optimiser step
    by_step: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_step[r["step"]].append(r)
        assert isinstance(r["prompt"], str) and r["prompt"].startswith("What is") and isinstance(r["completion"], str)
        assert set(r["reward_components"]) == {"TaskReward", "length"}
        # the length reward by its formula from the logged text: float32 division, |value| <= a few -> 1e-6
        assert r["reward_components"]["length"] == pytest.approx(-abs(len(r["completion"]) - 20) / 20, abs=1e-6)
        assert r["reward"] == pytest.approx(r["reward_components"]["TaskReward"] + 0.5 * r["reward_components"]["length"], abs=1e-6)
        assert r["correct"] == (r["reward_components"]["TaskReward"] == 1.0)
        assert 1 <= r["length"] <= 8 and isinstance(r["truncated"], bool)
    varied = 0
    for step, step_rows in by_step.items():
        assert len({r["prompt"] for r in step_rows[:4]}) == 1  # a group shares its prompt
        for g in range(2):
            group = [r for r in step_rows if r["group"] == g]
            rewards = [r["reward"] for r in group]
            want = grpo_by_hand(rewards)
            # float32 in the module: ~10 roundings of values bounded by max|r|, divided by the group's std
            scale = max(abs(x) for x in rewards) / (math.sqrt(sum((x - sum(rewards) / 4) ** 2 for x in rewards) / 3) + 1e-6)
            assert [r["advantage"] for r in group] == pytest.approx(want, abs=1e-5 * scale + 1e-6), (step, g)
            varied += any(a != 0 for a in want)
    assert varied >= 2, "the length reward should vary within groups"
    # the rows join TensorBoard's scalars on `step`: train/reward there is the mean of the step's logged rewards
    logged = events(run, "train/reward")
    assert sorted(logged) == [0, 1]
    for step, step_rows in by_step.items():
        assert logged[step] == pytest.approx(sum(r["reward"] for r in step_rows) / 8, abs=1e-6)
    # the canaries are on by default: their metrics are in the same run
    assert sorted(events(run, "train/canary/trainable_token_frac")) == [0, 1]
    assert sorted(events(run, "train/canary/policy_logprob_change")) == [0, 1]


def tiny_module(**kw) -> TextReasoningModule:
    return TextReasoningModule(policy=TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                               sampling=Sampling(max_new_tokens=4), group_size=2, log_samples_every=0, **kw)


def fit(module, steps: int, logger) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(digit_prompts(2 * steps), batch_size=2, collate_fn=list))


def test_every_n_steps_the_switch_and_no_logger(tmp_path, monkeypatch):
    fit(tiny_module(log_completions_every=2), 3, TensorBoardLogger(tmp_path / "tb"))
    written = list((tmp_path / "tb").rglob("*.jsonl"))
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["tb/lightning_logs/version_0/completions/rank0.jsonl"]
    rows = [json.loads(line) for line in written[0].read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 4 + [2] * 4  # 2 prompts x G = 2 at steps 0 and 2, not step 1

    fit(tiny_module(log_completions_every=0), 1, TensorBoardLogger(tmp_path / "off"))
    assert not list((tmp_path / "off").rglob("*.jsonl"))
    monkeypatch.chdir(tmp_path / "off")  # no logger: nothing is written (not into the working directory either)
    fit(tiny_module(), 1, False)
    assert not list((tmp_path / "off").rglob("completions"))
    with pytest.raises(ValueError, match="log_completions_every"):
        tiny_module(log_completions_every=-1)


def test_hostile_text_round_trips_bounded_and_token_advantages_are_averaged(tmp_path):
    hostile = ['he said "stop"\n}{\\', "\u2028\x85\u2029\x00\x1b[2J", "a\udc80b", "x" * 100_000]  # line breaks, a lone surrogate
    B, T = len(hostile), 3
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # (B, T), the last row empty
    adv = torch.tensor([[1.0, 3.0, 9.0], [2.0, 9.0, 9.0], [1.0, 2.0, 6.0], [5.0, 5.0, 5.0]])  # (B, T) token-level
    batch = RolloutBatch(completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.tensor([0, 0, 1, 1]), rewards=torch.tensor([1.0, float("nan"), 0.5, -2.0]),
                         reward_components=torch.tensor([[1.0, 0.0], [float("inf"), 1.0], [0.5, 0.0], [-2.0, 0.0]]),
                         reward_names=("a", "b"), advantages=adv, samples=[{"prompt": "p\n1"}, {}, {"prompt": "p3"}, {"prompt": "p4"}],
                         completions=hostile)
    log = CompletionsLog(tmp_path, rank=1)
    assert log.write(batch, step=7, global_step=9) == B and log.path == tmp_path / "completions/rank1.jsonl"
    lines = log.path.read_text(encoding="utf-8").splitlines()  # str.splitlines also breaks on U+0085/2028/2029
    assert len(lines) == B
    rows = [json.loads(line) for line in lines]
    assert [r["completion"] for r in rows] == hostile
    assert [r["prompt"] for r in rows] == ["p\n1", None, "p3", "p4"]
    assert [r["reward"] for r in rows] == [1.0, None, 0.5, -2.0]  # non-finite -> null, the file stays JSON
    assert rows[1]["reward_components"] == {"a": None, "b": 1.0}
    assert [r["advantage"] for r in rows] == [2.0, 2.0, 3.0, 0.0]  # mean over each completion's tokens; empty -> 0
    assert [(r["step"], r["global_step"], r["rank"], r["length"]) for r in rows] == [(7, 9, 1, n) for n in (2, 1, 3, 0)]
    assert len(lines[3].encode()) < 100_000 + 300  # the row is its completion plus a constant
    assert completion_rows(batch.replace(completions=[]), 0) == []  # no text (a toy policy): nothing to log
