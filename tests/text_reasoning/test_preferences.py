"""The offline preference path (text_reasoning/preferences.py) on a tiny real model: jsonl pairs and lists become
groups of teacher-forced candidates with their labels, and a few DPO steps raise the chosen answer's implicit
reward above the rejected one's."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from common.losses.preference import ADPOLoss, DPOLoss
from common.models import TinyLlama
from common.rollout.base import Sampling
from helpers import DIGITS
from text_reasoning.module import TextReasoningModule
from text_reasoning.preferences import ArithmeticPreferences, OfflineCandidates, PreferenceFile


def make_module(**overrides) -> TextReasoningModule:
    kwargs = dict(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS + " =", seed=0),
                  methods=[OfflineCandidates()], loss=DPOLoss(beta=0.5), sampling=Sampling(max_new_tokens=16),
                  group_size=2, lr=1e-2, log_samples_every=0)
    kwargs.update(overrides)
    return TextReasoningModule(**kwargs)


def test_jsonl_pairs_and_lists_become_labelled_groups(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "1+2", "chosen": "3", "rejected": "4"},
            {"prompt": "2+2", "completions": ["4", "5", "22"], "scores": [1.0, 0.2, 0.0]}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    pairs = PreferenceFile(str(path)).make(10, seed=0)
    assert pairs[0].meta["candidates"] == [["3", 1.0], ["4", 0.0]]
    lists_path = tmp_path / "lists.jsonl"
    lists_path.write_text(json.dumps(rows[1]) + "\n")
    lists = PreferenceFile(str(lists_path)).make(10, seed=0)
    module = make_module()
    batch = module.loop.rollout([pairs[0].as_sample(), lists[0].as_sample()])  # rewards set: the loop does not score
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 1]
    assert batch.rewards.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.2, 0.0])
    assert batch.preference_score.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.2, 0.0])
    assert batch.correct.tolist() == [True, False, True, False, False]
    tok = module.policy.tokenizer
    eos = tok.eos_token_id
    expected = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in ["3", "4", "4", "5", "22"]]
    for i, ids in enumerate(expected):
        assert batch.completion_ids[i][batch.completion_mask[i]].tolist() == ids
    with pytest.raises(ValueError, match="prompt/chosen/rejected"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
        PreferenceFile(str(bad)).make(1, seed=0)


def test_generated_lists_and_missing_candidates():
    probs = ArithmeticPreferences(num_wrong=3).make(4, seed=0)
    for p in probs:
        texts = [c[0] for c in p.meta["candidates"]]
        assert texts[0].endswith(f"= {p.answer}") and len(set(texts)) == 4
        assert [c[1] for c in p.meta["candidates"]] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no 'candidates'"):
        make_module().loop.rollout([{"prompt": "1+2", "answer": "3", "task": "arithmetic"}])


@pytest.mark.parametrize("loss", [DPOLoss(beta=0.5), ADPOLoss(anchor="reference", tau=1.0)])
def test_a_few_offline_steps_rank_chosen_above_rejected(loss):
    module = make_module(loss=loss)
    data = [p.as_sample() for p in ArithmeticPreferences().make(8, seed=1)]
    batch = module.loop.rollout(data)

    @torch.no_grad()
    def margin() -> float:  # mean over pairs of (s_w − s_w^ref) − (s_l − s_l^ref); the reference is the start
        s = module.policy(batch).logprobs.sum(1)  # (B,)
        return float((s[0::2] - s[1::2]).mean())

    before = margin()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8, collate_fn=list))
    assert margin() > before + 0.5, (before, margin())
