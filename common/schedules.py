"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay, stepped once per optimiser step.

The factor multiplying the module's ``lr`` at optimiser step s (0-based), with W = ``warmup_steps`` and
S = ``total_steps``; the same as transformers' ``get_{constant,linear,cosine}_schedule_with_warmup`` (the
schedules TRL and verl use), so lr is 0 at the first step of a warm-up:

    s < W:       s / W
    constant:    1
    linear:      max(0, (S - s) / (S - W))
    cosine:      max(0, ½ (1 + cos(π (s - W) / (S - W))))        (one half-cycle: 1 at s = W, 0 at s = S)

The module (``common.module.PolicyOptimizationModule``: ``lr_schedule``, ``warmup_steps``, ``total_steps``)
returns the scheduler from ``configure_optimizers``, so it is in the Lightning checkpoint; the loop's ``Stepper``
steps it after every optimiser step that is taken (a skipped non-finite step does not advance it).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(step: int, schedule: Schedule, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the base learning rate at optimiser step ``step`` (module docstring)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedule_problems(schedule: str, warmup_steps: int, total_steps: int | None) -> list[str]:
    """What is wrong with the arguments (one line each, naming the argument); empty when they are fine."""
    problems = []
    if schedule not in SCHEDULES:
        problems.append(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < max(1, warmup_steps):
        problems.append(f"total_steps must be >= max(1, warmup_steps={warmup_steps}), got {total_steps}")
    return problems


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int,
                 total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A ``LambdaLR`` over every parameter group, or None for a constant rate without warm-up (nothing to step).
    ``total_steps`` None (or < 1, Lightning's unset ``max_steps``) is an error for a decaying schedule."""
    if schedule == "constant" and warmup_steps == 0:
        return None
    if schedule != "constant" and (total_steps is None or total_steps < 1):
        raise ValueError(f"lr_schedule {schedule!r} decays to 0 at total_steps: set total_steps (or trainer.max_steps), "
                         f"got {total_steps}")
    factor = partial(schedule_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps or 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
