"""One-step off-policy rollouts: the batch of step k+1 is generated while step k updates.

The synchronous loop alternates: sample a batch with θ_k, then update θ_k -> θ_{k+1}; the sampler and the trainer
each wait for the other. Overlapping them (one-step asynchronous RL: Noukhovitch et al., "Asynchronous RLHF: Faster
and More Efficient Off-Policy RL for Language Models", arXiv 2410.18252, §3 "one-step off-policy"; verl's
``one_step_off_policy`` recipe) trains step k on a batch sampled by θ_{k−1}, the weights *before* update k−1,
generated during update k−1 by a frozen snapshot of them:

    hook of step k (before update k):  wait for the batch B_{k−1} ~ π_{θ_{k−1}}(· | prompts of step k−1)
                                        θ_snap <- θ_k; start sampling B_k ~ π_{θ_snap} on the prompts of step k
                                        (a background thread), and train on B_{k−1}
    update k:                           runs while B_k is generated

The batch is one step stale, so it is sampled from μ = π_{θ_{k−1}}, not from π_old = π_{θ_k}. The snapshot records
μ's log-probs of the sampled tokens (``behaviour_logprobs``, the distribution ``generate`` samples from), and the loss
must be wrapped in ``common.losses.correction.RolloutCorrection``: its weight π_old/μ per token makes the clipped
surrogate around π_old an unbiased estimate of the on-policy one (decoupled PPO: Hilton, Cobbe, Schulman,
"Batch size-invariance for policy optimization", arXiv 2110.00641, Eq. 3: the proximal policy π_old is the
clipping centre and the behaviour policy μ enters only through the importance weight). Exact in expectation as long
as no weight reaches the cap C; truncation (TIS) trades that bias for bounded variance (``cap`` large = exact).

Prompts. The hook sees one prompt batch a step (the loop's ``rollout(loop, prompts, n)``), so the batch for step
k+1 can only come from the prompts of step k. Step 0 has no earlier batch: it samples its own prompts with θ_0,
synchronously (the only step that waits for generation), and the background thread samples the same prompts again
(new draws) for step 1; from then on step k trains on the prompts of step k−1. So N steps train on N batches from
N prompt batches, the first one twice (steps 0 and 1), and the last step's batch is generated but never trained on
(at the end of ``fit`` it finishes in the background and is dropped). The data position is the synchronous run's.
Priming with one extra prompt batch instead (every prompt once) needs the loop to hand the rollout hook the data
stream's ``next_prompts`` (``Loop.collect``'s ``more``), which it does not.

Determinism. Every batch is sampled with its own ``torch.Generator`` (``common.rollout.hf.SeededDraw``), seeded from
torch's global RNG in the main thread when the hook starts it; the global RNG is never touched by the thread, so a
batch is a function of (weights, prompts, seed) and not of thread timing. On the CPU it equals the batch ``generate``
samples after ``torch.manual_seed(seed)``.

Checkpoint / resume. The pending batch B_k (being generated when the checkpoint at the end of step k is written)
is waited for and saved as the method's extra state; a resumed run trains step k+1 on it, so kill-and-resume is
exact (the snapshot weights need not be saved: the next hook copies θ_{k+1}). Under data parallelism every rank
keeps its own pending batch (``common/rank_state.py``).

Cost: one more copy of the policy's weights (the snapshot) and, per step, one copy of θ into it. Where it pays: on a
GPU with a separate rollout engine (another GPU, or a vLLM engine), generation and the update run on different
hardware and the step costs max(rollout, update) instead of their sum. On one device they share the same cores
or SMs, and on a 2-core CPU they mostly contend (``benchmarks/overlap.py`` measures it). HF ``generate`` only: with
vLLM the engine would be the snapshot, but its weight sync at the end of ``Loop.update`` (``policy.sync()``) must
first wait for the pending generation, which no hook can do.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.correction import RolloutCorrection
from common.methods.base import Method
from common.policies.base import mix_weights_
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.hf import HFBackend

if TYPE_CHECKING:
    from common.loop import Loop


class Snapshot:
    """The frozen weights θ_snap that sample in the background, with a tokenizer of their own (a fast tokenizer
    is one Rust object that two threads must not use at once). A plain object, not a submodule: it is not in the
    checkpoint (the next hook rebuilds it from θ), and Lightning does not move or count it."""

    def __init__(self, policy: CausalLMPolicy):
        self.model = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.tokenizer = copy.deepcopy(policy.tokenizer)

    def load(self, policy: CausalLMPolicy) -> None:
        """θ_snap <- θ (an exact copy, in place)."""
        if next(self.model.parameters()).device != policy.device:
            self.model.to(policy.device)
        mix_weights_(self.model, policy.model, 1.0)


class Pending(threading.Thread):
    """One batch sampled in the background: ``n`` samples of every prompt by ``model`` with a generator seeded
    ``seed``; ``result()`` waits for it (and re-raises what the thread raised).

    On a GPU the thread samples on a CUDA stream of its own, so its kernels can run beside the update's instead of
    queueing behind them on one stream: it starts once the snapshot copy (queued on the main stream before it) is
    done, and its tensors are marked as used by the main stream (``record_stream``) before the main thread reads
    them, so the caching allocator does not hand their memory back to the side stream too early. (Written for the
    GPU, not run on one in this project's tests: no GPU here.)"""

    def __init__(self, policy: CausalLMPolicy, model: nn.Module, tokenizer, prompts: Sequence[dict], n: int, seed: int):
        super().__init__(name="one-step-off-policy rollout", daemon=False)
        ids, mask = policy.encode(prompts)  # (P, L) each, encoded here in the main thread with the policy's tokenizer
        self.job = (policy.backend, model, tokenizer, ids, mask, n, dataclasses.replace(policy.sampling, logprobs=True))
        self.prompts, self.seed = [dict(s) for s in prompts], seed
        self.stream = torch.cuda.Stream(ids.device) if ids.is_cuda else None
        self.ready = torch.cuda.Event() if ids.is_cuda else None
        if self.ready is not None:
            self.ready.record()  # on the main stream, after the snapshot copy
        self.batch: RolloutBatch | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.stream is None:
                self.batch = sample(*self.job, seed=self.seed, prompts=self.prompts)
                return
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.ready)
                self.batch = sample(*self.job, seed=self.seed, prompts=self.prompts)
            self.stream.synchronize()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by result()
            self.error = err

    def result(self) -> RolloutBatch:
        self.join()
        if self.error is not None:
            raise self.error
        if self.stream is not None:
            main = torch.cuda.current_stream(self.stream.device)
            for f in dataclasses.fields(self.batch):
                value = getattr(self.batch, f.name)
                if torch.is_tensor(value) and value.is_cuda:
                    value.record_stream(main)
        return self.batch


