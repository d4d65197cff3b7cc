"""FSDP through Lightning's strategies (issue 15): what runs, what does not, and why, on two CPU processes (gloo).

``--trainer.strategy fsdp`` (Lightning's ``FSDPStrategy``, torch's FSDP1) does not run advantage-lab's loop, on CPU
or on GPU:

1. on CPU Lightning refuses it before anything starts (``accelerator_connector.py``: "The strategy `fsdp` requires a
   GPU accelerator"), and torch's FSDP1 refuses a CPU-only host when Lightning gives it no ``device_id``;
2. past both (``fsdp_support.CPUFSDP``, the GPU path reached on CPU), Lightning runs ``training_step`` inside the
   wrapped module's ``forward`` and the loop's manual backward there fails in torch's FSDP post-backward hook, as
   the plain-torch check below shows. That is device-independent, so advlab refuses the strategy in one line before
   any process starts (``common.distributed.check_strategy``), on GPUs too.

The same torch FSDP1, used the ordinary way (backward after forward), takes exactly the one-process step of the
global batch: the strategy's placement of ``training_step``, not FSDP's arithmetic, is what blocks it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from resume import ROOT, TINY
from startup import advlab_failure

RECIPE = str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml")
SUPPORT = ROOT / "tests/support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "OMP_NUM_THREADS": "1", **extra}

LIGHTNING_REFUSAL = ("The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`")
OUR_REFUSAL = "--trainer.strategy fsdp: Lightning's FSDPStrategy (FSDP1) runs training_step inside the sharded module's forward"


def short(text: str) -> list[str]:
    """The error's lines: stderr from the first ``advlab`` line on (before it: the seed banner, library warnings)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[next((i for i, ln in enumerate(lines) if ln.startswith("advlab")), 0):]


def refused(args: list[str], tmp_path, monkeypatch, capsys) -> tuple[int, list[str], float]:
    """``advlab fit`` on the tiny recipe with ``args``, in this process (the same AdvlabCLI as the console script):
    its exit code, its error lines and the CPU seconds it took."""
    import time

    from common.cli import main

    monkeypatch.chdir(tmp_path)
    start = time.process_time()
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", RECIPE, *TINY, "--trainer.devices", "2", "--trainer.accelerator", "cpu", *args])
    return done.value.code, short(capsys.readouterr().err), time.process_time() - start


def test_fsdp_on_cpu_fails_fast_in_one_line_naming_the_strategy_and_the_accelerator(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    code, lines, cpu_s = refused(["--trainer.strategy", "fsdp"], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) <= 2, lines
    assert lines[0].startswith("advlab: trainer: ValueError: ") and LIGHTNING_REFUSAL in lines[0], lines
    assert not dist.is_initialized()  # refused before Lightning started a process group (or a second process)
    assert cpu_s < 10, f"took {cpu_s:.1f} s of CPU"


def test_fsdp_past_the_cpu_checks_is_refused_by_advlab_before_launch(tmp_path, monkeypatch, capsys):
    """The GPU path on CPU (the strategy past Lightning's and torch's CPU-only checks): advlab names the strategy
    and the reason in one line, before Lightning starts a process group or the second process."""
    import torch.distributed as dist

    code, lines, cpu_s = refused(["--trainer.strategy", '{"class_path": "fsdp_support.CPUFSDP"}'], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) <= 2, lines
    assert lines[0].startswith("advlab: trainer: ValueError: " + OUR_REFUSAL), lines
    assert not dist.is_initialized()
    assert cpu_s < 10, f"took {cpu_s:.1f} s of CPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Lightning's FSDPStrategy as it runs there)")
