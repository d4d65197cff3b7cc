"""DiffusionSamplerPolicy: a diffusion model's stochastic sampler as a Policy of the shared loop.

The actions of a row are its K denoising transitions ``x_{t_k} -> x_{t_{k+1}}``, each a Gaussian
``N(μ_θ(x_{t_k}, t_k, c), σ_k² I)`` built by a step builder (``common.sampling.gaussian_step``: DDIM with η > 0,
the LCM stochastic step, Flow-GRPO's SDE) and scored by the one kernel ``gaussian_step_logprob`` (mean over latent
dimensions, as DDPO / Flow-GRPO / MVC-ZigAL do; domains.md §0.4). The step density is a function of the stored
trajectory only, so ``forward`` recomputes log π(x_{t_{k+1}} | x_{t_k}) for all K steps from what the batch records.

RolloutBatch layout (B rows = prompts x n; K = ``step.num_steps``; latent shape ``(C, H, W)`` = ``sample_shape``):

    completion_ids         (B, K, C, H, W)  the actions: x_{t_1}, ..., x_{t_K} (the state after each transition)
    completion_mask        (B, K) bool      all True
    inputs["x_init"]       (B, C, H, W)     the state of the first transition (x_T, or what ``first_step`` made of it)
    inputs["cond"]         (B, ...)         the prompt embeddings the denoiser was conditioned on
    inputs["images"]       (B, C, H, W)     the chain's output for the reward (``step.output``: x_{t_K}, or LCM's last
                                            ``denoised``)
    inputs["timesteps"]    (B, K)           the denoiser's timestep at each step (for logging; forward uses k)
    seeds                  (B,) long        the row's noise: x_T = seeded_normal(seed, 0), step k's ξ = (seed, k + 1)
    behaviour_logprobs     (B, K)           log-probs as the sampler computed them (rows batched per step)

States are ``[x_init, x_{t_1}, ..., x_{t_{K−1}}]``, so ``forward`` evaluates the denoiser on all K states of a row at
once. Batch invariance: the denoiser's kernels (convolutions, matmuls) give a row results that differ in the last bits
with the batch it shares (measured ~1e-6 in float32 for a diffusers UNet on CPU), so with ``row_invariant=True``
(default) ``forward`` calls the denoiser once per row on that row's K states (a loop over rows, each call vectorised
over steps): every row's log-probs are then bit-identical whatever the micro-batch or minibatch split, and the PPO
ratio is exactly 1 before the first update (DanceGRPO's is 1 only at batch size 1). ``row_invariant=False`` makes one
call on all B·K states (faster on a GPU; the ratio is then 1 up to kernel rounding). The sampler's own
``behaviour_logprobs`` come from per-step batches and match ``forward`` to rounding (not bit for bit); the loop's old
log-probs are always recomputed by ``forward``. The frozen reference copy may differ from the current weights' log-probs
in the last bit at initialisation (measured 2e-16 in float64: some CPU kernels take another path for weights that do
not require grad), so KL(π‖π_ref) starts at rounding level, not at an exact 0.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) is an explicit option, the same in rollout and in
``forward`` (so it never opens a train/rollout mismatch): ``guidance=None`` uses the conditional prediction only;
``ClassifierFreeGuidance(scale, train_unconditional=False)`` combines ``ε̂ = ε_u + w (ε_c − ε_u)`` with the
unconditional branch computed without gradient (detached: the policy gradient flows through the conditional branch
only); ``train_unconditional=True`` back-propagates through both branches (DDPO / Flow-GRPO train both, as one
batched call).

Zigzag / custom first transition: ``first_step(policy, x_T, cond, seeds) -> x`` (constructor argument, or per call
of :meth:`sample_batch`) replaces the state of the first stored transition: the chain starts from its return value,
and the first transition (state, action) = (x, x_{t_1}) is sampled and scored by the ordinary step. MVC-ZigAL's
zigzag sampling (domains.md §2 (b) 2) is such a hook: denoise ``x_T`` at high guidance (``policy.model_output(...,
scale=ω_high)`` and ``policy.step``), invert at low guidance, return the re-noised ``x̃_T``. Paired S/Z trajectories
from the same noise: call :meth:`sample_batch` twice with the same ``seeds``.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.policies.base import Policy, PolicyOutput, mix_weights_
from common.sampling.gaussian_step import (StepBuilder, gaussian_step_entropy, gaussian_step_kl, gaussian_step_logprob,
                                           seeded_normal)

FirstStep = Callable[["DiffusionSamplerPolicy", Tensor, Tensor, Tensor], Tensor]


class ClassifierFreeGuidance:
    """``ε̂ = ε_u + scale · (ε_c − ε_u)`` in rollout and in the log-probs (module docstring).

    Args:
        scale: w (DDPO 5, Flow-GRPO 4.5, MVC-ZigAL 7); 1 = conditional only (the unconditional call is skipped).
        train_unconditional: back-propagate through the unconditional branch too; False = it is detached
            (computed under ``no_grad``), the gradient flows through the conditional branch only.
    """

    def __init__(self, scale: float = 4.5, train_unconditional: bool = False):
        if not math.isfinite(scale):
            raise ValueError(f"ClassifierFreeGuidance: scale must be finite, got {scale}")
        self.scale, self.train_unconditional = float(scale), bool(train_unconditional)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale}, train_unconditional={self.train_unconditional})"


class HashPromptEmbedding:
    """A frozen text "encoder" for tests and toy runs: each prompt maps to a fixed standard-normal vector seeded by
    the CRC32 of its text (the empty prompt maps to zeros, the unconditional embedding). Shapes: (P,) texts ->
    (P, *shape)."""

    def __init__(self, shape: Sequence[int] = (1, 16), dtype: torch.dtype = torch.float32):
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype

    def encode(self, texts: Sequence[str]) -> Tensor:
        seeds = torch.tensor([zlib.crc32(t.encode()) for t in texts], dtype=torch.long)  # (P,)
        z = seeded_normal(seeds, 0, self.shape, self.dtype)  # (P, *shape)
        empty = torch.tensor([t == "" for t in texts]).view(-1, *([1] * len(self.shape)))
        return z.masked_fill(empty, 0.0)


class DiffusionSamplerPolicy(Policy):
    """A denoiser + a step builder as a policy over K Gaussian transitions (module docstring).

    Args:
        denoiser: a diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` or any module called as
            ``denoiser(x (N, C, H, W), timesteps (N,), **{condition_kwarg: cond (N, ...)})`` returning a tensor or an
            object with ``.sample``. Put in eval mode (no dropout: the first ratio must be exactly 1).
        step: the step builder (``common.sampling.gaussian_step.DDIMStep`` / ``LCMStep`` / ``FlowSDEStep``).
        encoder: the frozen text encoder: an object with ``encode(texts) -> (P, ...)`` (e.g.
            ``retrieval.embedding.MiniLMEncoder``) or a callable ``texts -> (P, ...)``; its output is what the
            denoiser takes per row (use ``add_token_dim`` for (P, D) embeddings into cross-attention). Not part of the
            policy's parameters or state dict.
        sample_shape: (C, H, W) of the latents.
        guidance: None (conditional only) or a :class:`ClassifierFreeGuidance`.
        condition_kwarg: the denoiser's keyword for the conditioning (``encoder_hidden_states`` for
            UNet2DConditionModel; ``class_labels`` for a UNet2DModel with ``class_embed_type="identity"``).
        add_token_dim: reshape (P, D) embeddings to (P, 1, D) (a sequence of one token for cross-attention).
        negative_prompt: the text of the unconditional branch.
        prompt_key: the prompt records' text field.
        first_step: optional hook replacing the first transition's state (module docstring).
        row_invariant: evaluate the denoiser per row in ``forward`` (bit-identical log-probs for any micro-batching).
    """

    provides = ("seeds", "behaviour_logprobs")

    def __init__(self, denoiser: nn.Module, step: StepBuilder, encoder: Any, sample_shape: Sequence[int],
                 guidance: ClassifierFreeGuidance | None = None, condition_kwarg: str = "encoder_hidden_states",
                 add_token_dim: bool = False, negative_prompt: str = "", prompt_key: str = "prompt",
                 first_step: FirstStep | None = None, row_invariant: bool = True):
        super().__init__()
        problems = []
        if not isinstance(denoiser, nn.Module):
            problems.append(f"denoiser must be an nn.Module, got {type(denoiser).__name__}")
        if not isinstance(step, StepBuilder):
            problems.append(f"step must be a common.sampling.gaussian_step.StepBuilder, got {type(step).__name__}")
        if not (hasattr(encoder, "encode") or callable(encoder)):
            problems.append(f"encoder must have encode(texts) or be callable, got {type(encoder).__name__}")
        if len(sample_shape) < 1 or any(int(s) < 1 for s in sample_shape):
            problems.append(f"sample_shape must be positive sizes (C, H, W), got {tuple(sample_shape)}")
        if guidance is not None and not isinstance(guidance, ClassifierFreeGuidance):
            problems.append(f"guidance must be None or a ClassifierFreeGuidance, got {type(guidance).__name__}")
        if problems:
            raise ValueError("DiffusionSamplerPolicy: " + "; ".join(problems))
        self.denoiser = denoiser.eval()
        self.step = step
        self.__dict__["encoder"] = encoder  # frozen, not a submodule: not trained, not checkpointed, not copied
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.guidance, self.condition_kwarg, self.add_token_dim = guidance, condition_kwarg, add_token_dim
        self.negative_prompt, self.prompt_key = negative_prompt, prompt_key
        self.first_step, self.row_invariant = first_step, row_invariant
        self.reference: nn.Module | None = None
        self.horizon = step.num_steps
        self._uncond: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.step.num_steps

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ------------------------------------------------------------------ conditioning and the denoiser
    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """Prompt embeddings on the denoiser's device and dtype. Shapes: (P,) texts -> (P, ...)."""
        fn = self.encoder.encode if hasattr(self.encoder, "encode") else self.encoder
        z = torch.as_tensor(fn(list(texts)))
        z = z.unsqueeze(1) if self.add_token_dim else z
        return z.to(device=self.device, dtype=self.dtype)

    def unconditional(self) -> Tensor:
        """The negative prompt's embedding (1, ...), encoded once."""
        if self._uncond is None or self._uncond.device != self.device or self._uncond.dtype != self.dtype:
            self._uncond = self.encode([self.negative_prompt])
        return self._uncond

    def _call(self, net: nn.Module, x: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        t = self.step.model_timesteps.to(device=x.device, dtype=x.dtype)[k]  # (N,)
        out = net(x, t, **{self.condition_kwarg: cond})
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)

    def model_output(self, x: Tensor, k: Tensor, cond: Tensor, *, reference: bool = False,
                     scale: float | None = None) -> Tensor:
        """The (guided) denoiser output at states ``x`` of steps ``k``. ``scale`` overrides the guidance scale for
        one call (zigzag's ω_high / ω_low; 0 = unconditional only, 1 = conditional only); the gradient rules are
        the policy's (:class:`ClassifierFreeGuidance`). Shapes: x (N, C, H, W), k (N,) long, cond (N, ...) -> (N, C, H, W)."""
        net = self.reference if reference else self.denoiser
        if reference and net is None:
            raise RuntimeError("DiffusionSamplerPolicy: reference log-probs asked for before enable_reference()")
        g = self.guidance
        w = scale if scale is not None else (g.scale if g is not None else 1.0)
        if w == 1.0:
            return self._call(net, x, k, cond)
        uncond = self.unconditional().expand(x.shape[0], *self.unconditional().shape[1:])  # (N, ...)
        if w == 0.0:
            return self._call(net, x, k, uncond)
        if g is not None and g.train_unconditional:  # one batched call, gradient through both branches
            both = self._call(net, torch.cat([x, x]), torch.cat([k, k]), torch.cat([cond, uncond]))
            eps_c, eps_u = both.chunk(2)
        else:
            eps_c = self._call(net, x, k, cond)
            with torch.no_grad():
                eps_u = self._call(net, x, k, uncond)
        return eps_u + w * (eps_c - eps_u)

    # ------------------------------------------------------------------ rollout
    def prompt_texts(self, prompts: Sequence[Any]) -> list[str]:
        return [p if isinstance(p, str) else str(p[self.prompt_key]) for p in prompts]

    def rollout(self, prompts: Sequence[Any], n: int, *, greedy: bool = False) -> RolloutBatch:
        """n trajectories per prompt (records with a ``prompt_key`` text, or strings); group id = prompt index."""
        cond = self.encode(self.prompt_texts(prompts)).repeat_interleave(n, 0)  # (B, ...)
        B = cond.shape[0]
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(n)  # (B,)
        seeds = torch.randint(0, 2**62, (B,), device=self.device)  # (B,) the rows' noise, recorded
        samples = [dict(p) if isinstance(p, dict) else {self.prompt_key: p} for p in prompts for _ in range(n)]
        return self.sample_batch(cond, seeds, group_ids, samples, greedy=greedy)

    @torch.no_grad()
    def sample_batch(self, cond: Tensor, seeds: Tensor, group_ids: Tensor | None = None,
                     samples: list[dict] | None = None, *, greedy: bool = False,
                     first_step: FirstStep | None = None) -> RolloutBatch:
        """Sample one trajectory per row from its seed (same seeds -> same x_T and same step noises).

        Args:
            cond: (B, ...) prompt embeddings (:meth:`encode`).
            seeds: (B,) long.
            group_ids: (B,) long (default: one group per row).
            samples: (B,) prompt records for the rewards.
            greedy: the mean of every step (no noise); log-probs are then those of the means.
            first_step: overrides the constructor's hook for this call (module docstring).
        Returns the RolloutBatch of the module docstring."""
        B, K, dev = cond.shape[0], self.num_steps, self.device
        if seeds.shape != (B,):
            raise ValueError(f"sample_batch: seeds must be (B,) = ({B},), got {tuple(seeds.shape)}")
        seeds = seeds.to(dev)
        hook = first_step if first_step is not None else self.first_step
        x = seeded_normal(seeds, 0, self.sample_shape, self.dtype).to(dev)  # (B, C, H, W) x_T
        if hook is not None:
            x = hook(self, x, cond, seeds)
            if x.shape != (B, *self.sample_shape):
                raise ValueError(f"first_step must return the state's shape {(B, *self.sample_shape)}, got {tuple(x.shape)}")
        x_init, actions, logps = x, [], []
        images = x
        for k in range(K):  # ok: the chain is sequential in k, vectorised over the batch
            kk = torch.full((B,), k, dtype=torch.long, device=dev)
            out = self.model_output(x, kk, cond)  # (B, C, H, W)
            mean, std = self.step.stats(out, x, kk)
            x_next = mean if greedy else mean + std * seeded_normal(seeds, k + 1, self.sample_shape, self.dtype).to(dev)
            logps.append(gaussian_step_logprob(x_next, mean, std))  # (B,)
            if k == K - 1:
                images = self.step.output(out, x, kk, x_next)
            actions.append(x_next)
            x = x_next
        a = torch.stack(actions, 1)  # (B, K, C, H, W)
        lp = torch.stack(logps, 1)  # (B, K)
        if not bool(torch.isfinite(lp).all()):
            raise FloatingPointError("DiffusionSamplerPolicy: a sampled transition has a non-finite log-prob")
        timesteps = self.step.model_timesteps.to(dev, self.dtype).expand(B, K)
        return RolloutBatch(
            completion_ids=a, completion_mask=torch.ones(B, K, dtype=torch.bool, device=dev),
            group_ids=group_ids if group_ids is not None else torch.arange(B, device=dev),
            inputs={"x_init": x_init, "cond": cond, "images": images, "timesteps": timesteps.contiguous()},
            seeds=seeds, behaviour_logprobs=lp, samples=samples or [])

    # ------------------------------------------------------------------ log-probs
    @staticmethod
    def states(batch: RolloutBatch) -> Tensor:
        """[x_init, x_{t_1}, ..., x_{t_{K−1}}]: the state of each transition. Shapes: -> (B, K, C, H, W)."""
        a = batch.completion_ids
        return torch.cat([batch.inputs["x_init"][:, None], a[:, :-1]], 1)

    def step_stats(self, x: Tensor, k: Tensor, cond: Tensor, reference: bool = False) -> tuple[Tensor, Tensor]:
        """(μ, σ) of the steps at states ``x``. Shapes: (N, C, H, W), (N,), (N, ...) -> (N, C, H, W), (N, 1, 1, 1)."""
        return self.step.stats(self.model_output(x, k, cond, reference=reference), x, k)

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """log π(x_{t_{k+1}} | x_{t_k}) and the step entropies (mean over dimensions) for the K stored transitions of
        every row, recomputed under the current (or reference) weights. Shapes: -> (B, K), (B, K), 0 off the mask."""
        a, m = batch.completion_ids, batch.completion_mask  # (B, K, C, H, W), (B, K)
        B, K = m.shape
        s = self.states(batch)  # (B, K, C, H, W)
        cond = batch.inputs["cond"]  # (B, ...)
        steps = torch.arange(K, device=a.device)  # (K,)
        if self.row_invariant:  # one denoiser call per row, on that row's K states: batch-invariant by construction
            # fresh (allocator-aligned) copies: BLAS kernels may take other paths on differently aligned data
            mean, std = zip(*(self.step_stats(s[b].clone(), steps, cond[b:b + 1].expand(K, *cond.shape[1:]).clone(),
                                              reference)
                              for b in range(B)))  # ok: per-row calls, each vectorised over the K steps
            mean, std = torch.stack(mean), torch.stack(std)  # (B, K, C, H, W), (B, K, 1, 1, 1)
        else:
            flat_cond = cond.repeat_interleave(K, 0)  # (B·K, ...)
            mean, std = self.step_stats(s.flatten(0, 1), steps.repeat(B), flat_cond, reference)
            mean, std = mean.view(a.shape), std.view(B, K, *std.shape[1:])
        lp = gaussian_step_logprob(a.flatten(0, 1), mean.flatten(0, 1), std.flatten(0, 1)).view(B, K)
        ent = gaussian_step_entropy(std.flatten(0, 1), a.flatten(0, 1)).view(B, K)
        return PolicyOutput(lp * m, ent * m)

    @torch.no_grad()
    def step_kl(self, batch: RolloutBatch) -> Tensor:
        """Closed-form KL(π_θ(·|x_{t_k}) ‖ π_ref(·|x_{t_k})) of every stored step, mean over dimensions
        (``gaussian_step_kl``; both share the schedule's σ, so it is mean (μ − μ_ref)² / (2σ²)): an exact,
        sample-free KL-to-reference tripwire for logging. Shapes: -> (B, K), 0 off the mask."""
        m = batch.completion_mask  # (B, K)
        B, K = m.shape
        s = self.states(batch).flatten(0, 1)  # (B·K, C, H, W)
        k = torch.arange(K, device=s.device).repeat(B)
        cond = batch.inputs["cond"].repeat_interleave(K, 0)
        mean, std = self.step_stats(s, k, cond)
        mean_ref, std_ref = self.step_stats(s, k, cond, reference=True)
        return gaussian_step_kl(mean, std, mean_ref, std_ref).view(B, K) * m

    # ------------------------------------------------------------------ parameters and reference
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def enable_reference(self) -> None:
        if self.reference is None:
            self.reference = copy.deepcopy(self.denoiser).eval().requires_grad_(False)

    def refresh_reference(self, alpha: float = 1.0, *, dry_run: bool = False) -> None:
        if self.reference is None:
            raise RuntimeError("DiffusionSamplerPolicy: refresh_reference() called before enable_reference()")
        if not dry_run:
            mix_weights_(self.reference, self.denoiser, alpha)

    def extra_repr(self) -> str:
        return (f"step={type(self.step).__name__}, K={self.num_steps}, sample_shape={self.sample_shape}, "
                f"guidance={self.guidance}, row_invariant={self.row_invariant}")


__all__ = ["DiffusionSamplerPolicy", "ClassifierFreeGuidance", "HashPromptEmbedding"]