def sample(backend: HFBackend, model: nn.Module, tokenizer, ids: Tensor, mask: Tensor, n: int, sampling, *, seed: int,
           prompts: Sequence[dict]) -> RolloutBatch:
    """``n`` samples of every prompt (ids, mask (P, L) left-padded) by ``model``, drawn with a generator seeded
    ``seed``, with the behaviour log-probs μ(x_t) of the sampled tokens (B, T) (``CausalLMPolicy.rollout``'s rows)."""
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    batch = backend.generate(model, tokenizer, ids, mask, n, sampling, generator=generator)
    return batch.replace(samples=[dict(s) for s in prompts for _ in range(n)])


class OneStepOffPolicy(Method):
    """Generate step k+1's batch while step k updates (module docstring). Needs a ``CausalLMPolicy`` sampling with
    HF ``generate`` and a loss wrapped in ``RolloutCorrection``.

    Args:
        enabled: False = the synchronous loop, unchanged (the method does nothing): the flag to compare both.
    """

    requires = ("behaviour_logprobs",)

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.snapshot: Snapshot | None = None  # built at the first rollout (after Lightning moved the policy)
        self.pending: Pending | None = None  # the batch being generated for the next step
        self.restored: RolloutBatch | None = None  # a pending batch read from a checkpoint

    def setup(self, loop: "Loop") -> None:
        if not self.enabled:
            return
        if not isinstance(loop.policy, CausalLMPolicy) or not isinstance(loop.policy.backend, HFBackend):
            backend = type(getattr(loop.policy, "backend", None)).__name__
            raise ValueError("OneStepOffPolicy: the policy must be a CausalLMPolicy sampling with "
                             f"common.rollout.hf.HFBackend, got {type(loop.policy).__name__} with {backend} (with vLLM "
                             "the engine's weight sync would have to wait for the pending generation)")
        if not isinstance(loop.loss, RolloutCorrection):
            raise ValueError("OneStepOffPolicy: the loss must be wrapped in common.losses.correction.RolloutCorrection "
                             f"(the batch is sampled by the previous step's weights), got {type(loop.loss).__name__}")

    def rollout(self, loop: "Loop", prompts: Any, n: int) -> RolloutBatch | None:
        if not self.enabled:
            return None
        policy = loop.policy
        if policy.backend.logits_processors:
            raise ValueError("OneStepOffPolicy: the HF backend has logits processors (a method that shapes sampling, "
                             "e.g. HAPO), whose state two threads would share; list no such method with it")
        if self.pending is not None:
            batch = self.pending.result()  # B_{k-1}, sampled by θ_{k-1} during update k-1
        elif self.restored is not None:
            batch = self.restored.to(policy.device)  # from the checkpoint of step k-1
        else:  # step 0: sample this step's prompts now, with θ_0
            seed = int(torch.randint(2**62, ()))
            batch = sample(policy.backend, policy.model, policy.tokenizer, *policy.encode(prompts), n,
                           dataclasses.replace(policy.sampling, logprobs=True), seed=seed, prompts=prompts)
        self.restored = None
        if self.snapshot is None:
            self.snapshot = Snapshot(policy)
        self.snapshot.load(policy)  # θ_snap <- θ_k, before update k
        self.pending = Pending(policy, self.snapshot.model, self.snapshot.tokenizer, prompts, n,
                                seed=int(torch.randint(2**62, ())))  # the seed from the global RNG, in this thread
        self.pending.start()
        return batch

    # ------------------------------------------------------------------ checkpoint: the pending batch
    def get_extra_state(self) -> dict:
        """The batch being generated for the next step (waited for), as tensors and plain lists."""
        if self.pending is not None:
            self.restored, self.pending = self.pending.result(), None
        return {"pending": self.restored.state_dict() if self.restored is not None else {}}

    def set_extra_state(self, state: dict) -> None:
        if self.pending is not None:  # a load into a running method: its own generation is superseded
            self.pending.join()
            self.pending = None
        self.restored = RolloutBatch.from_state(state["pending"])