def test_fsdp_on_gpus_is_refused_by_advlab_before_launch(tmp_path):
    """On a GPU machine Lightning accepts the strategy; advlab refuses it in one line, before any process starts."""
    proc, beyond_import = advlab_failure("fit", "--config", RECIPE, *TINY, "--trainer.strategy", "fsdp",
                                         "--trainer.devices", str(max(1, torch.cuda.device_count())),
                                         "--trainer.accelerator", "gpu", cwd=tmp_path)
    lines = short(proc.stderr)
    assert proc.returncode == 2 and lines[0].startswith("advlab: trainer: ValueError: " + OUR_REFUSAL), lines
    assert beyond_import < 10


def test_the_python_api_refuses_it_too():
    """A Trainer built in Python (no CLI) gets the same message from the module's setup."""
    import lightning as L

    from common.models import TinyLlama
    from fsdp_support import CPUFSDP
    from text_reasoning.module import TextReasoningModule

    module = TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2))
    trainer = L.Trainer(strategy=CPUFSDP(), accelerator="cpu", devices=1, logger=False)
    module.trainer = trainer
    with pytest.raises(ValueError, match="--trainer.strategy fsdp"):
        module.setup("fit")
    from common.distributed import check_strategy

    check_strategy(CPUFSDP(), automatic_optimization=True)  # automatic optimisation: backward after forward, allowed
    check_strategy(L.pytorch.strategies.DDPStrategy(), automatic_optimization=False)


def test_torch_fsdp1_steps_like_one_process_but_refuses_a_backward_inside_its_forward(tmp_path):
    """Two gloo ranks of torch's FullyShardedDataParallel (device_id=cpu), float64: (i) backward after forward,
    one SGD step on each rank's half of the batch equals one process's step on the whole batch (to 1e-12: sums
    of 8 terms in another order, ~1e-16 relative each, while the step moves weights by > 1e-2); (ii) a backward
    inside the wrapped forward raises torch's post-backward assertion, the exact failure of Lightning's FSDP with
    manual optimisation."""
    from fsdp_support import reference_step, tiny_net

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "fsdp_support.py"), str(tmp_path)],
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port), stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    ref = reference_step()
    init = dict(tiny_net().named_parameters())
    assert max(float((ref[n] - init[n]).abs().max()) for n in ref) > 1e-2
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert set(got["weights"]) == set(ref)
        for n in ref:
            torch.testing.assert_close(got["weights"][n], ref[n], rtol=0, atol=1e-12, msg=f"rank {r} {n}")
        assert "Expects `BACKWARD_PRE` or `BACKWARD_POST` state but got HandleTrainingState.FORWARD" in got["inside"], got["inside"]


# ------------------------------------------------------------------ the multi-GPU recipe cannot rot
MULTIGPU = str(ROOT / "configs/text_reasoning/grpo_gsm8k_multigpu.yaml")
GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
               "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in ((3, 4), (5, 2), (6, 1), (2, 2), (7, 3))]


