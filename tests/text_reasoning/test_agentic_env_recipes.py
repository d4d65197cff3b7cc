"""The environment recipes (configs/agentic/grpo_{sokoban,order_dialogue,calculator_json}.yaml): every recipe's
environment, episode settings and task source build from its YAML and an expert episode is solved; the Sokoban recipe
trains from ``advlab fit`` in layout A (one row per turn) on a tiny real model, with its end reasons, drift and
anchor-group size logged, and a SIGKILLed run resumes exactly."""

from __future__ import annotations

import importlib
import pytest
import yaml
from resume import ROOT, TINY, assert_sigkill_resume_exact, cli, events

from common.rollout.env import END_REASONS, EpisodeLimits

RECIPES = ["grpo_sokoban", "grpo_order_dialogue", "grpo_calculator_json"]


def build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def expert(recipe: str, task: dict) -> list[str]:
    if recipe == "grpo_sokoban":
        from text_reasoning.envs.sokoban import expert_actions
        return expert_actions(task["solution"])
    if recipe == "grpo_order_dialogue":
        from text_reasoning.envs.dialogue import expert_turns
        return expert_turns(task["order"])
    expr = task["expression"]
    return ['<tool_call>{"name": "calc", "arguments": {"expression": "' + expr + '"}}</tool_call>',
            f"<answer>{task['answer']}</answer>"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_environment_and_tasks_build_and_an_expert_solves_them(recipe):
    cfg = yaml.safe_load((ROOT / f"configs/agentic/{recipe}.yaml").read_text())
    init = cfg["model"]["init_args"]
    limits = EpisodeLimits(**init["episode"])
    assert limits.observation_role in ("user", "tool")
    env = build(init["environment"])
    for task in (p.as_sample() for p in build(cfg["data"]["init_args"]["tasks"][0]).make(4, 0)):
        e = env.spawn()
        e.seed(0)
        e.reset(task)
        total = 0.0
        for action in expert(recipe, task):
            step = e.step(action)
            total += step.reward
        assert step.done and step.valid and total > 0.99, (recipe, task)


@pytest.mark.slow  # three advlab processes (straight, killed, resumed): ~35 s of CPU
def test_sokoban_recipe_in_layout_a_logs_typed_ends_and_resumes_exactly_after_sigkill(tmp_path):
    """``advlab fit`` on the Sokoban recipe in layout A (one row per turn), a tiny real model: SIGKILLed after its
    step-2 checkpoint and resumed, it ends with the weights, optimiser state and logged metrics of the straight run
    (the episodes' seeds come from the checkpointed RNG; environments keep no state across steps); the straight run
    logged typed end reasons counting each episode once, the drift per turn (0 at turn 0) and anchor-group sizes."""
    run = cli("configs/agentic/grpo_sokoban.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.group_size", "4", "--model.init_args.episode.layout", "turn",
              "--trainer.enable_progress_bar", "false")
    assert_sigkill_resume_exact(tmp_path, run, max_steps=4, every=2,
                                tags=("train/reward", "train/loss", "train/drift", "train/end_count/parse_error",
                                      "train/anchor_group_size"))
    logs = tmp_path / "straight/runs/lightning_logs/version_0"
    for tag in ("train/episode_turns", "train/drift/turn_0", "train/invalid_turns"):
        assert sorted(events(logs, tag)) == [0, 1, 2, 3], tag
    for step in range(4):  # every episode ended for one typed reason; counted once although stored as turn rows
        assert sum(events(logs, f"train/end/{r}")[step] for r in END_REASONS) == pytest.approx(1.0)
        assert sum(events(logs, f"train/end_count/{r}")[step] for r in END_REASONS) == pytest.approx(8.0)
    assert set(events(logs, "train/drift/turn_0").values()) == {0.0}  # the first prompt is the template's rendering
    assert all(v == v for v in events(logs, "train/loss").values())
