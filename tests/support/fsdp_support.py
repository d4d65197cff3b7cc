"""Support for tests/test_distributed_fsdp.py.

``CPUFSDP``: Lightning's ``FSDPStrategy`` made to get past its two CPU-only refusals, so that a CPU test reaches what
``--trainer.strategy fsdp`` does on GPUs: (1) Lightning's accelerator check (accelerator_connector.py,
``_check_strategy_and_fallback``) tests ``type(strategy) is FSDPStrategy``, which a subclass is not; (2) Lightning
passes ``device_id=root_device.index`` (None on CPU) and torch's FSDP1 then refuses a host without an accelerator
(torch/distributed/fsdp/_init_utils.py, ``_init_device_handle``: "FSDP needs a non-CPU accelerator device"): here
it gets ``device_id=cpu``. A test instrument, not a way to train.

Run as a script with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it is one rank of the FSDP1
check: a model wrapped in torch's ``FullyShardedDataParallel`` on gloo (i) takes one SGD step from a backward after
its forward returned (the ordinary use; its weights are written for comparison with one process on the whole
batch), and (ii) refuses a backward run inside its own forward (what Lightning's ``training_step`` redirection
makes of manual optimisation). Writes ``rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp as tfsdp
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

_FSDP = tfsdp.FullyShardedDataParallel


class CPUFSDP(FSDPStrategy):
    """``FSDPStrategy`` on CPU: another type for Lightning's check, ``device_id=cpu`` for torch's."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        class OnCPU(_FSDP):
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=device_id if device_id is not None else torch.device("cpu"), **kwargs)

        tfsdp.FullyShardedDataParallel = OnCPU  # Lightning imports it from torch.distributed.fsdp inside _setup_model
        try:
            return super()._setup_model(model)
        finally:
            tfsdp.FullyShardedDataParallel = _FSDP


def tiny_net() -> nn.Module:
    """3 -> 5 -> 1, float64, fixed weights (17 + 6 parameters: the flat parameter does not divide evenly by 2 ranks)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def reference_step() -> dict[str, torch.Tensor]:
    """One process, the whole batch: one SGD step (lr 0.5) on the mean squared error."""
    net = tiny_net()
    x, y = data()
    ((net(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.5 * p.grad
    return {n: p.detach() for n, p in net.named_parameters()}


class BackwardInsideForward(nn.Module):
    """A module whose forward computes the loss and calls backward on it, as manual optimisation does inside
    Lightning's ``training_step`` when the strategy redirects it through the wrapped module's forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ((self.net(x) - y) ** 2).mean()
        loss.backward()
        return loss.detach()


def main(out_dir: str) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's half of the global batch
    out: dict[str, object] = {}

    # (i) the ordinary use: backward after forward returned; FSDP averages the gradients over ranks (as DDP)
    fsdp = _FSDP(tiny_net(), device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
    ((fsdp(x[rows]) - y[rows]) ** 2).mean().backward()
    opt.step()
    with _FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        out["weights"] = {k: v.detach().clone() for k, v in fsdp.state_dict().items()}

    # (ii) backward inside the wrapped module's forward
    inside = _FSDP(BackwardInsideForward(tiny_net()), device_id=torch.device("cpu"), use_orig_params=True)
    try:
        inside(x[rows], y[rows])
        out["inside"] = "ran"
    except AssertionError as e:
        out["inside"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    # no destroy_process_group: the failed backward can leave the ranks out of step for a further collective


if __name__ == "__main__":
    main(sys.argv[1])
