"""The ARPO, SPEAR, iStar and POAD recipes (configs/agentic/{arpo,spear,istar,poad}.yaml) run through ``advlab fit``
(in this process) with tiny overrides: a tiny Llama with the real SmolLM2 tokenizer, short episodes, one step; each
method's metrics are logged, the loss is finite, and its state is in the last checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from resume import ROOT, events

TINY_AGENT = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "32",
              "--model.init_args.policy.init_args.num_layers", "1", "--model.init_args.policy.init_args.num_heads", "2",
              "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.episode.max_total_tokens", "40",
              "--model.init_args.episode.max_turns", "3", "--model.init_args.group_size", "3",
              "--data.init_args.prompts_per_step", "2", "--data.init_args.train_size", "8", "--data.init_args.val_size", "2",
              "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--model.init_args.micro_batch_size", "4"]

CASES = {
    "arpo": ([], ("train/arpo/replayed", "train/arpo/all_fail_frac"), "methods.0.buffer._extra_state"),
    "spear": ([], ("train/spear/tool_bonus", "train/spear/buffer_rows"), "methods.0.buffer._extra_state"),
    "istar": ([], ("train/prm/loss", "train/prm/pairs"), "methods.0._extra_state"),
    "poad": ([], ("train/value_loss",), "methods.0.critic.net.0.weight"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_runs_one_step(name, tmp_path, one_thread):
    from common.cli import main

    extra, tags, state_key = CASES[name]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        main(["fit", "--config", str(ROOT / f"configs/agentic/{name}.yaml"), *TINY_AGENT, *extra])
    finally:
        os.chdir(cwd)
    logs = Path(tmp_path) / "runs/lightning_logs/version_0"
    for tag in ("train/loss", *tags):
        assert sorted(events(logs, tag)) == [0], tag
    assert all(v == v and abs(v) < 1e6 for v in events(logs, "train/loss").values())
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and state_key in ckpt["state_dict"], sorted(k for k in ckpt["state_dict"] if "methods" in k)[:20]


@pytest.mark.slow  # three advlab processes (straight, killed, resumed)
def test_arpo_recipe_resumes_exactly_after_sigkill(tmp_path):
    """ARPO with thresholds that make every group all-fail and every episode a success, keyed by the task family (so
    the buffer fills at step 0 and a stored episode is drawn into every group from step 1 on): SIGKILLed after its step-2 checkpoint and resumed,
    the run ends with the straight run's weights, optimiser state, buffer rows, draw counter and logged metrics."""
    from resume import assert_sigkill_resume_exact, cli

    methods = ("[{class_path: common.methods.arpo.ARPO, init_args: {success_threshold: -1.0, std_max: 100.0, "
               "mean_max: 100.0, per_task: 4, key: task}}]")  # key "task": one buffer for every calculator task
    i = TINY_AGENT.index("--trainer.max_steps")
    run = cli("configs/agentic/arpo.yaml", *TINY_AGENT[:i], *TINY_AGENT[i + 2:], "--model.init_args.methods", methods)
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=4, every=2,
                                       tags=("train/reward", "train/loss", "train/arpo/replayed", "train/arpo/buffer_rows"))
    assert int(ckpt["state_dict"]["methods.0.steps"]) == 4
    assert len(ckpt["state_dict"]["methods.0.buffer._extra_state"]["keys"]) > 0
    replayed = events(tmp_path / "straight/runs/lightning_logs/version_0", "train/arpo/replayed")
    assert replayed[0] == 0 and all(replayed[s] > 0 for s in (1, 2, 3))  # stored episodes drawn into every group
