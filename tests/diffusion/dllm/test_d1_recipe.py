"""diffu-GRPO and IGPO from YAML: configs/diffusion/d1.yaml and igpo.yaml run 2 steps from ``advlab fit`` with a tiny masked-diffusion LM
on the chain-sum task (mu = 4 epochs, each with its own prompt mask), and the chain-sum task and reward."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from resume import ROOT, cli, events

from diffusion.dllm.data import ChainSumData, chain_sum
from diffusion.dllm.rewards import ChainSumReward, chain_sum_answer

TINY = ["--model.init_args.policy.init_args.hidden_size", "32", "--model.init_args.policy.init_args.num_layers", "1",
        "--model.init_args.policy.init_args.num_heads", "2", "--data.init_args.train_size", "32",
        "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step", "2", "--model.init_args.group_size", "4",
        "--trainer.enable_progress_bar", "false"]


def test_chain_sum_traces_and_reward_by_hand():
    s = chain_sum(50, ks=(3, 6), seed=0)
    assert s == chain_sum(50, ks=(3, 6), seed=0) and {x["level"] for x in s} == {3, 6}
    for x in s:
        a = [int(c) for c in x["prompt"]]
        run = [a[0]]
        for d in a[1:]:
            run.append((run[-1] + d) % 10)
        assert x["trace"] == "".join(map(str, run[1:])) + "#" + str(run[-1]) and x["answer"] == str(run[-1])
        assert x["hint_positions"] == list(range(len(a) - 2))  # s_2 .. s_{k-1}: never the last sum, '#', the answer
    sample = {"answer": "7"}
    r = ChainSumReward()
    assert [r.score(c, sample) for c in ("12#7", "12#7#", "127", "#", "9#3", "x" * 1_000_000 + "#7")] == [1.1, 1.0, 0.0, 0.1, 0.1, 1.1]
    assert chain_sum_answer("#") is None
    data = ChainSumData(train_size=64, val_size=16, val_ks=(5, 6))
    data.setup()
    assert not {x["prompt"] for x in data.val_set} & {x["prompt"] for x in data.train_set}
    assert {x["level"] for x in data.val_set} <= {5, 6}


@pytest.mark.parametrize("recipe", ["d1", "igpo"])
def test_recipe_runs_two_steps_from_advlab(recipe, tmp_path):
    # Lightning's max_steps counts optimiser steps: mu = 4 epochs x one minibatch = 4 per training step
    run = cli(f"configs/diffusion/{recipe}.yaml", *TINY, "--trainer.max_steps", "8")
    # PYTHONPATH: a checkout installed before `diffusion` joined pyproject's packages still finds it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    tags = ("train/loss", "train/reward", "train/accuracy", "train/grad_norm")
    if recipe == "igpo":
        tags += ("train/all_wrong_before", "train/all_wrong_after", "train/replacements", "train/rescued_groups")
    for tag in tags:
        values = events(logs, tag)
        assert sorted(values) == [0, 1] and all(v == v for v in values.values()), tag
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * 4


def test_igpo_kill_and_resume_is_exact(tmp_path, monkeypatch):
    """SIGKILL after the first checkpoint, resume from last.ckpt: weights, AdamW state, RNG (sampler noise, hints,
    mask seeds) and logged metrics equal an uninterrupted run's (mu = 1 so that a training step is one optimiser
    step, as the shared helper counts them)."""
    from resume import assert_sigkill_resume_exact

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = cli("configs/diffusion/igpo.yaml", *TINY, "--model.init_args.mu", "1")
    assert_sigkill_resume_exact(tmp_path, run, max_steps=4, every=2,
                                tags=("train/reward", "train/loss", "train/all_wrong_before"))
