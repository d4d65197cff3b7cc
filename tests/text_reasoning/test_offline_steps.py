"""Step-level DAPO's offline pipeline on a tiny real model: steps, state records, the critic's step advantages,
step batches, and offline actor training that moves log π/π_ref toward A/β."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from common.losses.step_advantage import DirectAdvantageLoss
from common.models import TinyLlama
from common.rewards.length import LengthReward
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from text_reasoning.module import TextReasoningModule
from text_reasoning.offline_steps import (OfflineStepData, OfflineStepRecords, build_step_records, fit_step_critic,
                                          split_steps, step_batch)

POLICY = dict(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0)


def offline_module(**kwargs) -> TextReasoningModule:
    return TextReasoningModule(policy=TinyLlama(**POLICY), methods=[OfflineStepRecords()], log_samples_every=0, **kwargs)


def test_split_steps_keeps_delimiters_and_reassembles():
    assert split_steps("a\nb\n\nc") == ["a\n", "b\n\n", "c"]
    assert split_steps("abc\n") == ["abc\n"]
    assert split_steps("") == []
    text = "12+3++4+"
    assert split_steps(text, "+") == ["12+", "3++", "4+"] and "".join(split_steps(text, "+")) == text
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("x", "")


def test_records_and_critic_advantages_telescope_to_reward_minus_initial_value():
    torch.manual_seed(0)
    module = TextReasoningModule(policy=TinyLlama(**POLICY), rewards=[LengthReward(target=4)],
                                 sampling=Sampling(max_new_tokens=8), log_samples_every=0)
    problems = digit_prompts(3)
    records = build_step_records(module, problems, samples_per_prompt=2, delimiter="+")
    _, records = fit_step_critic(module, records, steps=50)
    starts = [i for i, r in enumerate(records) if r["prefix"] == ""]
    assert len(starts) == 6  # one empty-prefix state per rollout (3 prompts x 2 samples)
    for a, b in zip(starts, starts[1:] + [len(records)]):
        episode = records[a:b]
        assert episode[-1]["terminal"] and not any(r["terminal"] for r in episode[:-1])
        for k in range(len(episode) - 1):  # prefix of the next state = prefix + step
            assert episode[k + 1]["prefix"] == episode[k]["prefix"] + episode[k]["step"]
            assert episode[k]["advantage"] == pytest.approx(episode[k + 1]["value"] - episode[k]["value"], abs=1e-5)
        # Σ_k A(s_k, a_k) = r − V(s_0): the step advantages telescope
        total = sum(r["advantage"] for r in episode)
        assert total == pytest.approx(episode[0]["reward"] - episode[0]["value"], abs=1e-5)


def records_file(tmp_path, n=8):
    records = [{"prompt": p["prompt"], "answer": p["answer"], "task": "arithmetic", "prefix": "1+" if i % 2 else "",
                "step": "23+" if i % 3 else "4", "terminal": i % 3 == 0, "reward": float(i % 2),
                "advantage": (i - 3.5) / 10} for i, p in enumerate(digit_prompts(n, seed=1))]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_step_batch_puts_the_prefix_in_the_prompt_and_the_step_in_the_completion(tmp_path):
    _, records = records_file(tmp_path)
    module = offline_module(loss=DirectAdvantageLoss(beta=0.5))
    batch = module.loop.rollout(records[:4])  # the method's rollout: step_batch of the data batch
    tok = module.policy.tokenizer
    for i, r in enumerate(records[:4]):
        prompt = tok.decode(batch.prompt_ids[i][batch.prompt_mask[i]])
        assert prompt == r["prompt"] + "=" + r["prefix"]  # the char tokenizer's template is content + "="
        step = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        assert step == tok(r["step"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r["terminal"] else [])
    torch.testing.assert_close(batch.advantages, torch.tensor([r["advantage"] for r in records[:4]]))
    torch.testing.assert_close(batch.rewards, torch.tensor([r["reward"] for r in records[:4]]))
    got = module.loop.collect(records[:4]).kept  # rows arrive scored and estimated: only reference log-probs added
    torch.testing.assert_close(got.advantages, batch.advantages)
    assert got.ref_logprobs is not None and got.reward_components is None


def test_offline_training_moves_the_log_ratio_toward_a_over_beta(tmp_path):
    path, records = records_file(tmp_path)
    L.seed_everything(0, verbose=False)
    module = offline_module(loss=DirectAdvantageLoss(beta=0.5), lr=3e-3, group_size=1)
    data = OfflineStepData(path=str(path), prompts_per_step=8, val_size=4)
    batch = step_batch(module.policy, records)

    def fit_error():
        with torch.no_grad():
            b = module.loop.reference_logprobs(batch)
            lp = module.policy(b).logprobs
            ratio = ((lp - b.ref_logprobs) * b.completion_mask).sum(1)
            return float(((ratio - b.advantages / 0.5) ** 2).mean())

    before = fit_error()  # log-ratio 0: Σ (A/β)² / 8 = mean of ((i − 3.5)/5)²
    assert before == pytest.approx(sum(((i - 3.5) / 5) ** 2 for i in range(8)) / 8, rel=1e-5)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert fit_error() < 0.1 * before


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="path"):
        OfflineStepData(path=str(tmp_path / "missing.jsonl"), val_size=2).setup()
    module = offline_module(loss=DirectAdvantageLoss())
    with pytest.raises(ValueError, match="offline step records"):
        module.loop.collect(digit_prompts(2))
