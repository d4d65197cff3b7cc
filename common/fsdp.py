"""FSDP2 for the RL loop under Lightning's ``ModelParallelStrategy`` (torch's ``fully_shard``, ZeRO-3: parameters,
gradients and optimiser state split over the data-parallel ranks).

Lightning's ``FSDPStrategy`` (FSDP1) cannot run the loop (``common.distributed.check_strategy`` says why). Its
``ModelParallelStrategy`` calls ``training_step`` directly and leaves the sharding to the LightningModule's
``configure_model``, which ``PolicyOptimizationModule`` implements with :func:`shard_module` (:func:`shard_policy`
over the strategy's ``device_mesh["data_parallel"]``); :func:`check_sizes` refuses the strategy's sizes that are not
pure data parallelism.

    advlab fit --config <recipe> --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy \\
        --trainer.strategy.data_parallel_size <devices x nodes> --trainer.strategy.tensor_parallel_size 1 \\
        --trainer.devices <devices> [--trainer.num_nodes <nodes>]
"""

from __future__ import annotations

import functools

import torch

# Policy methods that run the model outside the policy's ``forward`` (the Policy interface, common/policies/base.py,
# and CausalLMPolicy.generate, which methods call for extra samples). ``sync`` is not one: the HF backend's is a
# no-op, and vLLM's ``export_weights`` gathers every sharded tensor itself (``DTensor.full_tensor``, on every rank).
OUTSIDE_FORWARD = ("rollout", "generate", "sampler_logprobs")


def shard_module(module) -> None:
    """``PolicyOptimizationModule.configure_model``: shard ``module.policy`` over the data-parallel ranks of the
    strategy's device mesh (:func:`shard_policy`); nothing without a mesh (any strategy but ModelParallelStrategy).
    A module :func:`check_module` refuses is refused here too (a module built in Python, without the CLI)."""
    mesh = module._device_mesh
    if mesh is None:
        return
    check_module(module)
    shard_policy(module.policy, mesh)


