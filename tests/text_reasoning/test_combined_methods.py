"""Two methods that were module subclasses combine in one recipe: R³ (SERR re-scoring, Cross-Context Replay as the
selector) with T-PPO's critic (values for EGAE, the value loss, in-flight responses), 2 steps from ``advlab fit``
on a tiny real model."""

from __future__ import annotations

import json
import subprocess

import torch
from helpers import DIGITS
from resume import TINY, cli, events

METHODS = [
    {"class_path": "common.methods.r3.R3",
     "init_args": {"serr": {"class_path": "common.rewards.entropy_rank.SERR", "init_args": {"p": 0.2, "r_max": 0.1}}}},
    {"class_path": "common.methods.tppo.TruncatedPPO", "init_args": {"value_lr": 1.0e-3, "max_windows": 2}},
]
EGAE = {"class_path": "common.advantages.gae.EGAE", "init_args": {"gamma": 1.0, "lam": 0.95}}
# a length reward: the tiny policy's complete responses get non-zero returns, so the critic has something to fit
# (the task's verifier still decides `correct`, so every group is all wrong and SERR ranks the truncated rows)
LENGTH = [{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 3}}]


def test_r3_replay_with_the_tppo_critic_runs_two_steps(tmp_path):
    run = cli("configs/text_reasoning/r3.yaml", *TINY, "--model.init_args.policy.init_args.alphabet", DIGITS,
              "--model.init_args.rewards", json.dumps(LENGTH), "--model.init_args.group_size", "4",
              "--data.init_args.prompts_per_step", "4", "--data.init_args.train_size", "8",
              "--model.init_args.advantage", json.dumps(EGAE), "--model.init_args.methods", json.dumps(METHODS),
              "--trainer.max_steps", "2")
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    for tag in ("train/value_loss", "train/serr_frac", "train/loss"):
        assert sorted(events(logs, tag)) == [0, 1], tag
    assert max(events(logs, "train/value_loss").values()) > 0
    assert max(events(logs, "train/serr_frac").values()) > 0  # SERR re-scored some truncated rows
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    state = ckpt["state_dict"]
    assert float(state["methods.1.critic.net.0.weight"].abs().sum()) > 0  # the critic was trained
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2  # policy + the critic's own group
    assert len(state["selector._extra_state"]["keys"]) > 0  # the replay buffer filled
