"""Data-parallel helpers over ``torch.distributed`` (the process group Lightning's DDP strategy starts): a sum over
ranks that is the identity on one process, and the rank / world size of this process.

Lightning's ``DDPStrategy.reduce(t, reduce_op="sum")`` is ``torch.distributed.all_reduce`` on the default (WORLD)
group; these are the same calls without a Trainer, so the loop (common/loop.py) and the estimators stay free of
Lightning and plain scripts under ``torchrun`` use them as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialised() -> bool:
    """True inside a started process group (DDP, torchrun, ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if initialised() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if initialised() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (any shape; a new tensor, ``t`` is not changed); ``t`` itself on one process.

    Every rank must call it, in the same order and with the same shape (a collective). With the NCCL backend ``t``
    must be on the rank's GPU; with gloo on the CPU. Not differentiable: it reduces counts and statistics.
    """
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process. A collective."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` (N_r, ...) concatenated in rank order, (Σ_r N_r, ...) on ``t``'s device; ``t`` on
    one process. The ranks may hold different numbers of rows (the trailing shape and dtype must agree). A
    collective; it goes through the CPU (``all_gather_object``): for per-step state updates of a few rows (a
    curriculum's or a tracker's observations), not for activations."""
    if world_size() == 1:
        return t
    return torch.cat([part.to(t.device) for part in all_gather_objects(t.detach().cpu())])
