"""The calculator agent recipe (configs/text_reasoning/agent_calculator.yaml): TextReasoningModule with an
``environment`` wraps its causal LM into MultiTurnAgentPolicy; 2 steps of episode-level GRPO from ``advlab fit`` on
a tiny real model, end reasons and turns logged (EpisodeStats); the generated calculator tasks are right."""

from __future__ import annotations

import subprocess

import pytest
import torch
from resume import TINY, cli, events

from common.policies.agent import MultiTurnAgentPolicy
from common.rewards.expression import safe_eval
from common.rollout.env import END_REASONS, EpisodeLimits, EpisodeReturn
from text_reasoning.envs.calculator import Calculator, CalculatorTasks
from text_reasoning.module import TextReasoningModule


def test_generated_tasks_are_right_and_seeded():
    a, b = CalculatorTasks(digits=2, operands=3).make(20, 0), CalculatorTasks(digits=2, operands=3).make(20, 0)
    assert a == b
    for p in a:
        expr = p.meta["expression"]
        assert p.prompt == f"What is {expr}?" and float(p.answer) == safe_eval(expr) and len(expr.split()) == 5
    with pytest.raises(ValueError, match="digits must be 1-3"):
        CalculatorTasks(digits=5)


def test_the_module_wraps_its_policy_when_given_an_environment():
    from common.models import TinyLlama

    tiny = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="0123456789+", seed=0)
    module = TextReasoningModule(policy=tiny, environment=Calculator(), episode=EpisodeLimits(max_turns=2), group_size=2)
    assert isinstance(module.policy, MultiTurnAgentPolicy) and module.policy.limits.max_turns == 2
    assert isinstance(module.verifier, EpisodeReturn) and isinstance(module.reward_fns[0], EpisodeReturn)
    assert module.policy.horizon == 256
    with pytest.raises(ValueError, match="episode limits are given but no environment"):
        TextReasoningModule(policy=tiny, episode=EpisodeLimits())


def test_agent_calculator_recipe_runs_two_steps(tmp_path):
    run = cli("configs/text_reasoning/agent_calculator.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.group_size", "4", "--model.init_args.episode.max_total_tokens", "48",
              "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false")
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    for tag in ("train/loss", "train/reward", "train/reward/episode_return", "train/accuracy", "train/episode_turns",
                "train/end/done", "train/end/timeout"):
        assert sorted(events(logs, tag)) == [0, 1], tag
    ends = [sum(events(logs, f"train/end/{r}")[step] for r in END_REASONS) for step in (0, 1)]
    assert ends == [pytest.approx(1.0), pytest.approx(1.0)]  # every episode ended for one of the typed reasons
    assert min(events(logs, "train/episode_turns").values()) >= 1
    assert all(v == v for v in events(logs, "train/loss").values())
    assert max(events(logs, "train/response_len").values()) <= 48  # the episode's token budget
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and any(k.startswith("policy.lm.model.") for k in ckpt["state_dict"])
