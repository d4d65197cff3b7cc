"""Kill-and-resume for the cross-step state of issue 6 part A (DUMP curriculum, SPO value tracker, selective
sample buffer, R³ replay): a SIGKILLed and resumed run equals an uninterrupted one in every checkpointed tensor
and logged metric (tests/support/resume.py), and the method's state really changed during those steps."""

from __future__ import annotations

import torch
from resume import TINY, assert_sigkill_resume_exact, cli, events

SMALL = ["--model.init_args.group_size", "2", "--data.init_args.prompts_per_step", "4"]


def test_dump_curriculum_resumes_exactly(tmp_path):
    ckpt = assert_sigkill_resume_exact(tmp_path, cli("configs/text_reasoning/dump.yaml", *TINY, *SMALL), max_steps=6)
    counts = ckpt["state_dict"]["selector.counts"]
    assert int(counts.sum()) == 6 * 4 * 2  # 6 steps x 4 prompts x G = 2 rows, all observed
    assert int((counts > 0).sum()) >= 2  # more than one distribution was drawn
    assert ckpt["CurriculumData"]["batches_served"] == 6


def test_spo_value_tracker_resumes_exactly(tmp_path):
    run = cli("configs/text_reasoning/spo_stream.yaml", *TINY, "--data.init_args.prompts_per_step", "6")
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6, tags=("train/reward", "train/loss", "train/spo_kl"))
    state = ckpt["state_dict"]
    assert int(state["advantage.visits"].sum()) == 6 * 6  # 6 steps x 6 single-sample prompts
    assert float(state["advantage.kl_total"]) > 0  # the policy moved and the drift was recorded
    assert not torch.equal(state["advantage.alpha"], torch.full_like(state["advantage.alpha"], 4.0))  # α moved off the prior


def test_selective_sample_buffer_resumes_exactly(tmp_path):
    # a length reward: the tiny random policy's completions differ in length, so some groups are informative and
    # some not; min_nonzero above the informative count makes every step replay from the buffer
    run = cli("configs/text_reasoning/ssb.yaml", *TINY, *SMALL, "--model.init_args.selector.min_nonzero", "8",
              "--model.init_args.rewards",
              '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 12}}]')
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6, tags=("train/reward", "train/loss", "train/selected_frac"))
    state = ckpt["state_dict"]
    assert int(state["selector.step"]) == 6
    buffered = state["selector._extra_state"]["rows"]
    assert len(buffered["completions"]) > 0 and bool((buffered["advantages"] != 0).all())
    selected = events(tmp_path / "straight/runs/lightning_logs/version_0", "train/selected_frac")
    assert max(selected.values()) > 1  # some step trained on replayed rows beyond its own


def test_r3_replay_buffer_resumes_exactly(tmp_path):
    # the tiny random policy answers nothing right, so every group is all wrong: the buffer fills (no correct answer
    # to replay yet; replay itself is tested in tests/common/sampling/test_replay.py) and SERR re-scores the truncated
    # rows; 8 prompts, 4 a step, so prompts come back every other step
    run = cli("configs/text_reasoning/r3.yaml", *TINY, *SMALL, "--data.init_args.train_size", "8")
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6, tags=("train/reward", "train/loss", "train/serr_frac"))
    state = ckpt["state_dict"]["selector._extra_state"]
    assert len(state["keys"]) == 6 * 4 * 2  # 6 steps x 4 prompts x G = 2 rows; each prompt 3 visits x 2 <= per_prompt 8
    assert len(set(state["keys"])) == 8