def check_module(module, strategy=None) -> None:
    """Refuse in one line (ValueError) trainable parameters outside ``module.policy`` under ModelParallelStrategy
    (``strategy``; None: the module is being sharded): a method's critic or value head (T-PPO's) would be neither
    sharded nor averaged over the ranks (no DDP wrapper averages them here), so the ranks would silently train
    different critics. The CLI calls it before launch; names the first such parameter."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if (strategy is not None and not isinstance(strategy, ModelParallelStrategy)) or not hasattr(module, "policy"):
        return
    own = {id(p) for p in module.policy.parameters()}
    others = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in own]
    if others:
        raise ValueError(f"--trainer.strategy ModelParallelStrategy: {len(others)} trainable parameter(s) outside the "
                         f"policy ({others[0]}, ...: a method's own network) would be neither sharded nor averaged over "
                         "the ranks (advlab shards only the policy); use --trainer.strategy ddp for this recipe")


def shard_policy(policy: torch.nn.Module, mesh) -> None:
    """Shard ``policy`` in place with FSDP2 over the data-parallel ranks of ``mesh`` (a 1-D ``DeviceMesh``, or
    ``ModelParallelStrategy``'s 2-D one, whose ``"data_parallel"`` dimension is used); a no-op when ``mesh`` is None
    (any other strategy) or the policy is already sharded (Lightning calls ``configure_model`` again for a validate
    or test after fit).

    Units: every transformers decoder layer (``GradientCheckpointingLayer``) of the policy and of its frozen reference
    copy, each its own unit (all-gathered for its forward and again for its backward, freed after); then the policy
    itself, the root, which holds what is left (embeddings, final norm, LM head, the reference's too, LoRA adapters
    outside the layers). The root is the policy, not its HF model, because the loop calls the policy
    (``policy(batch)``) while the policy runs the model's decoder and reads the head's weight directly: the root's
    FSDP hooks gather those weights for the whole ``forward`` and reduce-scatter their gradients after the backward.
    Gradients are averaged over the ranks as DDP's are, so the Loop's global normaliser gives the one-process step
    of the global batch. A policy without transformers layers (a toy policy) is one unit.

    The methods in ``OUTSIDE_FORWARD`` run with every unit gathered and without a collective inside, so the ranks
    may generate different numbers of tokens: the root's FSDP pre-forward runs first (``register_fsdp_forward_method``,
    which also makes the policy the root before any layer runs), every layer is all-gathered once and kept
    (``reshard_after_forward=False``) for the call, and all are resharded when it returns. A rollout thus holds the
    full weights, as under DDP; the update holds the root and one layer at a time (two with prefetching).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    from transformers.modeling_layers import GradientCheckpointingLayer

    if mesh is None or isinstance(policy, FSDPModule):
        return
    mesh = mesh["data_parallel"] if mesh.ndim > 1 else mesh  # (data_parallel, tensor_parallel = 1)
    layers = [m for m in policy.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    depth = [0]  # > 0 inside a gathered call (rollout -> generate: gathered once)

    def gathered(fn, *args, **kwargs):  # an FSDP forward method of the root: the root's pre-forward ran before it
        for unit in layers:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()  # all-gathered once; the layers' own pre-forwards then find them gathered
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            for unit in layers:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    policy._fsdp_gathered = gathered
    register_fsdp_forward_method(policy, "_fsdp_gathered")

    def outside_forward(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            try:
                return policy._fsdp_gathered(fn, *args, **kwargs)
            finally:
                policy.reshard()  # the root's own weights: FSDP keeps a root gathered after its forward

        return run

    for name in OUTSIDE_FORWARD:
        if hasattr(policy, name):
            setattr(policy, name, outside_forward(getattr(policy, name)))


def check_sizes(strategy) -> None:
    """Refuse, in one line (ValueError), a ``ModelParallelStrategy`` that is not pure data parallelism over every
    rank: ``tensor_parallel_size`` must be 1 and ``data_parallel_size`` the world size (devices x nodes). The
    strategy's defaults (``"auto"``: data parallel over nodes, tensor parallel over a node's devices, resolved in its
    ``setup_environment``) would put a node's devices in a tensor-parallel group that nothing shards: those ranks
    would train on different prompts without averaging their gradients. Checked before any process starts."""
    devices, nodes = len(strategy.parallel_devices or ()) or 1, strategy.num_nodes
    dp, tp = strategy._data_parallel_size, strategy._tensor_parallel_size  # "auto" or the sizes given
    dp, tp = (nodes if dp == "auto" else dp), (devices if tp == "auto" else tp)  # as setup_environment resolves them
    if tp != 1 or dp != devices * nodes:
        raise ValueError(
            f"--trainer.strategy ModelParallelStrategy: expected data_parallel_size={devices * nodes} (devices x nodes) "
            f"and tensor_parallel_size=1 (advlab shards the policy with FSDP2 over the data-parallel ranks and applies "
            f"no tensor parallelism), got data_parallel_size={dp}, tensor_parallel_size={tp}; set "
            f"--trainer.strategy.data_parallel_size {devices * nodes} --trainer.strategy.tensor_parallel_size 1")


def consolidate(folder: str, out: str) -> None:
    """Write the sharded checkpoint ``folder`` (ModelParallelStrategy's default: one ``.distcp`` file per rank,
    ``.metadata`` and Lightning's ``meta.pt``) as one Lightning checkpoint file ``out``: ``meta.pt``'s contents
    (step, loops, data position, RNG states) with the full ``state_dict``, the weights under the unsharded module's
    names, which ``advlab predict`` / ``export`` and ``--ckpt_path`` of a non-sharded run read. Its optimiser state
    is left out (sharded optimiser state is keyed by parameter name, not in Lightning's single-file layout): resume
    a run from the folder itself. Lightning's own ``consolidate_checkpoint`` expects FSDPStrategy's layout."""
    import tempfile
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder_path = Path(folder)
    if not (folder_path / "meta.pt").is_file():
        raise ValueError(f"folder: {folder!r} is not a sharded Lightning checkpoint (expected a folder with meta.pt)")
    checkpoint = torch.load(folder_path / "meta.pt", map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder_path, Path(tmp) / "full.pt")
        checkpoint["state_dict"] = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)["state_dict"]
    torch.save(checkpoint, out)


if __name__ == "__main__":  # python -m common.fsdp <sharded checkpoint folder> <out.ckpt>
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m common.fsdp <sharded checkpoint folder> <out.ckpt>")
    try:
        consolidate(sys.argv[1], sys.argv[2])
    except ValueError as e:
        sys.exit(f"common.fsdp: {e}")
