"""``advlab`` configuration errors: one or two lines naming the key and what was expected (nearest valid name
suggested), negative numbers parse as values, and a run that fails before training leaves no ``version_N`` folder.

Most cases run the real parser in this process (``common.cli.main(args)``: the same AdvlabCLI, jsonargparse and
recipe files as the console script, a fraction of a second each once imported); the ones that depend on the process
(stderr of the console entry, exit status, the run folder on disk) run ``python -m common.cli`` in a subprocess."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from startup import ROOT, advlab_failure

RECIPE = str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml")
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
        "--data.init_args.val_size", "8", "--data.init_args.train_size", "64"]


def short(text: str) -> list[str]:
    """The error's lines: stderr from the first ``advlab`` line on (before it: Lightning's seed banner and library
    warnings, which the messages do not control)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if ln.startswith("advlab")), 0)
    return lines[first:]


def run_inprocess(args: list[str], capsys) -> tuple[int, list[str], str, float]:
    from common.cli import main

    start = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        main(args)
    elapsed = time.perf_counter() - start
    out = capsys.readouterr()
    return done.value.code, short(out.err), out.out, elapsed


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_recipes")
    text = Path(RECIPE).read_text()
    (d / "misspelled_nested.yaml").write_text(text.replace("eps_low: 0.2", "eps_lo: 0.2"))
    (d / "misspelled_top.yaml").write_text(text.replace("\ntrainer:", "\ntrainerr:"))
    (d / "not_yaml.yaml").write_text("model: [1\n")
    return d


# (extra args after `fit --config RECIPE`, substrings the message must hold)
PARSE_CASES = {
    "unknown init arg": (["--model.init_args.lrr", "1e-5"], ["model.init_args.lrr", "did you mean lr?"]),
    "nested unknown": (["--model.init_args.loss.init_args.eps_lo", "0.5"],
                       ["model.init_args.loss.init_args.eps_lo", "ClippedPolicyLoss", "did you mean eps_low?"]),
    "dataclass field": (["--model.init_args.sampling.max_new_tokenz", "3"], ["max_new_tokenz", "did you mean max_new_tokens?"]),
    "wrong type": (["--model.init_args.lr", "abc"], ["model.init_args.lr", "expected float", "abc"]),
    "int given a float": (["--model.init_args.group_size", "2.5"], ["model.init_args.group_size", "expected int"]),
    "union of types": (["--seed_everything", "abc"], ["seed_everything", "expected bool or int"]),
    "literal choice": (["--model.init_args.lr_schedule", "cosin"], ["model.init_args.lr_schedule", "did you mean 'cosine'?"]),
    "unknown flag": (["--trainer.max_stepz", "3"], ["--trainer.max_stepz", "did you mean --trainer.max_steps?"]),
    "unknown top flag": (["--evaluatee", "true"], ["--evaluatee", "did you mean --evaluate?"]),
    "missing value": (["--model.init_args.lr"], ["--model.init_args.lr expects a value"]),
    "misspelled class": (["--model.init_args.loss", "common.losses.ppo_clip.ClippedPolicyLos"],
                         ["model.init_args.loss", "did you mean common.losses.ppo_clip.ClippedPolicyLoss?"]),
    "misspelled module": (["--model.init_args.loss", "common.losses.ppo_clp.ClippedPolicyLoss"],
                          ["model.init_args.loss", "did you mean common.losses.ppo_clip.ClippedPolicyLoss?"]),
    "class in a list": (["--data.init_args.tasks", '[{"class_path": "text_reasoning.data.Arithmetc"}]'],
                        ["data.init_args.tasks", "did you mean text_reasoning.data.Arithmetic?"]),
    "missing checkpoint": (["--ckpt_path", "no/such.ckpt", "--trainer.max_steps", "0"], ["ckpt_path", "no/such.ckpt"]),
    "required init arg": (["--model.init_args.policy", "common.models.Pretrained"], ["model.init_args.policy", "name_or_path"]),
}

CHECKED_AFTER_PARSING = {"missing checkpoint", "required init arg"}  # --print_config exits before these checks


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_a_bad_argument_is_one_or_two_lines_naming_it(case, capsys):
    extra, expected = PARSE_CASES[case]
    show = [] if case in CHECKED_AFTER_PARSING else ["--print_config"]
    code, lines, _, elapsed = run_inprocess(["fit", "--config", RECIPE, *extra, *show], capsys)
    assert code == 2 and 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("advlab: ")
    for s in expected:
        assert s in "\n".join(lines), (s, lines)
    assert elapsed < 10, elapsed


@pytest.mark.parametrize("name, expected", [
    ("misspelled_top.yaml", ["trainerr", "did you mean trainer?"]),
    ("not_yaml.yaml", ["not_yaml.yaml", "not valid YAML", "line"]),
    ("no_such_file.yaml", ["--config", "no_such_file.yaml", "does not exist"]),
])
def test_a_bad_recipe_file_is_named(name, expected, bad_files, capsys):
    code, lines, _, elapsed = run_inprocess(["fit", "--config", str(bad_files / name), "--print_config"], capsys)
    assert code == 2 and 1 <= len(lines) <= 2, lines
    for s in expected:
        assert s in "\n".join(lines), (s, lines)
    assert elapsed < 10


