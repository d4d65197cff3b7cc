"""RNG streams in the Lightning checkpoint, so a resumed run samples exactly what the uninterrupted one would have."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """torch, Python, NumPy (and CUDA) RNG states as plain types and tensors (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank(world_size: int, global_rank: int) -> None:
    """Under data parallelism each rank samples with its own seed: ``seed_everything``'s seed + the global rank
    (torch, Python, NumPy); without it every rank would draw the same completions. One process: nothing changes.
    Called before a checkpoint's RNG states are restored, so a resumed run continues each rank's own stream."""
    if world_size > 1:
        import os

        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) + global_rank  # seed_everything's seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)


def save_rank_states(checkpoint: dict) -> None:
    """Every rank's RNG states into ``checkpoint`` (a collective: call it on every rank; rank 0 writes the file)."""
    from common.distributed import all_gather_objects

    states = all_gather_objects(rng_state())
    checkpoint["advlab_rng"] = states[0]
    if len(states) > 1:
        checkpoint["advlab_rng_ranks"] = states


def load_rank_states(checkpoint: dict, world_size: int, global_rank: int, fitting: bool) -> None:
    """Restore this rank's RNG states from ``checkpoint``; resuming a fit with another number of ranks raises."""
    states = checkpoint.get("advlab_rng_ranks") or ([checkpoint["advlab_rng"]] if "advlab_rng" in checkpoint else [])
    if fitting and states and len(states) != world_size:
        raise ValueError(f"the checkpoint was written by {len(states)} rank(s) and this run has {world_size}: resume with "
                         f"the same --trainer.devices x --trainer.num_nodes (the data position and the samplers' RNG "
                         "states are per rank)")
    if states:
        set_rng_state(states[global_rank if fitting else 0])
