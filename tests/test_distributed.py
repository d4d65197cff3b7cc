"""Distributed training that is right (issue 15), proven with real processes on gloo (CPU, 2 ranks):

- data by rank: under ``advlab fit --trainer.strategy ddp --trainer.devices 2`` the ranks score disjoint prompts
  whose union is the single-process stream of 2 x prompts_per_step prompts; each rank samples with its own seed and
  its RNG state is checkpointed: resumed from a checkpoint, every rank draws exactly the samples of the straight run;
- the same update as one big process: one optimiser step of a 2-rank DDP run on a fixed batch split by rank equals
  one process's step on the whole batch (token-mean and sequence-mean aggregation, GRPO's batch-scaled advantage).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_support import CASES, G, make_policy, one_step, score
from helpers import digit_prompts
from resume import ROOT, TINY, cli, events

SUPPORT = ROOT / "tests/support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------ data and sampling by rank
def test_rank_slices_of_the_stream_are_the_single_process_stream_across_passes():
    """3 ranks x 2 prompts of 13 samples (2 global batches a pass, one sample left over): for 5 batches (3 passes)
    the ranks' slices, in rank order, are the single-process stream of 6 prompts a batch, from any start."""
    from common.data import PromptStream

    samples = [{"prompt": str(i)} for i in range(13)]

    def take(stream, n):
        it = iter(stream)
        return [[s["prompt"] for s in next(it)] for _ in range(n)]

    for start in (0, 3):
        one = take(PromptStream(samples, 6, seed=5, start=start), 5)
        ranks = [take(PromptStream(samples, 2, seed=5, start=start, rank=r, world_size=3), 5) for r in range(3)]
        assert [sum((ranks[r][b] for r in range(3)), []) for b in range(5)] == one
    with pytest.raises(ValueError, match="rank must be in"):
        PromptStream(samples, 2, seed=0, rank=3, world_size=3)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 3\]"):
        PromptStream(samples, 5, seed=0, world_size=4)


# ------------------------------------------------------------------ the same, through advlab on Lightning's DDP
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

    # logged metrics are the mean over ranks: train/reward is the mean of the two ranks' mean rewards
    logged = events(tmp_path / "straight/runs/lightning_logs/version_0", "train/reward")
    means = [[sum(map(score, seen[r][k]["completions"])) / 4 for r in (0, 1)] for k in range(2)]
    assert any(m[0] != m[1] for m in means), means  # rank 0's own mean would not pass
    want = [sum(m) / 2 for m in means]
    assert [logged[k] for k in sorted(logged)] == pytest.approx(want, abs=1e-6), (logged, want)

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


# ------------------------------------------------------------------ the same update as one big process
def global_batch():
    """4 prompts x G = 3 rows sampled by the tiny policy, rewards set per row (no all-equal group), and ragged
    masks with many more tokens on rank 0's rows (0-5) than on rank 1's (6-11), one of them empty (row 9): a
    per-rank token count, or a per-rank count of non-empty sequences, is wrong."""
    torch.manual_seed(0)
    policy = make_policy()
    batch = policy.rollout(digit_prompts(4), G)
    B, T = batch.completion_mask.shape
    lengths = torch.tensor([6, 5, 6, 4, 6, 5, 1, 2, 1, 0, 2, 1]).clamp(max=T)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 0.0, 3.0, 0.2, 0.4, 0.0], dtype=torch.float64)
    return batch.replace(completion_mask=mask, rewards=rewards, reward_components=rewards[:, None], reward_names=("r",))


def test_a_two_rank_ddp_step_equals_one_process_on_the_global_batch(tmp_path):
    """float64, SGD lr 1, no clipping: the 2-rank weights equal the 1-process weights to 1e-10 (the sums differ only
    in order: ~1e-16 relative per term), while the step moves them by > 1e-3; normalising each rank by its own
    counts (the control) differs by > 1e-4 in both modes. GRPO scale="batch": the ranks' advantages are the global
    batch's."""
    batch = global_batch()
    torch.save(batch.state_dict(), tmp_path / "batch.pt")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "ddp_support.py"), str(tmp_path / "batch.pt"), str(tmp_path)],
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port), stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    init = {n: p.detach() for n, p in make_policy().named_parameters()}
    for case in CASES:
        ref = one_step(batch, *case)  # one process, the whole batch, no all_reduce
        got_adv = torch.cat([ranks[0][case]["advantages"], ranks[1][case]["advantages"]])
        torch.testing.assert_close(got_adv, ref["advantages"], rtol=0, atol=1e-12, msg=f"{case}")
        moved = max(float((ref[n] - init[n]).abs().max()) for n in init)
        assert moved > 1e-3, (case, moved)
        for r in (0, 1):
            gap = max(float((ranks[r][case][n] - ref[n]).abs().max()) for n in init)
            assert gap <= 1e-10, (case, r, gap)
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        ref = one_step(batch, aggregation, "group")
        control = max(float((ranks[0]["per_rank", aggregation][n] - ref[n]).abs().max()) for n in init)
        assert control > 1e-4, (aggregation, control)
