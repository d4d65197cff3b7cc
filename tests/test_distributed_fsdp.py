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


def test_fsdp_on_cpu_fails_fast_in_one_line_naming_the_strategy_and_the_accelerator(tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", RECIPE, *TINY, "--trainer.strategy", "fsdp",
                                         "--trainer.devices", "2", "--trainer.accelerator", "cpu", cwd=tmp_path)
    lines = short(proc.stderr)
    assert proc.returncode == 2 and len(lines) <= 2, proc.stderr[-3000:]
    assert lines[0].startswith("advlab: trainer: ValueError: ") and LIGHTNING_REFUSAL in lines[0], lines
    assert "Initializing distributed" not in proc.stderr  # refused before Lightning launched the second process
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"


def test_fsdp_past_the_cpu_checks_is_refused_by_advlab_before_launch(tmp_path):
    """The GPU path on CPU (the strategy past Lightning's and torch's CPU-only checks): advlab names the strategy
    and the reason in one line, before Lightning starts the second process."""
    strategy = '{"class_path": "fsdp_support.CPUFSDP"}'
    proc, beyond_import = advlab_failure("fit", "--config", RECIPE, *TINY, "--trainer.strategy", strategy,
                                         "--trainer.devices", "2", "--trainer.accelerator", "cpu", cwd=tmp_path,
                                         env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    lines = short(proc.stderr)
    assert proc.returncode == 2 and len(lines) <= 2, proc.stderr[-3000:]
    assert lines[0].startswith("advlab: trainer: ValueError: " + OUR_REFUSAL), lines
    assert "Initializing distributed" not in proc.stderr
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
    nothing run): the model path pointed at the bundled SmolLM2, the accelerator at cpu, two tiny GSM8K files in
    the working directory where the recipe looks for them. It is DDP on 2 devices, bf16-mixed, vLLM rollouts in
    bf16 with TIS, GSM8K verified from ``####``; the placeholder path, left as it is, fails in one line naming it."""
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
    cli = AdvlabCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    parser_class=AdvlabParser, run=False, args=args)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
    assert trainer.precision == "bf16-mixed"
    backend = module.policy.backend
    assert isinstance(backend, VLLMBackend) and backend.dtype == "bfloat16" and backend.kv_cache_gib is None
    assert type(module.loss_fn).__name__ == "RolloutCorrection" and module.policy.sampling.logprobs
    assert module.policy.model.config.model_type == "llama"  # the SmolLM2 the path points at was loaded
    data.setup("fit")
    assert len(data.train_set) == 4 and {s["answer"] for s in data.val_set} <= {"7", "4", "10"}

    from common.cli import main

    with pytest.raises(SystemExit) as done:  # the recipe as shipped: the placeholder path is named
        main(["fit", "--config", MULTIGPU])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("advlab")]
    assert done.value.code == 2 and len(lines) == 1, lines
    assert "model.init_args.policy" in lines[0] and "/path/to/Qwen2.5-1.5B-Instruct" in lines[0], lines
