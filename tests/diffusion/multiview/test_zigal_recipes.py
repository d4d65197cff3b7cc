"""The multiview diffusion recipes from YAML (configs/diffusion/{mvc_zigal,ddpo,seppo}.yaml): each runs 2 steps of
``advlab fit`` with a tiny base (an untrained small UNet, 2 denoising steps, 2 prompts); the method state (λ, τ; the
SePPO ring) is in the checkpoint; SePPO's kill-and-resume is exact."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from resume import ROOT, cli, events

BASES = {"mvc_zigal": "{views: 4, size: 16, steps: 0, channels: [16, 32]}",
         "ddpo": "{views: 4, size: 16, steps: 0, channels: [16, 32]}",
         "seppo": "{views: 1, size: 16, style: broad, steps: 0, channels: [16, 32]}"}


def tiny(recipe: str) -> list[str]:
    return ["--model.init_args.base", BASES[recipe], "--model.init_args.num_steps", "2",
            "--data.init_args.prompts_per_step", "2", "--trainer.enable_progress_bar", "false",
            "--model.init_args.log_images_every", "1"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("recipe", ["mvc_zigal", "ddpo"])  # seppo: its 4 steps in the kill-and-resume test below
def test_recipe_runs_two_steps_from_advlab(recipe, tmp_path):
    run = cli(f"configs/diffusion/{recipe}.yaml", *tiny(recipe), "--trainer.max_steps", "2")
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    tags = {"mvc_zigal": ("train/zigal_loss", "train/mvc_lambda", "train/mvc_tau", "train/reward/alignment",
                          "train/reward/consistency"),
            "ddpo": ("train/pg_loss", "train/clip_frac", "train/reward/consistency")}[recipe]
    for tag in ("train/loss", "train/grad_norm", "train/hf_energy", "train/group_diversity", *tags):
        values = events(logs, tag)
        assert sorted(values) == [0, 1] and all(v == v for v in values.values()), tag
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    if recipe == "mvc_zigal":  # λ, τ and the initialised flag are checkpointed; τ took the first batch's mean
        assert bool(state["methods.1.constraint.initialised"]) and int(state["methods.1.constraint.updates"]) == 2
        assert 0.0 <= float(state["methods.1.constraint.lam"]) <= 5.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs), size_guidance={"images": 0})
    acc.Reload()
    assert "views" in acc.Tags()["images"]  # the TensorBoard grid of the views


def test_seppo_kill_and_resume_is_exact(tmp_path, monkeypatch):
    """SIGKILL after the first checkpoint, resume from last.ckpt: weights, AdamW state, the ring (slots, counters),
    the reference network and the RNG (the draw of the reference, the rows' noise) equal an uninterrupted run's.
    The ring saves every update here, so the resumed run draws from a ring that the checkpoint had to restore."""
    from resume import assert_sigkill_resume_exact

    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = cli("configs/diffusion/seppo.yaml", *tiny("seppo"), "--model.init_args.methods.init_args.ring.init_args.every",
              "1", "--model.init_args.methods.init_args.ring.init_args.size", "3")
    final = assert_sigkill_resume_exact(tmp_path, run, max_steps=4, every=2,
                                        tags=("train/loss", "train/seppo_ref_slot", "train/reward"))
    state = final["state_dict"]
    assert int(state["methods.0.ring.saved"]) == 5 and int(state["methods.0.ring.updates"]) == 4  # θ_0 + one per update
    assert state["methods.0.ring.slots"].shape[0] == 3
    logs = tmp_path / "straight/runs/lightning_logs/version_0"
    for tag in ("train/seppo_loss", "train/flip_frac", "train/seppo_ring_held", "train/reward/preference_iou",
                "train/hf_energy"):
        values = events(logs, tag)
        assert sorted(values) == [0, 1, 2, 3] and all(v == v for v in values.values()), tag
