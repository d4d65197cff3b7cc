"""Each rank's own module state in the Lightning checkpoint under data parallelism, restored on resume.

Lightning writes rank 0's checkpoint only, and DDP broadcasts rank 0's buffers to every rank when it wraps the
module and again at the start of the run's first forward (the first ``training_step``: under manual optimisation
Lightning turns DDP's forward buffer sync off after it), so state that differs between ranks would come back as
rank 0's on every rank. Where state must agree it is made global (gathered: the DUMP curriculum, SPO's tracker; step counters are
equal by construction). What a rank legitimately keeps for itself is saved here: its persistent buffers and its
modules' extra state (``get_extra_state``, the ``<module>._extra_state`` entries of the state dict) wherever they
differ from rank 0's, e.g. the rows of the selective sample buffer (``common.sampling.buffer``), R³'s replay buffer
(``common.sampling.replay``), SPO-tree's edge buffer (``common.sampling.segment_buffer``), T-PPO's in-flight
responses (``common.methods.tppo``), the canaries' streaks and the reward-failure count.

``checkpoint["advlab_module_state_ranks"]``: one dict per rank, in rank order, of the entries where that rank differs
from rank 0 (rank 0's own is the checkpoint's ``state_dict``). On resume rank r loads them at the start of its first
``training_step`` (after that broadcast), as ``common.rng`` restores each rank's RNG states. One process: nothing is
added.
"""

from __future__ import annotations

from typing import Any

import torch

KEY = "advlab_module_state_ranks"
SUFFIX = "_extra_state"  # torch.nn.Module's state-dict key of get_extra_state()


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor on the CPU (an all_gather_object of CUDA tensors would land on their GPU)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested tensors, dicts, lists and plain values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def save_rank_module_states(module: torch.nn.Module, checkpoint: dict) -> None:
    """Every rank's persistent buffers and extra states that differ from rank 0's into ``checkpoint[KEY]`` (a
    collective under data parallelism: call it on every rank, after Lightning filled ``checkpoint["state_dict"]``;
    rank 0 writes the file). One process: nothing."""
    from common.distributed import all_gather_objects, world_size

    if world_size() == 1:
        return
    state = checkpoint.get("state_dict", {})
    names = {n for n, _ in module.named_buffers()} | {k for k in state if k.endswith(SUFFIX)}
    ranks = all_gather_objects({k: _cpu(state[k]) for k in sorted(names) if k in state})
    checkpoint[KEY] = [{k: v for k, v in mine.items() if not _same(v, ranks[0].get(k))} for mine in ranks]


def rank_module_state(checkpoint: dict, world_size: int, global_rank: int, fitting: bool) -> dict:
    """This rank's entries to load over rank 0's (empty outside a fit, on one process, or for rank 0). A fit resumed
    with another number of ranks raises, naming the flags."""
    states = checkpoint.get(KEY)
    if not fitting or not states:
        return {}
    if len(states) != world_size:
        raise ValueError(f"the checkpoint holds the module state of {len(states)} rank(s) and this run has {world_size}: "
                         "resume with the same --trainer.devices x --trainer.num_nodes")
    return dict(states[global_rank])


def load_rank_module_state(module: torch.nn.Module, state: dict) -> dict:
    """Load ``state`` (from :func:`rank_module_state`) into ``module``: every key must be one of its entries.
    Returns ``{}``, what is left to load (the module keeps it in a declared field until its first step)."""
    if not state:
        return {}
    # every buffer and extra state, this rank's entries over the current ones (rank 0's): a module that fills its
    # missing buffers when loading (common.methods.canaries) must not see a partial dict
    names = {n for n, _ in module.named_buffers()}
    full = {k: v for k, v in module.state_dict().items() if k in names or k.endswith(SUFFIX)} | state
    result = module.load_state_dict(full, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the checkpoint's per-rank state has entries this module does not: {result.unexpected_keys}")
    return {}


def setup_rank(module: Any, stage: str) -> None:
    """At the LightningModule's ``setup``: refuse a strategy the manual-optimisation loop cannot run under (FSDP1,
    in one line) and, for a fit, seed each data-parallel rank with seed + rank (``common.rng.seed_rank``)."""
    from common.distributed import check_strategy
    from common.rng import seed_rank

    check_strategy(module.trainer.strategy, module.automatic_optimization)
    if stage == "fit":
        seed_rank(module.trainer.world_size, module.trainer.global_rank)


def save_rank_checkpoint(module: torch.nn.Module, checkpoint: dict) -> None:
    """At ``on_save_checkpoint`` (a collective under data parallelism): every rank's RNG states (``common.rng``) and
    every rank's own module state (:func:`save_rank_module_states`)."""
    from common.rng import save_rank_states

    save_rank_states(checkpoint)
    save_rank_module_states(module, checkpoint)


def load_rank_checkpoint(module: Any, checkpoint: dict) -> dict:
    """At ``on_load_checkpoint``: restore this rank's RNG states now and return its own module state, which the
    module loads at the start of its first ``training_step`` (:func:`load_rank_module_state`), after DDP's buffer
    broadcast. Outside a fit (validate, predict, export) rank 0's RNG states and nothing else."""
    from common.rng import load_rank_states

    trainer = module._trainer
    fitting = trainer is not None and trainer.state.fn == "fit"
    world, rank = (trainer.world_size, trainer.global_rank) if fitting else (1, 0)
    load_rank_states(checkpoint, world, rank, fitting)
    return rank_module_state(checkpoint, world, rank, fitting)
