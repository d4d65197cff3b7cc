"""Canaries (common/methods/canaries.py): a warning and a metric when every reward is equal for N rounds in a row
or no token is trainable; silent otherwise; from YAML through advlab."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.methods.canaries import Canaries, CanaryWarning
from common.policies.toy import CategoricalPolicy
from common.toy_tasks import Bandit
from startup import ROOT


def run(rewards_per_step: list[list[float]], *methods: Method) -> tuple[list[dict], list[list[str]]]:
    """Steps of the real loop on a categorical policy, rewards given per step (4 prompts x G = 2 = 8 rows)."""
    steps = iter(rewards_per_step)

    def score(b: RolloutBatch) -> RolloutBatch:
        return b.replace(rewards=torch.tensor(next(steps), dtype=torch.float32))

    policy = CategoricalPolicy(context_dim=4, num_actions=5)
    canary = Canaries(equal_reward_steps=3)
    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), methods=[*methods, canary], group_size=2)
    stepper = Stepper(torch.optim.SGD(list(policy.trainable_parameters()), lr=0.1), list(policy.trainable_parameters()))
    metrics, warned = [], []
    for _ in rewards_per_step:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics.append(loop.update(loop.collect(Bandit(4, 5).prompts(4, 0)).kept, stepper))
        warned.append([str(w.message) for w in caught if issubclass(w.category, CanaryWarning)])
    return metrics, warned


def test_equal_rewards_for_n_rounds_warn_once_and_a_varied_round_resets():
    same, varied = [1.0] * 8, [0.0, 1.0] * 4
    metrics, warned = run([same, same, same, same, varied, same])
    assert [float(m["canary/equal_reward_steps"]) for m in metrics] == [1, 2, 3, 4, 0, 1]
    assert [len(w) for w in warned] == [0, 0, 1, 0, 0, 0]  # once, when the streak reaches N = 3
    assert "every reward was equal (1) for 3 sampling rounds" in warned[2][0]
    assert all(float(m["canary/trainable_token_frac"]) == 1.0 for m in metrics)  # one action per row, all trained


class MaskEverything(Method):
    """Every action written by the environment: nothing is trainable."""

    provides = ("env_mask",)

    def after_rollout(self, loop, batch):
        return batch.replace(env_mask=torch.ones_like(batch.completion_mask))


def test_no_trainable_token_warns_and_logs_zero():
    metrics, warned = run([[0.0, 1.0] * 4], MaskEverything())
    assert float(metrics[0]["canary/trainable_token_frac"]) == 0.0
    assert len(warned[0]) == 1 and "no trainable token in the 8 rows" in warned[0][0]
    assert all(torch.isfinite(v).all() for v in metrics[0].values())  # degenerate, not NaN


def test_streak_is_checkpointed_and_bad_argument_named():
    c = Canaries()
    assert "equal_streak" in c.state_dict()
    with pytest.raises(ValueError, match="equal_reward_steps"):
        Canaries(equal_reward_steps=0)


def test_from_yaml_through_advlab(tmp_path):
    config = tmp_path / "canaries.yaml"
    config.write_text("model:\n  init_args:\n    methods:\n      - class_path: common.methods.canaries.Canaries\n"
                      "        init_args: {equal_reward_steps: 2}\n")
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/toy/bandit_grpo.yaml"),
           "--config", str(config), "--trainer.max_steps", "3", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.logger.save_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "lightning_logs/version_0/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/canary/trainable_token_frac")]
    assert len(rows) == 3 and all(float(r["train/canary/trainable_token_frac"]) == 1.0 for r in rows)
