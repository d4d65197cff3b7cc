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
