"""Kill-and-resume check shared by every stateful method (`from resume import assert_sigkill_resume_exact`).

Two ``advlab fit`` processes run side by side: one straight to ``max_steps``, one SIGKILLed right after its first
checkpoint at step >= ``every`` and then resumed from ``last.ckpt`` to ``max_steps``. The final weights, every
other checkpointed tensor (method state: trackers, buffers, curricula), the AdamW state and the logged metrics
after the resume point must be identical.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [  # a tiny char-level policy on short arithmetic prompts: seconds per step
    "--model.init_args.policy", "common.models.TinyLlama",
    "--model.init_args.sampling.max_new_tokens", "6", "--model.init_args.lr", "1e-3",
    "--data.init_args.train_size", "24", "--data.init_args.val_size", "4",
]


def cli(config: str | Path, *args: str) -> list[str]:
    """The ``advlab fit`` command line for ``config`` (relative to the repo root) and extra arguments."""
    return [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / config), *args]


def events(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def step_of(ckpt: Path) -> int | None:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # noqa: BLE001 - not there yet
        return None


def _flatten(prefix: str, obj, out: dict) -> dict:
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}/{i}", v, out)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out


def assert_checkpoints_equal(a: dict, b: dict) -> None:
    """Two Lightning checkpoints hold the same keys and identical values (every tensor bit for bit: weights, optimiser
    state, method state, RNG states, data position); Lightning's own bookkeeping is skipped."""
    skip = {"callbacks", "loops", "hparams_name", "hyper_parameters", "pytorch-lightning_version", "lr_schedulers"}
    fa = _flatten("", {k: v for k, v in a.items() if k not in skip}, {})
    fb = _flatten("", {k: v for k, v in b.items() if k not in skip}, {})
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    for name, va in fa.items():
        if torch.is_tensor(va):
            torch.testing.assert_close(fb[name], va, rtol=0, atol=0, msg=name)
        else:
            assert fb[name] == va, name


def assert_sigkill_resume_exact(tmp_path: Path, run: list[str], *, max_steps: int = 6, every: int = 2,
                                tags: tuple[str, ...] = ("train/reward", "train/loss"), timeout: float = 300) -> dict:
    """Run ``run`` (an ``advlab fit`` command line) straight and killed-then-resumed; assert they are identical.
    Returns the final checkpoint of the straight run (for method-specific checks)."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    args = [*run, "--checkpoint.every_n_train_steps", str(every)]
    ref = subprocess.Popen([*args, "--trainer.max_steps", str(max_steps)], cwd=straight,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([*args, "--trainer.max_steps", "100000"], cwd=broken,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = broken / "runs/lightning_logs/version_0/checkpoints/last.ckpt"
    deadline = time.time() + timeout
    while step_of(last) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed_at = step_of(last)  # a later checkpoint may have landed between the read and the kill
    assert killed_at is not None and every <= killed_at < max_steps, f"killed at step {killed_at}: {err[-3000:]}"
    resumed = subprocess.run([*args, "--trainer.max_steps", str(max_steps), "--ckpt_path", str(last)], cwd=broken,
                             capture_output=True, text=True, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = ref.communicate(timeout=timeout)
    assert ref.returncode == 0, err[-3000:]

    a = torch.load(straight / "runs/lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(broken / "runs/lightning_logs/version_1/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == max_steps
    assert_checkpoints_equal(a, b)
    for tag in tags:
        seen_a = events(straight / "runs/lightning_logs/version_0", tag)
        seen_b = events(broken / "runs/lightning_logs/version_1", tag)
        assert sorted(seen_b) == list(range(killed_at, max_steps)), (tag, seen_b)  # the resumed run logged k..end
        assert [seen_b[s] for s in sorted(seen_b)] == [seen_a[s] for s in sorted(seen_b)], tag
    return a
