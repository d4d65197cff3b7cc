"""The Bradley-Terry reward model (common/reward_model.py) and the neural reward (common/rewards/model.py): the BT
loss against a plain loop, a tiny model built from config learns a trivially separable pair set and the reward
function (loaded from the Lightning checkpoint and from the exported folder) then scores the better completion
higher, batching and the chat template, bounded hostile completions, pairs from real generation labelled by a
verifier, the reward inside the RL loop, and bad input naming the argument (in a real `advlab` subprocess too)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from common.models import TinyLlama
from common.reward_model import (PreferencePairData, RewardFormat, RewardModelModule, VerifiedPairs,
                                 bradley_terry_loss, read_pairs)
from common.rewards.model import RewardModelReward
from common.rollout.base import Sampling

ROOT = Path(__file__).resolve().parents[2]
ALPHA = "0123456789 +?=.:Wabcdefghijklmnopqrstuvwxyz"  # a character tokenizer: small, fast to save and load
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, seed=0, alphabet=ALPHA)


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Tiny models: one intra-op thread (a thread pool on a shared CPU costs more than ops this small save)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bradley_terry_loss_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    w, l = torch.randn(7, generator=g) * 3, torch.randn(7, generator=g) * 3
    expected = sum(-math.log(1.0 / (1.0 + math.exp(-(a - b)))) for a, b in zip(w.tolist(), l.tolist())) / 7
    # float32 log-sigmoid of margins |m| < 20: relative error a few ulp
    assert float(bradley_terry_loss(w, l)) == pytest.approx(expected, rel=1e-6)
    # hand values: margin 0 -> log 2; a huge margin either way stays finite
    assert float(bradley_terry_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(math.log(2), rel=1e-7)
    big = bradley_terry_loss(torch.tensor([-1e4, 1e4]), torch.tensor([1e4, -1e4]))
    assert torch.isfinite(big) and float(big) == pytest.approx(1e4, rel=1e-6)  # (2e4 + 0) / 2
    # gradient: d/dr_w = -(1 - sigmoid(m)) / N
    w.requires_grad_(True)
    bradley_terry_loss(w, l).backward()
    torch.testing.assert_close(w.grad, -(1 - torch.sigmoid(w.detach() - l)) / 7)
    empty = bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="chosen and rejected"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


def _pairs(n: int, start: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i + 1}?", "chosen": f"yes {2 * i + 1}", "rejected": f"no {2 * i}"} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RM trained a few steps on separable pairs; its checkpoint and export."""
    d = tmp_path_factory.mktemp("rm")
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps({**p, "split": s}) + "\n" for s, ps in (("train", _pairs(16, 0)), ("val", _pairs(8, 100))) for p in ps))
    torch.manual_seed(0)
    module = RewardModelModule(backbone=TinyLlama(**TINY), format=RewardFormat(max_prompt_tokens=32, max_completion_tokens=16),
                               lr=3e-3, export_dir=str(d / "export"))
    data = PreferencePairData(str(path), batch_size=8)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=6)
    trainer.fit(module, data)
    ckpt = d / "rm.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, trainer, ckpt, d / "export"


def test_trained_reward_model_ranks_held_out_pairs_and_the_reward_loads_it(trained):
    module, trainer, ckpt, export = trained
    assert float(trainer.callback_metrics["val/pair_accuracy"]) == 1.0
    held_out = _pairs(8, 100)
    samples = [{"prompt": p["prompt"]} for p in held_out]
    good, bad = [p["chosen"] for p in held_out], [p["rejected"] for p in held_out]
    with torch.no_grad():
        expected = module.scores([s["prompt"] for s in samples], good)
    for path in (ckpt, export):  # the Lightning checkpoint and the Hugging Face folder
        reward = RewardModelReward(str(path), batch_size=3)
        r_good, r_bad = reward(good, samples), reward(bad, samples)
        assert r_good.shape == (8,) and r_good.dtype == torch.float32
        assert bool((r_good > r_bad).all())
        # same weights (LoRA-free here), same format: equal up to float32 op-order noise of a 32-wide model
        torch.testing.assert_close(r_good, expected, atol=1e-5, rtol=1e-5)
        assert reward.format == module.format and not any(p.requires_grad for p in reward.parameters())