def test_the_multigpu_recipe_builds(tmp_path, monkeypatch, capsys):
    """configs/text_reasoning/grpo_gsm8k_multigpu.yaml, built on CPU by advlab's own CLI (every class constructed,
    nothing run): the model path pointed at the bundled SmolLM2, the accelerator at cpu with 2 devices (and
    data_parallel_size 2), two tiny GSM8K files in the working directory where the recipe looks for them. It is FSDP2
    (ModelParallelStrategy, pure data parallelism), bf16-mixed, vLLM rollouts in bf16 with TIS, GSM8K verified from
    ``####``; the documented DDP override builds DDP; the placeholder path, left as it is, fails in one line naming
    it."""
    import json

    import lightning as L

    from common.cli import AdvlabCLI, AdvlabParser
    from common.models import bundled_smollm2_path
    from common.rollout.vllm import VLLMBackend

    (tmp_path / "data").mkdir()
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    monkeypatch.chdir(tmp_path)
    args = ["--config", MULTIGPU, "--model.init_args.policy.init_args.name_or_path", str(bundled_smollm2_path()),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.logger", "false",
            "--data.init_args.train_size", "4", "--data.init_args.val_size", "1"]

    def build(*extra: str) -> AdvlabCLI:
        return AdvlabCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         parser_class=AdvlabParser, run=False, args=[*args, *extra])

    cli = build("--trainer.strategy.data_parallel_size", "2")
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    strategy = trainer.strategy
    assert type(strategy).__name__ == "ModelParallelStrategy" and trainer.num_devices == 2
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    assert trainer.precision == "bf16-mixed"
    backend = module.policy.backend
    assert isinstance(backend, VLLMBackend) and backend.dtype == "bfloat16" and backend.kv_cache_gib is None
    assert type(module.loss_fn).__name__ == "RolloutCorrection" and module.policy.sampling.logprobs
    assert module.policy.model.config.model_type == "llama"  # the SmolLM2 the path points at was loaded
    data.setup("fit")
    assert len(data.train_set) == 4 and {s["answer"] for s in data.val_set} <= {"7", "4", "10"}

    assert type(build("--trainer.strategy", "ddp").trainer.strategy).__name__ == "DDPStrategy"  # the DDP override
    from common.cli import main

    with pytest.raises(SystemExit) as done:  # the recipe's data_parallel_size (4) on 2 devices: named in one line
        main(["fit", *args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("advlab")]
    assert done.value.code == 2 and len(lines) == 1 and "data_parallel_size=2" in lines[0], lines
    with pytest.raises(SystemExit) as done:  # the recipe as shipped: the placeholder path is named
        main(["fit", "--config", MULTIGPU])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("advlab")]
    assert done.value.code == 2 and len(lines) == 1, lines
    assert "model.init_args.policy" in lines[0] and "/path/to/Qwen2.5-1.5B-Instruct" in lines[0], lines


# ------------------------------------------------------------------ FSDP2: Lightning's ModelParallelStrategy runs the loop
# The loop runs sharded under Lightning's ModelParallelStrategy (torch's FSDP2, ``fully_shard``): it calls
# training_step directly, and PolicyOptimizationModule.configure_model shards the policy (common/fsdp.py).
FSDP2 = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
FSDP2_SIZES = ["--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]


def test_an_fsdp2_step_equals_one_process_on_the_global_batch(tmp_path):
    """2 gloo ranks, the tiny Llama in float64 sharded by ``shard_policy`` (every parameter a DTensor holding its
    rank's half of the rows), each rank stepping ``Loop.update`` on its half of test_distributed's global batch (ragged masks, an
    empty row): SGD lr 1, token-mean and sequence-mean, and token-mean with the global gradient norm clipped to
    0.05 (the norm is ~1.1, so clipping acts). The gathered weights equal one process's step on the whole batch to
    1e-10 (float64 sums in another order, ~1e-16 relative each; measured <= 6e-17) while the step moves them by
    > 1e-3 (clipped: > 1e-3 too), and the gradient norm the Stepper sees is the global one; normalising each rank by
    its own token count (the control) differs by > 1e-4. LoRA (frozen base weights, trained adapters, in the same
    units) takes the one-process step too. Generation on the sharded policy is the unsharded policy's
    (greedy, and sampled under the same seed), with rank 0 generating 3 tokens and rank 1 6: no collective inside."""
    from ddp_support import make_policy
    from fsdp2_support import CASES, generations, global_batch, lora_policy, one_step

    batch = global_batch()
    torch.save(batch.state_dict(), tmp_path / "batch.pt")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "fsdp2_support.py"), str(tmp_path / "batch.pt"), str(tmp_path)],
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port), stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    plain = make_policy()
    init = {n: p.detach() for n, p in plain.named_parameters()}
    for r in (0, 1):  # sharded: every parameter a DTensor holding this rank's chunk of the rows (dim 0; 15 -> 8 + 7)
        assert ranks[r]["sharded"] == {n: ("DTensor", tuple(p.chunk(2)[r].shape)) for n, p in init.items()}
    for case in CASES:
        ref = one_step(batch, *case)  # one process, the whole batch, no sharding
        moved = max(float((ref[n] - init[n]).abs().max()) for n in init)
        assert moved > 1e-3, (case, moved)
        for r in (0, 1):
            gap = max(float((ranks[r][case][n] - ref[n]).abs().max()) for n in init)
            assert gap <= 1e-10, (case, r, gap)
            torch.testing.assert_close(ranks[r][case]["grad_norm"], ref["grad_norm"], rtol=0, atol=1e-10)
    ref = one_step(batch, "token_mean", 0.0)
    control = max(float((ranks[0]["per_rank"][n] - ref[n]).abs().max()) for n in init)
    assert control > 1e-4, control
    ref = one_step(batch, "token_mean", 0.0, lora=True)  # LoRA: frozen base weights and adapters in the same units
    lora_init = {n: p.detach() for n, p in lora_policy().named_parameters()}
    trained = [n for n, p in lora_policy().named_parameters() if p.requires_grad]
    assert len(trained) == 8 and all(float((ref[n] - lora_init[n]).abs().max()) > 1e-3 for n in trained)  # A and B moved
    for r in (0, 1):
        gap = max(float((ranks[r]["lora"][n] - ref[n]).abs().max()) for n in lora_init)
        assert gap <= 1e-10, ("lora", r, gap)
    for r in (0, 1):
        want = generations(plain, r)
        got = ranks[r]["generations"]
        assert got["greedy"].shape[1] == 3 + 3 * r and torch.equal(got["greedy"], want["greedy"]), (r, got, want)
        assert torch.equal(got["sampled"], want["sampled"]), r


