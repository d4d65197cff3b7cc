"""Support for tests/test_distributed_stats.py: the batch, the cases and one rank of the 2-rank check that batch
statistics (REINFORCE++ whitening, SPO's normalisation, Segment-PO whitening, the 80/20 entropy quantile, HAPO's
entropy statistics, Clip-Cov / KL-Cov) are the global batch's under DDP. Run as a script with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): ``python ddp_stats_support.py BATCH_FILE OUT_DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_support import G, make_policy

# the batch's fields the estimators need beyond a rollout's (SPO: prompt_uid; SPO-chain: old log-probs, segments)
PROVIDED = ("prompt_uid", "old_logprobs", "segment_starts", "prefix_values")
MICRO = 3  # rows per micro-batch per rank in the micro-batched case (one group)


def cases() -> dict:
    """name -> () -> (estimator, loss): one batch statistic each, the rest plain GRPO / the clipped loss."""
    from common.advantages.group import GRPO, ReinforcePP
    from common.advantages.segment import SPOChain
    from common.advantages.tracker import SPOTracker
    from common.losses.entropy import ClipCovLoss, EntropyTopQuantileLoss, KLCovLoss
    from common.losses.hapo import HAPOLoss
    from common.losses.ppo_clip import ClippedPolicyLoss

    return {
        "reinforce_pp": lambda: (ReinforcePP(), ClippedPolicyLoss()),
        "spo_tracker": lambda: (SPOTracker(num_prompts=4), ClippedPolicyLoss()),
        "spo_chain": lambda: (SPOChain(), ClippedPolicyLoss()),
        "entropy_top20": lambda: (GRPO(), EntropyTopQuantileLoss(quantile=0.2)),
        "hapo": lambda: (GRPO(), HAPOLoss()),
        "clip_cov": lambda: (GRPO(), ClipCovLoss(ratio=0.2, lb=-10.0, ub=10.0)),
        "kl_cov": lambda: (GRPO(), KLCovLoss(ratio=0.2)),
    }


def stats_batch():
    """4 prompts x G = 3 rows sampled by the tiny float64 policy; ragged masks with many more tokens on rank 0's rows
    (0-5) than on rank 1's (6-11), one empty; rewards in [0, 1] (SPO's tracker); old log-probs 0.3-noisy around
    the policy's (ratios != 1: PPO clipping, KL-Cov's |ℓ − ℓ_old| and HAPO's band all act); SPO-chain segment
    starts at every other valid token with random prefix values; fixed entropies for HAPO's sampling statistics."""
    from helpers import digit_prompts

    torch.manual_seed(0)
    policy = make_policy()
    batch = policy.rollout(digit_prompts(4), G)
    B, T = batch.completion_mask.shape
    lengths = torch.tensor([6, 5, 6, 4, 6, 5, 1, 2, 1, 0, 2, 1]).clamp(max=T)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.0, 0.3, 1.0, 0.0, 0.7, 0.2, 0.4, 0.0], dtype=torch.float64)
    batch = batch.replace(completion_mask=mask, rewards=rewards, reward_components=rewards[:, None], reward_names=("r",))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lp = policy(batch).logprobs.double()  # (B, T)
    starts = mask & (torch.arange(T)[None, :] % 2 == 0)  # (B, T)
    return batch.replace(old_logprobs=lp + 0.3 * torch.randn(B, T, dtype=lp.dtype, generator=g),
                         segment_starts=starts,
                         prefix_values=torch.rand(B, T, dtype=lp.dtype, generator=g) * starts,
                         prompt_uid=torch.arange(4).repeat_interleave(G),
                         entropy=torch.rand(B, T, dtype=lp.dtype, generator=g) * 2)


def rank_rows(batch, rank: int, world: int):
    """Rank ``rank``'s whole groups, cut to its own longest completion (the ranks' T differ: ragged gathers)."""
    from common.batch import TIME_ALIGNED

    rows = batch.batch_size // world
    local = batch.select(torch.arange(rank * rows, (rank + 1) * rows))
    T = max(int(local.completion_mask.sum(1).max()), 1)
    return local.replace(**{f: getattr(local, f)[:, :T] for f in TIME_ALIGNED
                            if torch.is_tensor(getattr(local, f)) and getattr(local, f).dim() > 1})


def micro_order(batch_size: int, world: int, micro: int) -> torch.Tensor:
    """Rows in the order of the global micro-batches: every rank's first micro-batch, then every rank's second..."""
    rows = batch_size // world
    return torch.tensor([r * rows + k * micro + i for k in range(rows // micro) for r in range(world) for i in range(micro)])


def one_step(batch, case: str, *, all_gather=None, ddp: bool = False, micro: int | None = None) -> dict:
    """One SGD step (lr 1, no clipping) of ``Loop.update`` on ``batch`` with the case's estimator and loss; under
    ``ddp`` the global normaliser (all_reduce) and DDP's gradient averaging as in Lightning's manual optimisation,
    and ``all_gather`` (None: per-rank statistics, the control). Returns the advantages and the final weights."""
    from torch.nn.parallel import DistributedDataParallel

    from common.distributed import all_reduce_sum
    from common.loop import Loop, Stepper

    advantage, loss = cases()[case]()
    policy = make_policy()
    loop = Loop(policy, lambda b: b, advantage, loss, group_size=G, micro_batch_size=micro, provided=PROVIDED,
                all_reduce=all_reduce_sum if ddp else None, all_gather=all_gather)
    out = loop.advantage(batch)
    batch = batch.replace(advantages=out)
    backward = None
    if ddp:
        from lightning.pytorch.overrides.distributed import prepare_for_backward

        wrapped = DistributedDataParallel(policy)

        def backward(loss):
            prepare_for_backward(wrapped, loss)
            loss.backward()

    params = policy.trainable_parameters()
    loop.update(batch, Stepper(torch.optim.SGD(params, lr=1.0), params, max_grad_norm=0.0, backward=backward))
    return {"advantages": out, **{n: p.detach().clone() for n, p in policy.named_parameters()}}


def temperature_stats(batch, all_gather=None) -> torch.Tensor:
    """HAPO's adaptive-temperature statistics (q, s, pos, neg) after observing the batch's entropies. (4,)"""
    from common.methods.hapo import AdaptiveTemperature

    t = AdaptiveTemperature()
    t.observe(batch.entropy, batch.completion_mask, all_gather)
    return torch.stack(list(t.stats))


def main(batch_file: str, out_dir: str) -> None:
    from common.batch import RolloutBatch
    from common.distributed import all_gather_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = RolloutBatch.from_state(torch.load(batch_file, weights_only=False))
    local = rank_rows(batch, rank, world)
    out: dict = {"T": local.completion_mask.shape[1]}
    # the gather itself: ragged rows (3 on rank 0, 1 on rank 1), a bool tensor, an empty rank
    out["gather"] = all_gather_rows(torch.arange(3 - 2 * rank, dtype=torch.float64)[:, None] + 10 * rank)
    out["gather_bool"] = all_gather_rows(torch.tensor([True, False][: 2 - rank]))
    out["gather_empty"] = all_gather_rows(torch.ones(1 - rank, 2))
    for case in cases():
        out[case] = one_step(local, case, all_gather=all_gather_rows, ddp=True)
        out["per_rank", case] = one_step(local, case, all_gather=None, ddp=True)  # the control
    out["hapo", "micro"] = one_step(local, "hapo", all_gather=all_gather_rows, ddp=True, micro=MICRO)
    out["temperature"] = temperature_stats(local, all_gather_rows)
    out["per_rank", "temperature"] = temperature_stats(local)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
