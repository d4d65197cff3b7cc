"""configs/text_reasoning/grpo_adaptive_kl.yaml from ``advlab fit``: the adaptive in-reward KL coefficient is
logged as train/kl_coef and checkpointed, RefRefresh refreshes the reference, the IcePop correction runs; a LoRA
policy with RefRefresh fails at start-up in one line naming ``lora``."""

from __future__ import annotations

import json
import subprocess

import torch
from helpers import DIGITS
from resume import cli, events
from startup import advlab_failure

RECIPE = "configs/text_reasoning/grpo_adaptive_kl.yaml"
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "32",
        "--model.init_args.policy.init_args.num_layers", "1", "--model.init_args.policy.init_args.num_heads", "2",
        "--model.init_args.policy.init_args.alphabet", DIGITS, "--model.init_args.sampling.max_new_tokens", "6",
        "--model.init_args.lr", "1e-2", "--model.init_args.group_size", "4", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "2"]
LENGTH = [{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 3}}]  # rewards that vary
REFRESH = [{"class_path": "common.methods.ref_refresh.RefRefresh", "init_args": {"every": 1, "alpha": 1.0}}]


def test_adaptive_kl_recipe_two_steps(tmp_path):
    run = cli(RECIPE, *TINY, "--model.init_args.rewards", json.dumps(LENGTH), "--model.init_args.methods",
              json.dumps(REFRESH), "--trainer.max_steps", "2")
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    coef, kl = events(logs, "train/kl_coef"), events(logs, "train/kl_in_reward")
    assert sorted(coef) == [0, 1] and sorted(events(logs, "train/is_ratio_masked_frac")) == [0, 1]
    # step 0 samples from the initial policy = the reference: KL 0, so β_1 = β_0 (1 − 0.2 · 8 / 1000)
    assert kl[0] == 0 and abs(coef[0] - 0.05) < 1e-8 and abs(coef[1] - 0.05 * (1 - 0.2 * 8 / 1000)) < 1e-8
    ckpt = torch.load(next((logs / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    # the checkpointed β is step 1's β moved by step 1's KL (hand formula, target 2, horizon 1000, n = 8)
    e1 = min(max(kl[1] / 2.0 - 1, -0.2), 0.2)
    assert abs(float(state["kl_control.coef"]) - coef[1] * (1 + e1 * 8 / 1000)) < 1e-8
    # RefRefresh every step with alpha 1: two refreshes, and the reference is an exact copy of the policy
    assert int(state["methods.0.steps"]) == 2 and int(state["methods.0.refreshes"]) == 2
    model = {k[len("policy.model."):]: v for k, v in state.items() if k.startswith("policy.model.")}
    ref = {k[len("policy.reference."):]: v for k, v in state.items() if k.startswith("policy.reference.")}
    assert model.keys() == ref.keys() and all(torch.equal(model[k], ref[k]) for k in model)


def test_lora_with_ref_refresh_fails_in_one_line_naming_lora(tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", str(cli(RECIPE)[-1]), *TINY, "--model.init_args.lora",
                                         json.dumps({"rank": 4, "target_modules": ["q_proj", "v_proj"]}), cwd=tmp_path)
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("advlab:")]
    assert len(lines) == 1 and "`lora`" in lines[0] and "reference" in lines[0], proc.stderr[-2000:]
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"