def fsdp2_fit(cwd: Path, record: Path, *args: str) -> subprocess.CompletedProcess:
    """``advlab fit`` under ModelParallelStrategy on 2 CPU ranks, tiny model, 2 prompts x G = 2 a rank, a varied
    reward (so the weights move), a checkpoint every step."""
    import json

    from resume import cli

    cwd.mkdir(exist_ok=True)
    reward = json.dumps([{"class_path": "ddp_support.RecordingReward", "init_args": {"path": str(record)}}])
    cmd = cli("configs/text_reasoning/grpo_arithmetic.yaml", *TINY, *FSDP2, *FSDP2_SIZES,
              "--data.init_args.prompts_per_step", "2", "--model.init_args.group_size", "2",
              "--model.init_args.rewards", reward, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
              "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1", *args)
    return subprocess.run(cmd, cwd=cwd, env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=300)


def sharded_weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The policy's full weights from a sharded checkpoint folder, through ``common.fsdp.consolidate``."""
    from common.fsdp import consolidate

    consolidate(str(ckpt), str(tmp / "one.ckpt"))
    state = torch.load(tmp / "one.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def test_advlab_fit_under_fsdp2_on_two_cpu_ranks_checkpoints_shards_and_resumes_exactly(tmp_path):
    """``advlab fit`` with ``--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy`` (sizes 2 x 1)
    on 2 gloo ranks: 2 steps; the ranks score disjoint prompts; every checkpoint is a folder of 2 shards and
    meta.pt (Lightning's distributed checkpoint: each rank writes its own rows of weights and AdamW state). Resumed
    from step 1's folder, step 2 draws on every rank the completions of the straight run and ends with its weights,
    bit for bit, while step 2 moved them. ``common.fsdp.consolidate`` writes a folder as one checkpoint file that
    loads strictly into an unsharded module."""
    from fsdp2_support import records

    straight = fsdp2_fit(tmp_path / "straight", tmp_path / "straight.jsonl")
    assert straight.returncode == 0, straight.stderr[-3000:]
    seen = records(tmp_path / "straight.jsonl")
    assert [len(seen[r]) for r in (0, 1)] == [2, 2], seen
    for step in range(2):
        assert not set(seen[0][step]["prompts"]) & set(seen[1][step]["prompts"]), step
    ckpts = tmp_path / "straight/runs/lightning_logs/version_0/checkpoints"
    first, last = ckpts / "epoch=0-step=1.ckpt", ckpts / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in first.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed = fsdp2_fit(tmp_path / "resumed", tmp_path / "resumed.jsonl", "--ckpt_path", str(first))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = records(tmp_path / "resumed.jsonl")
    for r in (0, 1):
        assert again[r] == seen[r][1:], (r, again[r], seen[r][1:])
    one, two = sharded_weights(first, tmp_path), sharded_weights(last, tmp_path)
    back = sharded_weights(tmp_path / "resumed/runs/lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt", tmp_path)
    assert max(float((two[k] - one[k]).abs().max()) for k in two) > 1e-4  # step 2 moved the weights
    assert two.keys() == back.keys() and all(torch.equal(two[k], back[k]) for k in two)
    # consolidated to one file (common.fsdp.consolidate), the checkpoint loads strictly into an unsharded module
    from common.models import TinyLlama
    from text_reasoning.module import TextReasoningModule

    full = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert full["global_step"] == 2 and len(full["advlab_rng_ranks"]) == 2
    TextReasoningModule(policy=TinyLlama()).load_state_dict(full["state_dict"], strict=True)
    from common.fsdp import consolidate

    with pytest.raises(ValueError, match="folder: .* is not a sharded Lightning checkpoint"):
        consolidate(str(tmp_path), str(tmp_path / "x.ckpt"))


def test_fsdp2_with_its_default_sizes_is_refused_in_one_line_before_launch(tmp_path, monkeypatch, capsys):
    """``ModelParallelStrategy``'s defaults put a node's devices in a tensor-parallel group that advlab does not
    shard; the strategy without sizes fails in one line naming both sizes and the values to give. (The bare
    ``--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy``, with no init argument, is read as a
    strategy name and Lightning refuses that name; a class path with its sizes is what the README gives.)"""
    import torch.distributed as dist

    strategy = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'
    code, lines, cpu_s = refused(["--trainer.strategy", strategy], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) <= 2, lines
    assert lines[0].startswith("advlab: trainer: ValueError: --trainer.strategy ModelParallelStrategy: expected "
                               "data_parallel_size=2 (devices x nodes) and tensor_parallel_size=1"), lines
    assert "got data_parallel_size=1, tensor_parallel_size=2" in lines[0], lines
    assert not dist.is_initialized()  # refused before Lightning started a process group (or a second process)
    assert cpu_s < 10, f"took {cpu_s:.1f} s of CPU"


def test_fsdp2_refuses_trainable_parameters_outside_the_policy():
    """A method with its own trainable network (a critic) would be neither sharded nor averaged over the ranks under
    ModelParallelStrategy: refused in one line naming the parameter, by the CLI before launch and by
    ``configure_model``; without a device mesh (any other strategy) ``configure_model`` does nothing."""
    from torch import nn

    from common.methods.base import Method
    from common.models import TinyLlama
    from text_reasoning.module import TextReasoningModule

    class Critic(Method):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 1)

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from common.fsdp import check_module

    module = TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2), methods=[Critic()])
    message = (r"^--trainer.strategy ModelParallelStrategy: 2 trainable parameter\(s\) outside the policy "
               r"\(methods.0.head.weight, \.\.\.: a method's own network\)")
    with pytest.raises(ValueError, match=message):  # what the CLI calls before launch (common/cli.py)
        check_module(module, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_module(module, DDPStrategy())  # DDP averages every parameter's gradient
    module.configure_model()  # no mesh: nothing sharded
    assert not any(type(p).__name__ == "DTensor" for p in module.parameters())
    module._device_mesh = object()  # a module built in Python: refused in configure_model, before the mesh is used
    with pytest.raises(ValueError, match=message):
        module.configure_model()
