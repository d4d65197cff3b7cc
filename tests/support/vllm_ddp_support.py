"""Support for tests/test_distributed_vllm.py: a callback that checks, on every DDP rank after training, that the
rank's colocated vLLM engine holds the trainer's weights (its teacher-forced log-probs of a probe batch equal the
trainer's own), and how far those weights moved from the initial ones (so a sync that never happened shows)."""

from __future__ import annotations

import json

import lightning as L
import torch

PROBE = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 7+1?", "answer": "8"}]


class EngineProbe(L.Callback):
    """At the end of training, on every rank: sample 2 completions of each PROBE prompt through the engine, then
    write ``{"rank", "engine_vs_trainer", "trainer_vs_init"}`` (max |Δ log-prob| over the probe's tokens) as one
    JSON line to ``<path>.rank<r>``. The initial weights are the recipe's TinyLlama rebuilt from its seed."""

    def __init__(self, path: str, hidden_size: int = 128, num_layers: int = 1, num_heads: int = 4):
        self.path, self.shape = path, (hidden_size, num_layers, num_heads)

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from common.models import TinyLlama
        from common.policies.causal_lm import CausalLMPolicy

        policy = pl_module.policy
        batch = policy.rollout(PROBE, 2)
        engine = policy.sampler_logprobs(batch)  # (B, T) the engine's, temperature 1
        mine = policy(batch).logprobs  # (B, T) the trainer's, at the sampling temperature (1 in the test)
        h, n_layers, heads = self.shape
        init = CausalLMPolicy(TinyLlama(hidden_size=h, num_layers=n_layers, num_heads=heads, seed=0), policy.sampling)
        init = init.to(batch.completion_ids.device)  # the trainer's device (a GPU in the GPU-only test)
        before = init(batch).logprobs
        m = batch.completion_mask
        out = {"rank": trainer.global_rank, "engine_vs_trainer": float((engine - mine)[m].abs().max()),
               "trainer_vs_init": float((mine - before)[m].abs().max()), "tokens": int(m.sum())}
        with open(f"{self.path}.rank{trainer.global_rank}", "w") as f:
            f.write(json.dumps(out) + "\n")
