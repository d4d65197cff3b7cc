"""Distributed training that is right (issue 15), proven with real processes on gloo (CPU, 2 ranks):

- data by rank: under ``advlab fit --trainer.strategy ddp --trainer.devices 2`` the ranks score disjoint prompts
  whose union is the single-process stream of 2 x prompts_per_step prompts; each rank samples with its own seed and
  its RNG state is checkpointed: resumed from a checkpoint, every rank draws exactly the samples of the straight run;
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import torch

from resume import ROOT, TINY, cli

SUPPORT = ROOT / "tests/support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------ data and sampling by rank (advlab, Lightning DDP)
def ddp_fit(cwd: Path, record: Path, *args: str) -> subprocess.CompletedProcess:
    """``advlab fit`` on 2 CPU ranks (Lightning launches the second process), tiny model, 2 prompts x G = 2 a rank."""
    cwd.mkdir(exist_ok=True)
    reward = json.dumps([{"class_path": "ddp_support.RecordingReward", "init_args": {"path": str(record)}}])
    cmd = cli("configs/text_reasoning/grpo_arithmetic.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.group_size", "2", "--model.init_args.rewards", reward,
              "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "1",
              "--checkpoint.save_top_k", "-1", *args)
    return subprocess.run(cmd, cwd=cwd, env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=300)


def records(path: Path) -> dict[int, list[dict]]:
    """Each rank's reward calls (one per training step), in order."""
    out: dict[int, list[dict]] = {0: [], 1: []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["rank"]].append(row)
    return out


def test_ddp_ranks_score_disjoint_prompts_of_the_global_stream_and_resume_their_own_samples(tmp_path):
    from common.data import PromptStream
    from text_reasoning.data import ReasoningData

    straight = ddp_fit(tmp_path / "straight", tmp_path / "straight.jsonl", "--trainer.max_steps", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    seen = records(tmp_path / "straight.jsonl")
    assert [len(seen[r]) for r in (0, 1)] == [2, 2], seen

    # (a) disjoint prompts; their union is the single-process stream's batch of 2 x prompts_per_step
    data = ReasoningData(train_size=24, val_size=4, prompts_per_step=4, seed=0)  # the recipe's data, one process
    data.setup("fit")
    stream = iter(PromptStream(data.train_set, 4, seed=0))
    for step in range(2):
        want = [s["prompt"] for s in next(stream)]
        ranks = [seen[r][step]["prompts"] for r in (0, 1)]  # G = 2 rows per prompt, a group on one rank
        assert ranks[0][::2] + ranks[1][::2] == want and ranks[0][::2] == ranks[0][1::2], (step, ranks, want)
        assert not set(ranks[0]) & set(ranks[1])

    # (b) per-rank RNG states in the checkpoint, restored on resume: step 2 resumed from step 1's checkpoint draws,
    # on every rank, the completions of the straight run's step 2
    ckpt = tmp_path / "straight/runs/lightning_logs/version_0/checkpoints"
    first = next(p for p in ckpt.glob("*.ckpt") if "step=1" in p.name)
    states = torch.load(first, map_location="cpu", weights_only=True)["advlab_rng_ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # each rank its own stream
    resumed = ddp_fit(tmp_path / "resumed", tmp_path / "resumed.jsonl", "--trainer.max_steps", "2", "--ckpt_path", str(first))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = records(tmp_path / "resumed.jsonl")
    for r in (0, 1):
        assert again[r] == seen[r][1:], (r, again[r], seen[r][1:])
