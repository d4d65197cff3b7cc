"""Kill-and-resume exact for the VLM-agent GA-GRPO recipe (issue 22's test list, on the module path): ``advlab fit
--config configs/multimodal/ga_grpo.yaml`` — the shared TextReasoningModule with the MedScope environment (coarse view
as an image, re-rendered from the tokens by MedScopeVLMPolicy), the GAGRPO estimator and MedScopeStats — on the tiny
LLaVA-style VLM built from config, killed right after its step-1 checkpoint and resumed from ``last.ckpt``, equals
the uninterrupted run in every checkpointed tensor (weights, AdamW moments, RNG and data position) and in every
logged metric of the resumed steps.

In-process (``common.cli.main``, three fits, ~the cost of one ``advlab`` start-up): the "kill" is an exception
raised from inside the trainer right after the checkpoint file is written, so the run ends without any of fit's
orderly teardown writing state; that the file itself survives a real SIGKILL (atomic writes) is
tests/test_reliability.py's. A random tiny VLM never writes a tool call, so every MedScope reward part is 0 for it:
a length reward (characters, ``common.rewards.length``) is added to the recipe's three so the groups have varied
rewards and the steps really move the weights; the recipe's rewards, weights, estimator and logging are otherwise
unchanged (the tool-observation images are tests/multimodal/medscope/test_vlm_agent.py's)."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from resume import ROOT, assert_checkpoints_equal, events

RECIPE = str(ROOT / "configs/multimodal/ga_grpo.yaml")
REWARDS = ("[" + ", ".join("{class_path: multimodal.medscope.env.MedScopeReward, init_args: {part: %s, max_tool_calls: 3}}" % p
                           for p in ("accuracy", "grounding", "format"))
           + ", {class_path: common.rewards.length.LengthReward, init_args: {target: 40}}]")
TINY = ["--model.init_args.policy.class_path", "multimodal.vlm.model.TinyVLM",
        "--model.init_args.environment.init_args.image_size", "16", "--model.init_args.environment.init_args.image_tokens", "4",
        "--model.init_args.rewards", REWARDS, "--model.init_args.reward_weights", "[0.5, 0.3, 0.2, 1.0]",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step", "2",
        "--model.init_args.group_size", "2", "--model.init_args.sampling.max_new_tokens", "6", "--model.init_args.lr", "1e-3",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TAGS = ("train/reward", "train/reward/length", "train/loss", "train/grad_norm", "train/entropy", "train/zero_adv_frac",
        "train/miou", "train/r_at_0.5", "train/tool_calls", "train/frames_read", "train/answer_accuracy")
LAST = "runs/lightning_logs/version_{}/checkpoints/last.ckpt"


class Killed(Exception):
    """Raised right after the checkpoint of the kill step is on disk."""


def fit(monkeypatch, cwd, *args: str) -> None:
    from common.cli import main

    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    main(["fit", "--config", RECIPE, *TINY, *args])


def test_ga_grpo_vlm_agent_recipe_resumes_exactly(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(sys, "argv", ["advlab"])
    fit(monkeypatch, tmp_path / "straight", "--trainer.max_steps", "3")  # last.ckpt at the end

    save = ModelCheckpoint._save_checkpoint

    def save_then_die(self, trainer, filepath):
        save(self, trainer, filepath)
        if trainer.global_step == 1:
            raise Killed(filepath)

    with monkeypatch.context() as m:
        m.setattr(ModelCheckpoint, "_save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            fit(monkeypatch, tmp_path / "broken", "--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "1")
    last = tmp_path / "broken" / LAST.format(0)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    fit(monkeypatch, tmp_path / "broken", "--trainer.max_steps", "3", "--ckpt_path", str(last))

    a = torch.load(tmp_path / "straight" / LAST.format(0), map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "broken" / LAST.format(1), map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3
    assert_checkpoints_equal(a, b)
    for tag in TAGS:
        seen_a = events(tmp_path / "straight/runs/lightning_logs/version_0", tag)
        seen_b = events(tmp_path / "broken/runs/lightning_logs/version_1", tag)
        assert sorted(seen_a) == [0, 1, 2] and sorted(seen_b) == [1, 2], (tag, seen_a, seen_b)  # resumed: steps 2, 3
        assert [seen_b[s] for s in (1, 2)] == [seen_a[s] for s in (1, 2)], tag
    # not a vacuous equality: the steps after the resume point trained on non-zero advantages and moved the weights
    straight = tmp_path / "straight/runs/lightning_logs/version_0"
    assert all(v < 1 for v in events(straight, "train/zero_adv_frac").values())
    assert all(v > 0 for v in events(straight, "train/grad_norm").values())  # (the loss itself is 0 at ratio 1)
    k1 = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    moved = [n for n, v in a["state_dict"].items() if v.is_floating_point() and not torch.equal(v, k1[n])]
    assert any("language_model" in n for n in moved) and any("vision_tower" in n for n in moved), moved[:5]
