"""Evaluation records (diffusion/dllm/evaluation.py): the split hash names the problems, and a validation of the
dllm module writes its record beside the accuracy."""

from __future__ import annotations

import json

import lightning as L
import torch

from diffusion.dllm.data import ALPHABET, ChainSumData, chain_sum
from diffusion.dllm.evaluation import PROMPT_SLOT, EvaluationRecord, split_hash
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.module import DiffusionLMModule
from diffusion.dllm.policy import MaskedDiffusionPolicy
from diffusion.dllm.rewards import ChainSumCorrect


def test_split_hash_changes_with_the_split_and_not_with_its_order():
    split = chain_sum(20, ks=(5, 6), seed=3)
    h = split_hash(split)
    assert len(h) == 16 and h == split_hash(list(reversed(split)))  # order-free
    assert h == split_hash([{"prompt": s["prompt"], "answer": s["answer"]} for s in split])  # only prompt and answer
    assert split_hash(split[:-1]) != h  # a problem removed
    assert split_hash(split + [split[0]]) != h  # a problem repeated
    changed = [dict(s) for s in split]
    changed[7]["answer"] = str((int(changed[7]["answer"]) + 1) % 10)
    assert split_hash(changed) != h  # one answer changed
    assert split_hash(chain_sum(20, ks=(5, 6), seed=4)) != h
    assert split_hash([]) == split_hash([])  # degenerate: a hash, no error


def test_record_of_a_policy_names_its_sampler_settings():
    pol = MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=ALPHABET, hidden_size=16, num_layers=1, num_heads=2),
                                gen_length=12, block_length=4, steps=6, temperature=0.7)
    problems = chain_sum(5, seed=0)
    rec = EvaluationRecord.of(pol, problems, verifier=ChainSumCorrect())
    assert (rec.gen_length, rec.steps, rec.block_length, rec.temperature, rec.n_problems) == (12, 6, 4, 0.0, 5)
    assert EvaluationRecord.of(pol, problems, greedy=False).temperature == 0.7
    assert rec.split_hash == split_hash(problems) and rec.verifier == "diffusion.dllm.rewards.ChainSumCorrect"
    # the template is exactly what the policy reads: BOS + "<prompt>="
    assert rec.prompt_template == "<s>" + PROMPT_SLOT + "="
    ids, mask = pol.encode([{"prompt": "123"}])
    assert pol.tokenizer.decode(ids[0][mask[0]]) == rec.prompt_template.replace(PROMPT_SLOT, "123")
    assert "</s>" in rec.eos_rule and "12 steps" not in rec.markdown() and "6 steps" in rec.markdown()


def test_a_validation_run_writes_its_record(tmp_path, one_thread):
    torch.manual_seed(0)
    module = DiffusionLMModule(TinyDiffusionLM(alphabet=ALPHABET, hidden_size=16, num_layers=1, num_heads=2),
                               gen_length=12, block_length=12, steps=4)
    data = ChainSumData(train_size=16, val_size=6, val_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data)
    lines = (tmp_path / "evaluation_records.jsonl").read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["n"] == 6 and row["accuracy"] == metrics["val/accuracy"] and row["step"] == 0
    rec = row["record"]
    assert rec["split_hash"] == split_hash(data.val_set) and rec["n_problems"] == 6
    assert (rec["gen_length"], rec["steps"], rec["block_length"], rec["temperature"]) == (12, 4, 12, 0.0)
    assert module.evaluation_record.to_dict() == rec
    trainer.validate(module, datamodule=data)  # a second validation appends a second line, the same split
    rows = [json.loads(x) for x in (tmp_path / "evaluation_records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["record"] == rec