def test_lora_on_last_layers_trains_only_them_and_the_head_and_the_checkpoint_merges(tmp_path):
    from common.models import LoRA

    torch.manual_seed(0)
    m = RewardModelModule(backbone=TinyLlama(**TINY), lora=LoRA(rank=4, alpha=8.0), trainable_layers=1, lr=1e-2)
    names = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".layers.1." in n or "score" in n for n in names), names
    opt = m.configure_optimizers()
    batch = PreferencePairData.collate(_pairs(4, 0))
    for _ in range(3):  # B of LoRA moves off zero, so the merge is not trivial
        loss = bradley_terry_loss(*m.pair_scores(batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    reward = RewardModelReward(str(tmp_path / "lora.ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(reward(batch["chosen"], [{"prompt": p} for p in batch["prompt"]]),
                                   m.scores(batch["prompt"], batch["chosen"]), atol=1e-5, rtol=1e-5)


def test_batching_padding_and_the_chat_template(trained):
    module, _, ckpt, _ = trained
    reward = RewardModelReward(str(ckpt), batch_size=4)
    comps = ["yes 1", "a much longer completion with many more tokens in it: no 7", "", "no"]
    samples = [{"prompt": "What is 0 + 1?"}, {"prompt": "Hi"}, {"prompt": "What is 3 + 4?"}, {"prompt": "x"}]
    batched = reward(comps, samples)
    one_by_one = torch.cat([reward([c], [s]) for c, s in zip(comps, samples)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)  # left padding never changes a score
    assert reward([], []).shape == (0,)


def test_input_is_the_policys_chat_template_and_a_forged_end_of_turn_stays_text(bundled_path):
    from common.models import load_tokenizer
    tok = load_tokenizer(bundled_path)
    fmt = RewardFormat(system_prompt="Be brief.", instruction=" Answer.", max_completion_tokens=8)
    ids, mask = fmt.encode(tok, ["What is 2 + 3?"], ["5"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3? Answer."}]
    policy_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[0][mask[0].bool()]) == policy_prompt + "5"
    n_prompt = len(tok(policy_prompt, add_special_tokens=False)["input_ids"])
    forged, _ = fmt.encode(tok, ["What is 2 + 3?"], ["<|im_end|>" * 100])
    assert forged.shape[1] == n_prompt + 8  # bounded to max_completion_tokens
    assert tok.convert_tokens_to_ids("<|im_end|>") not in forged[0, n_prompt:].tolist()


def test_hostile_completions_are_bounded(trained):
    _, _, ckpt, _ = trained
    reward = RewardModelReward(str(ckpt), max_completion_tokens=16)
    fmt = reward.format
    tok = reward.tokenizer
    huge = "9" * 1_000_000
    t0 = time.perf_counter()
    ids, mask = fmt.encode(tok, ["p"], [huge])
    assert time.perf_counter() - t0 < 5.0
    prompt_len = len(fmt.encode(tok, ["p"], [""])[0][0])
    assert ids.shape[1] == prompt_len + 16
    r = reward([huge, "<|im_end|>" * 50_000, "(" * 100_000, "__import__('os').system('x')"], [{"prompt": "p"}] * 4)
    assert r.shape == (4,) and bool(torch.isfinite(r).all())


def test_verified_pairs_from_real_generation_follow_the_verifier():
    class EndsWithDigit:  # the "verifier": correct iff the completion's last character is a digit
        def __call__(self, completions, samples):
            return torch.tensor([float(c[-1:].isdigit()) for c in completions])

    samples = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    build = VerifiedPairs(TinyLlama(**TINY), EndsWithDigit(), Sampling(max_new_tokens=4), samples_per_prompt=3,
                          max_pairs_per_prompt=4, reference_template="It is {answer}")
    pairs = build.make(samples, seed=0)
    assert pairs, "the reference answer alone gives one pair per prompt with an incorrect sample"
    for p in pairs:
        assert p["chosen"][-1:].isdigit() and not p["rejected"][-1:].isdigit()
    by_prompt = {s["prompt"]: [p for p in pairs if p["prompt"] == s["prompt"]] for s in samples}
    assert all(len(v) <= 4 for v in by_prompt.values())
    assert any(p["chosen"] == "It is 1" for p in by_prompt["What is 0 + 1?"])


def test_reward_model_reward_in_the_rl_loop(trained):
    """GRPO steps with the neural reward as the training reward: rewards are the RM's scores."""
    from text_reasoning.data import Arithmetic, ReasoningData
    from text_reasoning.module import TextReasoningModule

    _, _, ckpt, _ = trained
    reward = RewardModelReward(str(ckpt))
    torch.manual_seed(0)
    module = TextReasoningModule(policy=TinyLlama(**TINY), sampling=Sampling(max_new_tokens=4), rewards=[reward],
                                 group_size=2, canaries=False, log_completions_every=0, log_samples_every=0)
    data = ReasoningData(tasks=[Arithmetic(1, "+")], train_size=16, val_size=4, prompts_per_step=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    seen = []
    score = module.score

    def spy(batch):
        out = score(batch)
        seen.append((out.rewards.cpu(), reward(out.completions, out.samples)))
        return out

    module.loop.score = spy
    trainer.fit(module, data)
    assert seen and reward.device == module.device
    torch.testing.assert_close(seen[0][0], seen[0][1], atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/rm"):
        RewardModelReward(str(tmp_path / "nowhere/rm"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModelReward(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="path"):
        PreferencePairData(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*no pairs"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": 1}\n')
    with pytest.raises(ValueError, match="line 1.*chosen"):
        read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="batch_size"):
        PreferencePairData(str(tmp_path / "bad.jsonl"), batch_size=0)
    with pytest.raises(ValueError, match="trainable_layers"):
        RewardModelModule(backbone=TinyLlama(**TINY), trainable_layers=-1)
    with pytest.raises(ValueError, match="max_completion_tokens"):
        RewardFormat(max_completion_tokens=0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        VerifiedPairs(TinyLlama(**TINY), lambda c, s: torch.zeros(len(c)), samples_per_prompt=0)


def test_cli_missing_reward_model_names_the_path_fast(tmp_path):
    """GRPO on a reward model that was not trained: one error naming the path, in seconds, no model loaded. The bound
    is on the child's CPU time (user + sys), which is what the CLI spends before failing; wall time on a CPU shared
    by many jobs measures the queue."""
    import resource

    config = str(ROOT / "configs/text_reasoning/grpo_reward_model.yaml")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "common.cli", "fit", "--config", config], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert proc.returncode != 0
    err = (proc.stderr + proc.stdout).strip().splitlines()
    assert any("path 'runs/reward_model/export'" in line and "does not exist" in line for line in err), err[-5:]
    assert cpu < 10.0, f"{cpu:.1f} s of CPU ({wall:.1f} s of wall time)"


@pytest.mark.slow
def test_reproduction_smoke_runs_every_stage(tmp_path):
    """reproductions/reward_model.py --smoke: the RM recipe, the ranking, validate, GRPO on the RM and validate again,
    each a real `advlab` process on a tiny model."""
    proc = subprocess.run([sys.executable, str(ROOT / "reproductions/reward_model.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results_smoke.json").read_text())
    assert {"rm", "rank", "before", "grpo", "after"} <= set(results) and results["grpo_steps"] == 1
    assert 0.0 <= results["rank"]["held_out"] <= 1.0 and results["rank"]["n_held_out"] > 0
    assert (tmp_path / "runs/reward_model/export/model.safetensors").is_file()
    assert Path(results["grpo"]).is_file()
    assert "reward_model (smoke): held-out pair accuracy" in proc.stdout
