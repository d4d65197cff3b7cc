"""Support for tests/test_distributed_state.py: one rank of the per-rank checkpoint state check of
``common/rank_state.py`` on plain gloo processes (run as a script with torchrun's environment: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Imports torch only, so a rank starts in about two seconds."""

from __future__ import annotations

from pathlib import Path

import torch


class RowBuffer(torch.nn.Module):
    """A per-rank buffer as the replay buffers keep one: a counter buffer and rows as extra state. Like
    ``common.methods.canaries.Canaries`` it fills missing buffers with zeros when loading a partial state dict."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.rows: list[dict] = []

    def get_extra_state(self) -> dict:
        return {"rows": self.rows}

    def set_extra_state(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in self._buffers.items():
            state_dict.setdefault(prefix + name, torch.zeros_like(buf))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def rank_state_round_trip(directory: Path) -> None:
    """One rank (torchrun's environment): fill a module with this rank's own state, save a checkpoint as Lightning
    does (rank 0 writes it; every rank calls the save hook), load it into a fresh module as Lightning does (rank 0's
    state dict) and then this rank's own entries; write what came back to ``rank<r>.pt``."""
    import torch.distributed as dist

    from common.rank_state import load_rank_module_state, rank_module_state, save_rank_module_states

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    module = torch.nn.ModuleDict({"buffer": RowBuffer(), "shared": RowBuffer(), "head": torch.nn.Linear(2, 1)})
    module["buffer"].seen.fill_(10 + rank)  # per rank
    module["buffer"].rows = [{"prompt": f"rank {rank} row {i}", "ids": torch.arange(i + rank)} for i in range(3)]
    module["shared"].seen.fill_(7)  # equal on both ranks: not stored twice
    checkpoint = {"state_dict": module.state_dict()}
    save_rank_module_states(module, checkpoint)
    if rank == 0:
        torch.save(checkpoint, directory / "ckpt.pt")
    dist.barrier()
    loaded = torch.load(directory / "ckpt.pt", weights_only=False)
    fresh = torch.nn.ModuleDict({"buffer": RowBuffer(), "shared": RowBuffer(), "head": torch.nn.Linear(2, 1)})
    fresh.load_state_dict(loaded["state_dict"])  # Lightning: rank 0's state on every rank
    load_rank_module_state(fresh, rank_module_state(loaded, 2, rank, fitting=True))
    torch.save({"state": fresh.state_dict(), "stored": loaded["advlab_module_state_ranks"]}, directory / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    rank_state_round_trip(Path(sys.argv[1]))
