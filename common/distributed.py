"""Data-parallel helpers over ``torch.distributed`` (the process group Lightning's DDP strategy starts): a sum over
ranks and gathers of every rank's rows, all the identity on one process, and the rank / world size of this process.

Lightning's ``DDPStrategy.reduce(t, reduce_op="sum")`` is ``torch.distributed.all_reduce`` on the default (WORLD)
group; these are the same calls without a Trainer, so the loop (common/loop.py) and the estimators stay free of
Lightning and plain scripts under ``torchrun`` use them as they are.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Gathered(NamedTuple):
    """Every rank's rows, concatenated in rank order, and where this rank's own rows start in them."""

    values: Tensor  # (Σ_r n_r, ...) rank 0's n_0 rows, then rank 1's, ...
    start: int  # this rank's rows are values[start : start + n_rank]


def all_gather_rows(t: Tensor) -> Gathered:
    """Every rank's ``t`` (n_r, ...) concatenated along dim 0 in rank order, with this rank's offset in it;
    ``Gathered(t, 0)`` on one process (no copy, no host sync).

    The ranks may hold different numbers of rows n_r (the trailing dimensions must agree): the sizes are gathered
    first (one host sync), every rank's rows are padded to the largest n_r, gathered, and the padding is dropped.
    Unlike :func:`all_gather_cat` it stays on ``t``'s device (NCCL or gloo tensors, no pickling), for per-token
    statistics. A collective: every rank must call it, in the same order. Not differentiable (values are
    detached): it gathers statistics' inputs, so that a quantile, a whitening or a top-k selection over the
    concatenation is exactly the one a single process computes on the global batch (rows of rank r follow those of
    ranks < r, as in a batch that is the ranks' rows concatenated in rank order). Bool tensors travel as uint8.
    """
    if world_size() == 1:
        return Gathered(t, 0)
    world, me = world_size(), rank()
    x = t.detach().contiguous()
    x = x.to(torch.uint8) if x.dtype == torch.bool else x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)  # (1,)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = torch.cat(sizes).tolist()  # ok: one host sync, the padded size
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # (max n_r, ...)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    values = torch.cat([o[:c] for o, c in zip(out, counts)])  # (Σ n_r, ...)
    return Gathered(values.to(torch.bool) if t.dtype == torch.bool else values, sum(counts[:me]))


def check_strategy(strategy: object, automatic_optimization: bool) -> None:
    """Refuse, in one line, a Lightning strategy the manual-optimisation loop cannot run under (raises ValueError).

    Lightning's ``FSDPStrategy`` (``--trainer.strategy fsdp``, torch's FSDP1 ``FullyShardedDataParallel``) wraps
    the whole LightningModule and runs ``training_step`` inside the wrapper's ``forward``
    (``lightning/pytorch/strategies/strategy.py``, ``Strategy.training_step`` -> ``_forward_redirection``). The
    loop's ``manual_backward`` then runs while the root FSDP unit is still in its forward, and torch's post-backward
    hook refuses it: ``AssertionError: Expects `BACKWARD_PRE` or `BACKWARD_POST` state but got
    HandleTrainingState.FORWARD`` (``torch/distributed/fsdp/_runtime_utils.py``, ``_post_backward_hook``; torch 2.13,
    Lightning 2.6; tests/test_distributed_fsdp.py shows it on two gloo processes). This holds on GPUs as on CPUs, so
    it is refused before any process starts instead of failing at the first backward. A module with automatic
    optimisation (backward after ``forward`` returns) is left alone.

    FSDP runs through Lightning's ``ModelParallelStrategy`` instead (torch's FSDP2; it calls ``training_step``
    directly and the module shards itself in ``configure_model``, common/fsdp.py), as pure data parallelism: its
    sizes are checked here too (``common.fsdp.check_sizes``).
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy) and not automatic_optimization:
        raise ValueError(
            "--trainer.strategy fsdp: Lightning's FSDPStrategy (FSDP1) runs training_step inside the sharded module's "
            "forward and this loop's manual backward there fails in torch's FSDP post-backward hook; use FSDP2: "
            "--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy --trainer.strategy.data_parallel_size "
            "<devices x nodes> --trainer.strategy.tensor_parallel_size 1 (or ddp; README: 'More than one device')")
    if isinstance(strategy, ModelParallelStrategy) and not automatic_optimization:
        from common.fsdp import check_sizes

        check_sizes(strategy)
