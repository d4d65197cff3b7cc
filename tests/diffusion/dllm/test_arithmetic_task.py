"""text_reasoning's arithmetic generator as a dllm task (diffusion/dllm/data.py ``ReasoningTaskData``): the samples
are the generator's (same seed -> same problems, same held-out split), the recipe's character alphabet writes every
prompt and trace, IGPO's hints come only from the trace's answer-free prefix, the reward on a decoded completion is
text_reasoning's verifier, and configs/diffusion/d1_arithmetic.yaml and igpo_arithmetic.yaml run 2 steps from
``advlab fit``."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml
from resume import ROOT, cli, events

from common.data import SEED_STRIDE
from diffusion.dllm.data import ARITHMETIC_ALPHABET, ReasoningTaskData, answer_free_prefix
from diffusion.dllm.igpo import IGPO
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.module import DiffusionLMModule
from diffusion.dllm.policy import MaskedDiffusionPolicy
from text_reasoning import tasks
from text_reasoning.data import Arithmetic, ReasoningData
from text_reasoning.rewards import TaskReward
from text_reasoning.traces import reference_solution

RECIPES = ("d1_arithmetic", "igpo_arithmetic")
TINY = ["--model.init_args.policy.init_args.hidden_size", "32", "--model.init_args.policy.init_args.num_layers", "1",
        "--model.init_args.policy.init_args.num_heads", "2", "--data.init_args.train_size", "32",
        "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step", "2", "--model.init_args.group_size", "4",
        "--trainer.enable_progress_bar", "false"]


def recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / f"configs/diffusion/{name}.yaml").read_text())


def tiny_policy(gen_length: int = 36) -> MaskedDiffusionPolicy:
    return MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=ARITHMETIC_ALPHABET, hidden_size=32, num_layers=1, num_heads=2),
                                 gen_length=gen_length, block_length=12, steps=18, p_mask=0.0)


def test_samples_are_the_text_reasoning_generators_problems():
    kw = dict(tasks=[Arithmetic(2, "+")], train_size=64, val_size=16, seed=3)
    ours, theirs = ReasoningTaskData(**kw), ReasoningData(**kw)
    ours.setup(), theirs.setup()
    for mine, ref in ((ours.train_set, theirs.train_set), (ours.val_set, theirs.val_set)):
        assert [{k: s[k] for k in r} for s, r in zip(mine, ref)] == ref and len(mine) == len(ref)
        assert all(s["trace"] == reference_solution(s) for s in mine)
    # the validation problems are the generator's own draw at seed + SEED_STRIDE, never trained on
    assert [s["prompt"] for s in ours.val_set] == [p.prompt for p in tasks.arithmetic(16, digits=2, ops="+", seed=3 + SEED_STRIDE)]
    assert not {s["prompt"] for s in ours.val_set} & {s["prompt"] for s in ours.train_set}
    for s in ours.train_set:  # the answer, by hand
        a, b = s["operands"]
        assert s["prompt"] == f"What is {a} + {b}?" and s["answer"] == str(a + b)
    other = ReasoningTaskData(**{**kw, "seed": 4})
    other.setup()
    assert [s["prompt"] for s in other.train_set] != [s["prompt"] for s in ours.train_set]
    # the recipes' data are the text-reasoning recipe's task
    assert recipe("d1_arithmetic")["data"]["init_args"]["tasks"] == recipe("igpo_arithmetic")["data"]["init_args"]["tasks"] \
        == yaml.safe_load((ROOT / "configs/text_reasoning/grpo_arithmetic.yaml").read_text())["data"]["init_args"]["tasks"]


def test_a_task_without_reference_solution_is_refused_in_one_line(tmp_path):
    from text_reasoning.data import LocalFile

    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n')
    data = ReasoningTaskData(tasks=[LocalFile(str(path))], train_size=1, val_size=0)
    with pytest.raises(ValueError, match=r"^ReasoningTaskData: tasks must be generated tasks .*'gsm8k'") as e:
        data.setup()
    assert "\n" not in str(e.value)


def test_the_recipe_alphabet_writes_every_prompt_and_trace():
    for name in RECIPES:
        policy = recipe(name)["model"]["init_args"]["policy"]["init_args"]
        assert policy["alphabet"] == ARITHMETIC_ALPHABET
    T = recipe("igpo_arithmetic")["model"]["init_args"]["gen_length"]
    tok = tiny_policy().tokenizer
    for digits in (1, 2, 3, 4):
        for p in tasks.arithmetic(300, digits=digits, ops="+-*", seed=digits):
            s = p.as_sample()
            for text in (s["prompt"], reference_solution(s)):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert len(ids) == len(text) and tok.pad_token_id not in ids, text  # one token a character, no unknown
                assert tok.decode(ids) == text
            if digits == 2:  # the recipes' task family: the trace and its EOS fit in T
                assert len(reference_solution(s)) + 1 <= T


def test_hints_come_only_from_the_answer_free_prefix():
    data = ReasoningTaskData(tasks=[Arithmetic(2, "+"), Arithmetic(1, "+-*"), Arithmetic(3, "*")], train_size=300, val_size=30)
    data.setup()
    for s in data.train_set + data.val_set:
        a, b = s["operands"]
        prefix = f"{a} {s['op']} {b} = "  # by hand: the restatement; the answer starts right after it
        assert s["hint_positions"] == list(range(len(prefix))) == list(range(answer_free_prefix(s)))
        assert s["trace"].startswith(prefix + s["answer"] + ".")
    # IGPO's own hint draw on the recipe's task, all chunks revealed and the recipe's eta: hints are trace tokens at
    # hint positions only, and the hinted text alone is wrong for the verifier (2-digit +: the answer is no operand)
    policy = tiny_policy()
    two = ReasoningTaskData(train_size=64, val_size=8)
    two.setup()
    samples, verify = two.train_set, TaskReward()
    for igpo in (IGPO(eta_low=1.0, eta_high=1.0, chunk_min=1, chunk_max=1), IGPO(chunk_min=2, chunk_max=4)):
        torch.manual_seed(0)
        ids, mask = igpo.hints(policy, samples, 4)  # (64·4, 36)
        allowed = torch.zeros_like(mask)
        for i, s in enumerate(samples):
            allowed[4 * i : 4 * i + 4, s["hint_positions"]] = True
            trace = torch.tensor(policy.tokenizer(s["trace"], add_special_tokens=False)["input_ids"])
            assert torch.equal(ids[4 * i : 4 * i + 4, : len(trace)][mask[4 * i : 4 * i + 4, : len(trace)]],
                               trace.expand(4, -1)[mask[4 * i : 4 * i + 4, : len(trace)]])
        assert not (mask & ~allowed).any()
        if igpo.eta_low == 1.0:
            assert torch.equal(mask, allowed)  # full hints: exactly the answer-free prefix
        hinted = policy.tokenizer.batch_decode(ids.masked_fill(~mask, policy.tokenizer.pad_token_id), skip_special_tokens=True)
        rows = [s for s in samples for _ in range(4)]
        assert verify(hinted, rows).sum() == 0
        assert all(s["answer"] not in h for h, s in zip(hinted, rows))


def test_reward_is_the_text_reasoning_verifier_on_the_decoded_completion():
    """Hand-written completions written into the policy's real sampler as frozen hints at every position (so the
    tokens are exactly them), decoded by the policy, scored by the module: the rewards are TaskReward's."""
    policy = tiny_policy()
    module = DiffusionLMModule(policy=policy.source, gen_length=36, block_length=12, steps=18, p_mask=0.0,
                               rewards=[TaskReward()], verifier=TaskReward())
    policy = module.policy
    sample = {"prompt": "What is 59 + 15?", "answer": "74", "task": "arithmetic", "level": 2, "operands": [59, 15], "op": "+"}
    cases = {  # completion -> TaskReward (the last number equals 74), by hand
        "59 + 15 = 74. The answer is 74.": 1.0,  # the reference solution
        "74": 1.0,
        "The answer is 74.0": 1.0,  # the same rational
        "59 + 15 = 75. The answer is 75.": 0.0,  # wrong
        "The answer is 74. 3": 0.0,  # the last number wins
        "-74": 0.0,
        "7 4": 0.0,
        "": 0.0,  # malformed: no number
        "... ?? What is the answer?": 0.0,
        "74" * 18: 0.0,  # hostile: fills all T positions, no EOS (truncated), one long number
    }
    T, tok = policy.gen_length, policy.tokenizer
    texts = list(cases)
    ids = torch.full((len(texts), T), tok.eos_token_id)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id])[: len(t)]
    prompt_ids, prompt_mask = policy.encode([sample] * len(texts))
    batch = policy.sample_batch(prompt_ids, prompt_mask, torch.arange(len(texts)), [dict(sample)] * len(texts),
                                hint_ids=ids, hint_mask=torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(batch.completion_ids, ids) and batch.completions == texts
    assert batch.truncated.tolist() == [t == "74" * 18 for t in texts]
    scored = module.score(batch)
    expected = torch.tensor([cases[t] for t in texts])
    assert torch.equal(scored.rewards, expected) and torch.equal(scored.rewards, TaskReward()(texts, [sample] * len(texts)))
    assert torch.equal(scored.correct, expected > 0.5)
    assert TaskReward()(["9" * 1_000_000 + " 74"], [sample]).tolist() == [1.0]  # untrusted length: bounded, still read


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps_from_advlab(name, tmp_path):
    # mu = 4 epochs x one minibatch = 4 optimiser steps per training step: 2 training steps = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cli(f"configs/diffusion/{name}.yaml", *TINY, "--trainer.max_steps", "8"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = tmp_path / "runs/lightning_logs/version_0"
    tags = ("train/loss", "train/reward", "train/accuracy", "train/grad_norm")
    if name == "igpo_arithmetic":
        tags += ("train/all_wrong_before", "train/all_wrong_after", "train/replacements", "train/rescued_groups")
    for tag in tags:
        values = events(logs, tag)
        assert sorted(values) == [0, 1] and all(v == v for v in values.values()), tag
    ckpt = torch.load(logs / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * 4


def test_sft_stage_writes_weights_the_rl_recipe_loads(tmp_path):
    """configs/diffusion/sft_arithmetic.yaml (masked-diffusion SFT on text_reasoning's reference solutions) runs 2
    steps and its model.safetensors is the RL recipes' policy: TinyDiffusionLM with the recipe's arguments loads it."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    small = ["--model.init_args.policy.init_args.source.init_args.hidden_size", "32",
             "--model.init_args.policy.init_args.source.init_args.num_layers", "1",
             "--model.init_args.policy.init_args.source.init_args.num_heads", "2", "--data.init_args.train_size", "64",
             "--data.init_args.val_size", "4", "--data.init_args.batch_size", "4", "--trainer.max_steps", "2",
             "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cli("configs/diffusion/sft_arithmetic.yaml", *small), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = recipe("sft_arithmetic")["model"]["init_args"]
    weights = tmp_path / sft["output_dir"] / "model.safetensors"
    source = sft["policy"]["init_args"]["source"]["init_args"]
    assert source["alphabet"] == ARITHMETIC_ALPHABET
    for k in ("gen_length", "block_length", "steps"):
        assert sft["policy"]["init_args"][k] == recipe("igpo_arithmetic")["model"]["init_args"][k] == recipe("d1_arithmetic")["model"]["init_args"][k]
    model, _ = TinyDiffusionLM(alphabet=ARITHMETIC_ALPHABET, hidden_size=32, num_layers=1, num_heads=2,
                               checkpoint=str(weights)).load()
    saved = load_file(str(weights))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, saved[k]) for k, v in TinyDiffusionLM(alphabet=ARITHMETIC_ALPHABET, hidden_size=32,
                                                                         num_layers=1, num_heads=2).load()[0].state_dict().items())
