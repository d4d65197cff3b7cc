"""Support for tests/test_distributed_fsdp.py's FSDP2 part: one rank of the FSDP2 update-equivalence check (run as a
script with torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the one-process reference.

The policy is ``ddp_support.make_policy`` (the tiny Llama in float64) sharded by ``common.distributed.shard_policy``
over a 1-D gloo mesh of the 2 ranks, as ``PolicyOptimizationModule.configure_model`` shards it under Lightning's
``ModelParallelStrategy``. Each rank steps ``Loop.update`` on its half of the global batch (whole groups), with the
Loop's global normaliser (``all_reduce_sum``); FSDP2 reduce-scatters and averages the gradients. The final weights are
gathered to full tensors (``DTensor.full_tensor``) and written with the rank's generations (``rank<r>.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_support import G, make_policy

# (aggregation, max_grad_norm): token-mean and sequence-mean without clipping, and token-mean with the global norm clipped
CASES = (("token_mean", 0.0), ("seq_mean_token_mean", 0.0), ("token_mean", 0.05))


def global_batch():
    """tests/test_distributed.py's global batch (test modules are not importable under --import-mode=importlib):
    4 prompts x G = 3 rows sampled by the tiny policy, rewards set per row, ragged masks with many more tokens on
    rank 0's rows (0-5) than on rank 1's (6-11), one of them empty (row 9)."""
    from helpers import digit_prompts

    torch.manual_seed(0)
    batch = make_policy().rollout(digit_prompts(4), G)
    B, T = batch.completion_mask.shape
    lengths = torch.tensor([6, 5, 6, 4, 6, 5, 1, 2, 1, 0, 2, 1]).clamp(max=T)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0, 0.0, 1.0, 1.0, 0.0, 3.0, 0.2, 0.4, 0.0], dtype=torch.float64)
    return batch.replace(completion_mask=mask, rewards=rewards, reward_components=rewards[:, None], reward_names=("r",))


def records(path: Path) -> dict[int, list[dict]]:
    """Each rank's ``ddp_support.RecordingReward`` calls (one per training step), in order."""
    import json

    out: dict[int, list[dict]] = {0: [], 1: []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["rank"]].append(row)
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to the full tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_policy():
    """``make_policy`` with LoRA adapters (rank 4 on the attention projections; peft) whose B matrices are drawn
    non-zero, so that A gets a gradient too; the base weights frozen (mixed requires_grad inside every unit)."""
    from common.models import LoRA, TinyLlama
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling
    from helpers import DIGITS

    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: the same adapters in every process
        torch.manual_seed(1)
        policy = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                                Sampling(max_new_tokens=6), lora=LoRA(rank=4)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def one_step(batch, aggregation: str, max_grad_norm: float, *, mesh=None, global_counts: bool = True,
             lora: bool = False) -> dict:
    """One SGD step (lr 1: a wrong gradient scale shows in the weights) of ``Loop.update`` on ``batch`` (rewards set;
    GRPO per group), two micro-batches. ``mesh``: the policy is sharded over it (FSDP2) and, with ``global_counts``,
    the normaliser counts every rank's tokens (without: this rank's, the control). Returns the advantages, the
    gradient norm the Stepper saw and the final full weights. ``lora``: the policy of :func:`lora_policy`."""
    from common.advantages.group import GRPO
    from common.distributed import all_reduce_sum
    from common.fsdp import shard_policy
    from common.loop import Loop, Stepper
    from common.losses.ppo_clip import ClippedPolicyLoss

    policy = lora_policy() if lora else make_policy()
    if mesh is not None:
        shard_policy(policy, mesh)
    loop = Loop(policy, lambda b: b, GRPO(), ClippedPolicyLoss(aggregation=aggregation), group_size=G,
                micro_batch_size=max(1, batch.batch_size // 2), all_reduce=all_reduce_sum if mesh is not None and global_counts else None)
    batch = batch.replace(advantages=loop.advantage(batch))
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=1.0), params, max_grad_norm=max_grad_norm)
    norms = []
    step = stepper.step
    stepper.step = lambda loss: norms.append(step(loss)) or norms[-1]
    loop.update(batch, stepper)
    return {"advantages": batch.advantages, "grad_norm": full(norms[0]),
            **{n: full(p.detach()).clone() for n, p in policy.named_parameters()}}


def generations(policy, rank: int) -> dict:
    """Greedy completions of two prompts, a different number of new tokens on each rank (3 on rank 0, 6 on rank 1):
    a collective inside generation would then hang; plus a sampled rollout of G = 2 (the policy's own path)."""
    from helpers import digit_prompts

    ids, mask = policy.encode(digit_prompts(2, seed=rank))
    greedy = policy.generate(ids, mask, 1, greedy=True, max_new_tokens=3 + 3 * rank)
    torch.manual_seed(rank)
    sampled = policy.rollout(digit_prompts(2, seed=rank), 2)
    return {"greedy": greedy.completion_ids, "sampled": sampled.completion_ids}


def main(batch_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from common.batch import RolloutBatch
    from common.fsdp import shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    batch = RolloutBatch.from_state(torch.load(batch_file, weights_only=False))
    rows = batch.batch_size // world  # whole groups per rank: rows are grouped by prompt, G divides rows
    local = batch.select(torch.arange(rank * rows, (rank + 1) * rows))
    out: dict = {case: one_step(local, *case, mesh=mesh) for case in CASES}
    out["per_rank"] = one_step(local, "token_mean", 0.0, mesh=mesh, global_counts=False)  # the control
    out["lora"] = one_step(local, "token_mean", 0.0, mesh=mesh, lora=True)
    policy = make_policy()
    shard_policy(policy, mesh)
    out["generations"] = generations(policy, rank)
    out["sharded"] = {n: (type(p).__name__, tuple(p.to_local().shape)) for n, p in policy.named_parameters()}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
