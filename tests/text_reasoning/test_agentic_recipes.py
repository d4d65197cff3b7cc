"""The agentic recipes (configs/agentic/*.yaml): every recipe's advantage estimator, built from its YAML, on one real
multi-turn rollout of a tiny real model in the grid world gives the same per-turn advantages in layout B (a row per
episode) and layout A (a row per turn; agentic.md §14.7), finite, and zero on environment tokens; GiGPO's recipe
(layout B) and DCPO's (layout A, with its segment sampler Method) run one step from ``advlab fit``."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from resume import cli, events

from common.models import TinyLlama
from common.policies.agent import MultiTurnAgentPolicy, turn_rows
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from common.rollout.env import EpisodeLimits
from common.segment_ops import turn_table
from helpers import DIGITS
from text_reasoning.envs.grid import GridTasks, GridWorld

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("gigpo", "hgpo", "uis1", "mapo", "dcpo", "tompo", "hrpo")
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "4",
        "--data.init_args.train_size", "24", "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step", "2",
        "--model.init_args.group_size", "4", "--model.init_args.episode.max_turns", "3", "--trainer.max_steps", "1",
        "--trainer.enable_progress_bar", "false"]


def build(recipe: str):
    spec = yaml.safe_load((ROOT / f"configs/agentic/{recipe}.yaml").read_text())["model"]["init_args"]["advantage"]
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


@pytest.fixture(scope="module")
def layouts():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS + "udlr.AG\n", seed=0),
                        Sampling(max_new_tokens=3, logprobs=True))
    agent = MultiTurnAgentPolicy(lm, GridWorld(), EpisodeLimits(max_turns=4, max_total_tokens=80, step_timeout_s=5.0))
    tasks = [p.as_sample() for p in GridTasks(2).make(4, 0)]  # 2x2 grids: random moves reach the goal often
    b = agent.rollout(tasks, 4)
    b = b.replace(rewards=torch.tensor([s["episode_return"] for s in b.samples], dtype=torch.float32))
    a = turn_rows(b, agent.tokenizer)
    a = a.replace(rewards=torch.tensor([s["episode_return"] for s in a.samples], dtype=torch.float32))
    torch.set_num_threads(before)
    return b, a


def per_turn_values(batch, adv):
    """{(episode, t): advantage} read from token advantages (B, T) or row advantages (B,)."""
    tt = turn_table(batch)
    if adv.dim() == 1:
        adv = adv[:, None].expand(batch.loss_mask.shape) * batch.loss_mask
    out = {}
    for b in range(batch.batch_size):
        for j in range(batch.loss_mask.shape[1]):
            u = int(tt.tok_turn[b, j])
            if u >= 0:
                key = (int(batch.episode_ids[b]), int(tt.t[u]))
                assert key not in out or abs(out[key] - float(adv[b, j])) < 1e-6
                out[key] = float(adv[b, j])
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_estimator_is_layout_independent(recipe, layouts):
    b, a = layouts
    assert b.rewards.unique().numel() > 1  # some episodes reach the goal, some do not
    est = build(recipe)
    adv_b, adv_a = est(b), est(a)
    for batch, adv in ((b, adv_b), (a, adv_a)):
        assert torch.isfinite(adv).all()
        if adv.dim() == 2:
            assert (adv[~batch.loss_mask] == 0).all()  # environment tokens and padding carry nothing
    vb, va = per_turn_values(b, adv_b), per_turn_values(a, adv_a)
    assert vb.keys() == va.keys() and len(vb) == int(b.num_turns.sum())
    for k in vb:
        assert vb[k] == pytest.approx(va[k], abs=1e-5)
    assert any(abs(v) > 0 for v in vb.values())


@pytest.mark.parametrize("recipe", ["gigpo", "dcpo"])
def test_recipe_runs_one_step(recipe, tmp_path):
    proc = subprocess.run(cli(f"configs/agentic/{recipe}.yaml", *TINY), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    loss = events(logs, "train/loss")
    assert sorted(loss) == [0] and loss[0] == loss[0]
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1


def test_bad_estimator_argument_fails_fast_naming_it(tmp_path):
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cli("configs/agentic/gigpo.yaml", "--model.init_args.advantage.init_args.gamma", "1.5",
                              "--trainer.max_steps", "1"), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode != 0
    assert "gamma must be in [0, 1], got 1.5" in proc.stderr and "advantage" in proc.stderr
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 10.0  # CPU seconds, not wall
