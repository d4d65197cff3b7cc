"""Reliability: exact resume after SIGKILL, atomic checkpoints, non-finite guard, reward failures."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from common.checkpoint import AtomicCheckpointIO
from common.rewards.base import RewardFailure, RewardFunction, score_components

from resume import TINY, assert_sigkill_resume_exact, cli, events


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Train 8 steps straight; separately, SIGKILL a run right after a checkpoint and resume it to step 8. The
    losses after the resume point, the final weights, every checkpointed tensor and the optimiser state must be
    identical (CPU, seeded): RNG streams, data position (a second pass over the data, reshuffled) and AdamW state
    all come back."""
    run = cli("configs/text_reasoning/grpo_arithmetic.yaml", *TINY, "--model.init_args.rewards",
              '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 12}}]')
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=8, tags=("train/reward", "train/loss", "train/grad_norm"))
    assert ckpt["global_step"] == 8
    assert len(set(events(tmp_path / "straight/runs/lightning_logs/version_0", "train/reward").values())) > 1


_WRITER = """
import sys, torch
from common.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
i = 0
while True:
    io.save_checkpoint({"i": i, "payload": torch.full((40_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
    i += 1
"""


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the first save is complete
    deadline = time.time() + 60
    while not list(tmp_path.glob(".last.ckpt.tmp-*")) and time.time() < deadline:
        time.sleep(0.001)  # the second save is in flight
    proc.kill()
    proc.wait()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["payload"].numel() == 40_000_000 and bool((state["payload"] == state["i"]).all())


class _Tiny(RewardFunction):
    name = "tiny"

    def __init__(self, bad: str = ""):
        self.bad = bad

    def __call__(self, completions, samples):
        if self.bad == "raise" and any("boom" in c for c in completions):
            raise RuntimeError("parser crashed")
        if self.bad == "none":
            return None
        if self.bad == "nan":
            return torch.tensor([math.nan if "boom" in c else 1.0 for c in completions])
        if self.bad == "hang" and any("boom" in c for c in completions):
            time.sleep(30)
        return torch.ones(len(completions))


@pytest.mark.parametrize("bad", ["raise", "nan", "hang"])
def test_a_failing_reward_raises_naming_the_sample_or_scores_zero(bad):
    completions, samples = ["fine", "boom!", "ok"], [{"prompt": f"p{i}"} for i in range(3)]
    start = time.perf_counter()
    with pytest.raises(RewardFailure, match=r"sample 1 \(prompt 'p1', completion 'boom!'\)"):
        score_components([_Tiny(bad)], completions, samples, on_failure="raise", timeout_s=0.5)
    comps, failed = score_components([_Tiny(bad)], completions, samples, on_failure="zero", timeout_s=0.5)
    assert comps[:, 0].tolist() == [1.0, 0.0, 1.0] and failed.tolist() == [False, True, False]
    assert time.perf_counter() - start < 5  # the hanging call was abandoned at the timeout


def test_a_reward_returning_none_fails_every_sample():
    with pytest.raises(RewardFailure, match="returned None"):
        score_components([_Tiny("none")], ["a"], [{"prompt": "p"}])


def test_non_finite_gradients_skip_the_step_and_eventually_raise():
    from common.models import TinyLlama
    from common.rewards.length import LengthReward
    from common.rollout.base import Sampling
    from helpers import DIGITS, digit_prompts
    from text_reasoning.module import TextReasoningModule

    def module(max_skips):
        m = TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS),
                                rewards=[LengthReward(target=3)], sampling=Sampling(max_new_tokens=6),
                                group_size=4, log_samples_every=0, max_consecutive_skips=max_skips)
        head = m.policy.model.get_output_embeddings().weight
        head.register_hook(lambda g: g * math.inf)  # a real backward whose gradient overflows
        return m

    def fit(m):  # one epoch of 3 batches (a skipped step does not count towards max_steps, an epoch does)
        L.seed_everything(0, verbose=False)
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(m, DataLoader(digit_prompts(6), batch_size=2, collate_fn=list))

    m = module(max_skips=5)
    before = [p.detach().clone() for p in m.policy.model.parameters()]
    fit(m)
    assert int(m.skipped_steps) == 3 and m.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(before, m.policy.model.parameters()))  # never updated with inf/NaN
    with pytest.raises(FloatingPointError, match="2 optimiser steps in a row"):
        fit(module(max_skips=2))
