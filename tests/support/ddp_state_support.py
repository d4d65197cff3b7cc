"""Support for tests/test_distributed_state.py: a callback that writes each rank's module state after every training
step (``<dir>/rank<r>_step<k>.pt``: every state-dict entry outside the policy, extra state included, and the sum of
the policy's weights), so a test can compare the ranks' state, which Lightning's rank-0 checkpoint cannot show."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from common.rewards.base import RewardFunction


class StateRecorder(L.Callback):
    """After every training batch, ``torch.save`` this rank's non-policy state to ``<directory>/rank<r>_step<k>.pt``
    (k = the global step after the batch). Written before DDP's next forward broadcasts rank 0's buffers, so a
    rank whose buffers drifted from rank 0's shows it here."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                 for k, v in pl_module.state_dict().items() if not k.startswith("policy.")}
        state["policy_weight_sum"] = sum(p.detach().double().sum() for p in pl_module.policy.parameters())
        torch.save(state, self.directory / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(**extra: str) -> dict[str, str]:
    """The environment of a 2-rank ``advlab fit`` child: the repo and tests/support importable, one thread, a free
    port of its own for the process group."""
    import os

    root = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests/support")]), "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **extra}


def ddp_args(record: Path, states: Path) -> list[str]:
    """2 CPU ranks on gloo, the recording reward (:class:`SampleRecordingReward`) and the state recorder, a
    checkpoint after every step (each kept)."""
    import json

    reward = json.dumps([{"class_path": "ddp_state_support.SampleRecordingReward", "init_args": {"path": str(record)}}])
    recorder = json.dumps({"class_path": "ddp_state_support.StateRecorder", "init_args": {"directory": str(states)}})
    return ["--model.init_args.rewards", reward, f"--trainer.callbacks+={recorder}",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.save_top_k", "-1"]


def recorded_states(directory: Path, step: int) -> list[dict]:
    """Both ranks' recorded state after ``step``."""
    return [torch.load(directory / f"rank{r}_step{step}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]


class SampleRecordingReward(RewardFunction):
    """A reward function that appends one JSON line per call to ``path``: the rank, every row's prompt, its sample's
    ``uid`` and ``distribution`` tags (None where absent), the completions and the rewards it returns
    (``ddp_support.score``: (Σ code points mod 11) / 10, in [0, 1])."""

    name = "recording"

    def __init__(self, path: str):
        self.path = path

    def __call__(self, completions, samples):
        import json

        import torch.distributed as dist

        from ddp_support import score

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        rewards = [score(c) for c in completions]
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": rank, "prompts": [s["prompt"] for s in samples],
                                "uids": [s.get("uid") for s in samples],
                                "distributions": [s.get("distribution") for s in samples],
                                "completions": list(completions), "rewards": rewards}) + "\n")
        return torch.tensor(rewards, dtype=torch.float32)


def records(path: Path) -> dict[int, list[dict]]:
    """Each rank's reward calls (one per training step), in order."""
    import json

    out: dict[int, list[dict]] = {0: [], 1: []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["rank"]].append(row)
    return out


def instantiate(spec):
    """A ``{class_path, init_args}`` YAML entry (nested ones too) as the object the CLI would build."""
    import importlib

    if isinstance(spec, list):
        return [instantiate(s) for s in spec]
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        args = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module), name)(**args)
    return spec

