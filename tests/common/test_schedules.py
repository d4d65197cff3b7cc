"""Learning-rate schedules (common/schedules.py): the factor equals transformers' schedules (an independent
implementation), the module's scheduler is stepped once per optimiser step (not on a skipped one), logged as
train/lr, checkpointed and resumed; LightningCLI's --lr_scheduler (never stepped by a manual-optimisation module)
is refused in one line."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from common.loop import Stepper
from common.policies.toy import CategoricalPolicy
from common.schedules import lr_scheduler, schedule_factor
from common.toy_tasks import Bandit, ToyModule
from startup import ROOT, advlab_failure


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_factor_equals_transformers_schedules(schedule, warmup):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total = 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = {"constant": lambda: get_constant_schedule_with_warmup(opt, warmup),
           "linear": lambda: get_linear_schedule_with_warmup(opt, warmup, total),
           "cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, total)}[schedule]()
    for step in range(total + 3):  # past total_steps the decaying schedules stay at 0
        assert schedule_factor(step, schedule, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()


def test_hand_values():
    # W = 2, S = 6: warm-up 0, 1/2; cosine over 4 steps: 1, (1 + cos(π/4))/2, 1/2, (1 - cos(π/4))/2, then 0
    got = [schedule_factor(s, "cosine", 2, 6) for s in range(7)]
    c = math.cos(math.pi / 4)
    assert got == pytest.approx([0, 0.5, 1, (1 + c) / 2, 0.5, (1 - c) / 2, 0], abs=1e-12)
    assert [schedule_factor(s, "linear", 0, 4) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def toy(**kwargs) -> ToyModule:
    return ToyModule(CategoricalPolicy(context_dim=4, num_actions=4), Bandit(4, 4), group_size=2, **kwargs)


@pytest.mark.parametrize(("kwargs", "argument"), [({"lr_schedule": "step"}, "lr_schedule"),
                                                   ({"warmup_steps": -1}, "warmup_steps"),
                                                   ({"total_steps": 0}, "total_steps"),
                                                   ({"warmup_steps": 5, "total_steps": 3}, "total_steps")])
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        toy(**kwargs)


def test_a_decaying_schedule_needs_a_total():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert lr_scheduler(opt, "constant", 0, None) is None  # nothing to step: checkpoints unchanged
    with pytest.raises(ValueError, match="total_steps"):
        lr_scheduler(opt, "cosine", 0, -1)  # Lightning's unset max_steps


def test_stepped_per_optimiser_step_and_not_on_a_skipped_one():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = lr_scheduler(opt, "linear", 0, 4)
    stepper = Stepper(opt, [w], max_consecutive_skips=5, scheduler=sched)
    stepper.backward(w.sum())
    stepper.step(w.sum().detach())
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.075)
    stepper.backward(w.sum() * float("nan"))
    stepper.step(torch.tensor(float("nan")))  # skipped: no optimiser step, the schedule does not advance
    assert sched.last_epoch == 1 and int(stepper.skipped) == 1
    stepper.empty_step()  # nothing selected: counts as a step
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.05)


def fit(tmp_path, max_steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/toy/bandit_grpo.yaml"),
           "--model.init_args.lr_schedule", "cosine", "--model.init_args.warmup_steps", "2",
           "--model.init_args.total_steps", "6", "--trainer.max_steps", str(max_steps),
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
           "--checkpoint.dirpath", str(tmp_path / "ckpt"), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_lrs(path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}


def test_logged_checkpointed_and_resumed_from_advlab(tmp_path):
    """Cosine with W = 2, S = 6, lr 0.01, 4 steps, then resumed to 6: train/lr of step s is lr·f(s) (the rate its
    optimiser step used), the checkpoint holds the scheduler at 4 steps, and the resumed run continues at f(4)."""
    lr = 1e-2  # bandit_grpo.yaml
    fit(tmp_path, 4)
    first = logged_lrs(tmp_path / "lightning_logs/version_0/metrics.csv")
    state = torch.load(tmp_path / "ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert state["lr_schedulers"][0]["last_epoch"] == 4
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lr * schedule_factor(4, "cosine", 2, 6))
    fit(tmp_path, 6, "--ckpt_path", str(tmp_path / "ckpt/last.ckpt"))
    second = logged_lrs(tmp_path / "lightning_logs/version_1/metrics.csv")
    # Lightning logs a step's metrics at global_step - 1 ... check the values in order instead of by key
    got = [first[k] for k in sorted(first)] + [second[k] for k in sorted(second)]
    assert got == pytest.approx([lr * schedule_factor(s, "cosine", 2, 6) for s in range(6)], abs=1e-9)


@pytest.mark.parametrize("flag", [["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "2"],
                                  ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"]], ids=lambda f: f[0])
def test_lr_scheduler_or_optimizer_on_the_command_line_is_refused_in_one_line(flag, tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", str(ROOT / "configs/toy/bandit_grpo.yaml"), *flag,
                                         "--trainer.logger", "false", cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"advlab: {flag[0]} is not used by ToyModule") and "lr_schedule" in last
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"
