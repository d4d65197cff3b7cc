"""Support for tests/test_distributed.py: a reward function that records what each rank scores, and one rank of
the DDP update-equivalence check (run as a script with torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.rewards.base import RewardFunction

G = 3  # samples per prompt in the equivalence batch
CASES = (("token_mean", "group"), ("seq_mean_token_mean", "group"), ("token_mean", "batch"))  # (aggregation, GRPO scale)


class RecordingReward(RewardFunction):
    """Appends one JSON line per call, ``{"rank", "prompts", "completions"}``, to ``path`` and scores each completion
    by :func:`score` (varied, so the weights move). The rank is torch.distributed's (0 without a process group)."""

    name = "recording"

    def __init__(self, path: str):
        self.path = path

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": rank, "prompts": [s["prompt"] for s in samples], "completions": list(completions)}) + "\n")
        return torch.tensor([score(c) for c in completions], dtype=torch.float32)


def score(completion: str) -> float:
    """A deterministic reward in [0, 1] that varies from completion to completion: (Σ code points mod 11) / 10."""
    return (sum(map(ord, completion)) % 11) / 10


def make_policy():
    from common.models import TinyLlama
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling
    from helpers import DIGITS

    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=6)).double()


def one_step(batch, aggregation: str, scale: str, *, all_reduce=None, ddp: bool = False) -> dict[str, torch.Tensor]:
    """One SGD step (lr 1, no clipping: a wrong gradient scale shows in the weights) of ``Loop.update`` on
    ``batch`` (rewards set), two micro-batches per rank; advantages from GRPO(scale) through the Loop's estimator.
    ``ddp``: the policy's gradients are averaged over ranks as Lightning's DDP strategy does in manual
    optimisation (``prepare_for_backward`` before every ``backward``). Returns the advantages and the final weights."""
    from torch.nn.parallel import DistributedDataParallel

    from common.advantages.group import GRPO
    from common.loop import Loop, Stepper
    from common.losses.ppo_clip import ClippedPolicyLoss

    policy = make_policy()
    loop = Loop(policy, lambda b: b, GRPO(scale=scale), ClippedPolicyLoss(aggregation=aggregation), group_size=G,
                micro_batch_size=max(1, batch.batch_size // 2), all_reduce=all_reduce)
    batch = batch.replace(advantages=loop.advantage(batch))
    backward = None
    if ddp:
        from lightning.pytorch.overrides.distributed import prepare_for_backward

        wrapped = DistributedDataParallel(policy)

        def backward(loss):
            prepare_for_backward(wrapped, loss)
            loss.backward()

    params = policy.trainable_parameters()
    loop.update(batch, Stepper(torch.optim.SGD(params, lr=1.0), params, max_grad_norm=0.0, backward=backward))
    return {"advantages": batch.advantages, **{n: p.detach().clone() for n, p in policy.named_parameters()}}


def main(batch_file: str, out_dir: str) -> None:
    from common.batch import RolloutBatch
    from common.distributed import all_reduce_sum

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = RolloutBatch.from_state(torch.load(batch_file, weights_only=False))
    rows = batch.batch_size // world  # whole groups per rank: rows are grouped by prompt, G divides rows
    local = batch.select(torch.arange(rank * rows, (rank + 1) * rows))
    out = {case: one_step(local, *case, all_reduce=all_reduce_sum, ddp=True) for case in CASES}
    # the controls: each rank normalises by its own counts (what DDP did before the global normaliser)
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        out["per_rank", aggregation] = one_step(local, aggregation, "group", all_reduce=None, ddp=True)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
