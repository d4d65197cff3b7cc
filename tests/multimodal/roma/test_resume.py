"""Kill-and-resume exact for ROMA on the tiny LLaVA-style VLM (issue 20's test list): an ``advlab fit`` of
configs/multimodal/roma.yaml SIGKILLed right after its step-2 checkpoint and resumed from ``last.ckpt`` equals the
uninterrupted run in every checkpointed tensor (weights, AdamW state, ROMA's step counter, which enters every
corruption key) and in the logged reward, loss and ROMA terms after the resume point (tests/support/resume.py)."""

from __future__ import annotations

import os

import pytest
from resume import ROOT, assert_sigkill_resume_exact, cli

RECIPE = "configs/multimodal/roma.yaml"
TINY = ["--model.init_args.policy.class_path", "multimodal.vlm.model.TinyVLM", "--data.init_args.image_size", "16",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--trainer.enable_progress_bar", "false",
        "--model.init_args.sampling.max_new_tokens", "3", "--data.init_args.prompts_per_step", "2",
        "--model.init_args.group_size", "2", "--model.init_args.lr", "1e-3"]


@pytest.mark.slow  # three advlab processes (straight, killed, resumed): ~29 s of CPU in all
def test_roma_on_the_tiny_vlm_resumes_exactly_after_sigkill(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ckpt = assert_sigkill_resume_exact(tmp_path, cli(RECIPE, *TINY), max_steps=4, every=2,
                                       tags=("train/reward", "train/loss", "train/roma/kl_all", "train/roma/aux_loss"))
    assert int(ckpt["state_dict"]["methods.0.step"]) == 4  # the corruption keys moved on through the resume
