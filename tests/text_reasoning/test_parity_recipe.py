"""configs/text_reasoning/grpo_adaptive_kl.yaml from ``advlab fit``: the adaptive in-reward KL coefficient is
logged as train/kl_coef, checkpointed and resumed exactly, RefRefresh refreshes the reference on schedule across a
resume, the IcePop correction runs; a LoRA policy with RefRefresh fails at start-up in one line naming ``lora``."""

from __future__ import annotations

import json
import resource
import subprocess

import torch
from helpers import DIGITS
from resume import assert_sigkill_resume_exact, cli, events

RECIPE = "configs/text_reasoning/grpo_adaptive_kl.yaml"
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "32",
        "--model.init_args.policy.init_args.num_layers", "1", "--model.init_args.policy.init_args.num_heads", "2",
        "--model.init_args.policy.init_args.alphabet", DIGITS, "--model.init_args.sampling.max_new_tokens", "6",
        "--model.init_args.lr", "1e-2", "--model.init_args.group_size", "4", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "2"]
LENGTH = [{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 3}}]  # rewards that vary
REFRESH = [{"class_path": "common.methods.ref_refresh.RefRefresh", "init_args": {"every": 3, "alpha": 0.6}}]


def test_adaptive_kl_recipe_logs_checkpoints_and_resumes_exactly(tmp_path):
    """4 steps straight vs SIGKILLed after the step-2 checkpoint and resumed: identical weights, β, reference,
    RefRefresh counters and logged kl_coef (the refresh at step 3 happens after the resume, from the restored count).
    The logged β follows the hand recursion β_{s+1} = β_s (1 + clip(KL_s / 2 − 1, ±0.2) · 8 / 1000), to float32
    rounding: the run rounds each update's ~6 operations (and the logged KL) to 2⁻²⁴, so step s is within
    8 (s + 1) · 2⁻²⁴ relative."""
    run = cli(RECIPE, *TINY, "--model.init_args.rewards", json.dumps(LENGTH), "--model.init_args.methods",
              json.dumps(REFRESH))
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=4, every=2,
                                       tags=("train/loss", "train/kl_coef", "train/kl_in_reward", "train/ref_refreshes"))
    logs = tmp_path / "straight/runs/lightning_logs/version_0"
    coef, kl = events(logs, "train/kl_coef"), events(logs, "train/kl_in_reward")
    assert sorted(coef) == [0, 1, 2, 3] and sorted(events(logs, "train/is_ratio_masked_frac")) == [0, 1, 2, 3]
    assert kl[0] == 0 and max(kl.values()) > 0  # step 0 samples from the reference itself; later steps moved away
    beta = 0.05
    for s in range(4):
        assert abs(coef[s] - beta) <= 8 * (s + 1) * 2**-24 * beta, (s, coef, kl)
        beta *= 1 + min(max(kl[s] / 2.0 - 1, -0.2), 0.2) * 8 / 1000
    state = ckpt["state_dict"]
    assert abs(float(state["kl_control.coef"]) - beta) <= 8 * 5 * 2**-24 * beta
    assert int(state["methods.0.steps"]) == 4 and int(state["methods.0.refreshes"]) == 1
    assert events(logs, "train/ref_refreshes") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}  # after update 3 (steps 2->3)


def test_lora_with_ref_refresh_fails_in_one_line_naming_lora(tmp_path):
    """The bound is on the failing process's CPU seconds (user + sys): the suite runs on 2 shared cores where wall
    time beyond a bare import swings by 10 s with the load; the CPU time of a start-up failure does not."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*cli(RECIPE), *TINY, "--model.init_args.lora",
                           json.dumps({"rank": 4, "target_modules": ["q_proj", "v_proj"]})],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("advlab:")]
    assert len(lines) == 1 and "`lora`" in lines[0] and "reference" in lines[0], proc.stderr[-2000:]
    assert cpu_s < 10, f"the failing run used {cpu_s:.1f} s of CPU"
    assert not (tmp_path / "runs/lightning_logs/version_0/checkpoints").exists()