def test_a_misspelled_subcommand_suggests_the_nearest(capsys):
    code, lines, _, elapsed = run_inprocess(["fitt", "--config", RECIPE], capsys)
    assert code == 2 and lines == ["advlab: no subcommand 'fitt'; did you mean fit?",
                                   "  subcommands: fit, validate, predict, list, export"], lines
    assert elapsed < 10


@pytest.mark.parametrize("value, parsed", [("-1e-3", "-0.001"), ("-0.5", "-0.5"), ("-.25", "-0.25"), ("-2.", "-2.0"),
                                           ("-1.5E+1", "-15.0")])
def test_negative_numbers_parse_as_values(value, parsed, capsys):
    """argparse alone takes ``-0.5`` but reads ``-1e-3`` as an option ("--model: expected one argument")."""
    code, _, out, _ = run_inprocess(["fit", "--config", RECIPE, "--model.init_args.loss.init_args.beta", value,
                                     "--print_config"], capsys)
    assert code in (0, None)
    assert f"beta: {parsed}\n" in out, out[-2000:]


def test_a_constructor_refusing_its_argument_is_named_in_two_lines(tmp_path):
    """A real process: Sampling's own check (max_new_tokens > 0), raised while jsonargparse builds the recipe, comes
    out as the recipe key, the class and the constructor's message, not a 100-line chained traceback."""
    proc, beyond_import = advlab_failure("fit", "--config", RECIPE, *TINY, "--model.init_args.sampling.max_new_tokens", "-3",
                                         cwd=tmp_path)
    lines = short(proc.stderr)
    assert proc.returncode == 2 and len(lines) <= 2, proc.stderr[-3000:]
    assert lines[0].startswith("advlab: model.init_args.sampling (common.rollout.base.Sampling): ValueError: ")
    assert "max_new_tokens" in lines[0] and "-3" in lines[0]
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"
    assert not (tmp_path / "runs").exists()


def test_a_misspelled_key_in_a_recipe_file_from_the_console(bad_files, tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", str(bad_files / "misspelled_nested.yaml"), cwd=tmp_path)
    lines = short(proc.stderr)
    assert proc.returncode == 2 and len(lines) <= 2, proc.stderr[-3000:]
    assert lines[0] == ("advlab: model.init_args.loss.init_args.eps_lo: not a parameter of "
                        "common.losses.ppo_clip.ClippedPolicyLoss; did you mean eps_low?")
    assert lines[1].startswith("  accepted: eps_low, eps_high")
    assert "usage:" not in proc.stderr
    assert beyond_import < 10


FAILING_DATA = textwrap.dedent('''
    from text_reasoning.data import ReasoningData

    class FailingData(ReasoningData):
        """Fails in setup, after the Trainer made its logger and saved the config: a run that fails before training."""

        def setup(self, stage=None):
            raise RuntimeError("failing_data: setup refuses")
''')


def test_a_run_that_fails_before_training_leaves_no_version_folder(tmp_path):
    (tmp_path / "failing_data.py").write_text(FAILING_DATA)
    earlier = tmp_path / "runs/lightning_logs/version_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("an earlier run\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc, _ = advlab_failure("fit", "--config", RECIPE, *TINY, "--trainer.max_steps", "1",
                             "--data", "failing_data.FailingData", cwd=tmp_path, env=env)
    assert "failing_data: setup refuses" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs/lightning_logs").iterdir()) == ["version_0"]
    assert (earlier / "config.yaml").read_text() == "an earlier run\n"


def test_the_callback_keeps_a_run_that_trained(tmp_path):
    """The removal is for failures at step 0 only: a folder with a checkpoint or after an optimiser step stays."""
    from types import SimpleNamespace

    from common.cli_errors import DropEmptyRunDir

    kept, empty = tmp_path / "kept/version_0", tmp_path / "empty/version_0"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "checkpoints/last.ckpt").write_bytes(b"x")
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text("x")

    def trainer(log_dir, step=0):
        logger = SimpleNamespace(log_dir=str(log_dir), finalize=lambda status: None)
        return SimpleNamespace(global_step=step, is_global_zero=True, loggers=[logger])

    DropEmptyRunDir().on_exception(trainer(kept), None, RuntimeError())
    DropEmptyRunDir().on_exception(trainer(empty, step=3), None, RuntimeError())
    assert kept.exists() and empty.exists()
    DropEmptyRunDir().on_exception(trainer(empty), None, RuntimeError())
    assert not empty.exists() and not (tmp_path / "empty").exists()


def test_sample_completions_are_in_tensorboard_from_the_first_step(tmp_path):
    """``log_samples_every: 10``: samples at the run's first step (global_step is already 1 when it logs), then at
    multiples of 10 - not first at step 10."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    from common.models import TinyLlama
    from common.rewards.math import NumericAnswerReward
    from common.rollout.base import Sampling
    from helpers import DIGITS, digit_prompts
    from text_reasoning.module import TextReasoningModule

    module = TextReasoningModule(policy=TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=DIGITS),
                                 rewards=[NumericAnswerReward()], sampling=Sampling(max_new_tokens=4), group_size=2,
                                 log_samples_every=10)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="", version=0),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(digit_prompts(4), batch_size=2, collate_fn=list))
    acc = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    steps = [e.step for e in acc.Tensors("samples/text_summary")]
    assert steps == [1], steps  # step 2 is no multiple of 10
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.count("**reward ") == 2 and "→" in text, text
