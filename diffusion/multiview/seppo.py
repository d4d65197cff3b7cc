"""SePPO: semi-policy preference optimisation for diffusion models (reference checkpoints as losers).

Zhang et al., "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment" (arXiv 2410.05255; v2 "Bridging
SFT and DPO for Diffusion Model Alignment with Self-Sampling Preference Optimization"). Spec:
shared/methods/domains.md §3 (read through reviews of the paper; the training code is not released). Only winning
images x^w are given; the loser of each pair is a sample x^ref of a *previous checkpoint* θ_ref, drawn uniformly
from a ring of saved checkpoints, which is also the DPO reference model. With the Diffusion-DPO denoising error
e_m(x) = mean_pixels ‖ε − ε_m(x_t, t, c)‖², x_t = √ᾱ_t x + √(1−ᾱ_t) ε, one (t, ε) shared by the four terms of a pair:

    sign = +1 if e_θ(x^w) ≤ e_ref(x^w) else −1         (anchor-based adaptive flipper, AAF; no gradient)
    L    = −log σ( −β T ω(λ_t) [ (e_θ(x^w) − e_ref(x^w)) − sign · (e_θ(x^ref) − e_ref(x^ref)) ] )

The flipper: if the current model denoises the anchor (the winning image) at least as well as the reference, the
reference's sample is likely worse, so it is a loser (sign +1, the Diffusion-DPO term); otherwise it is treated
as a winner too (sign −1). ``flip="indicator"`` drops the reference term instead (sign 0; the paper's variant).
``flip="off"`` keeps sign ≡ +1 (the "w/o AAF" ablation). ``half=True`` puts Diffusion-DPO's ½ inside the sigmoid
(Wallace et al. 2023, arXiv 2311.12908, code ``-0.5 * beta_dpo``). β = 2000, T = 1000, ω ≡ 1 in the spec.

The ring (:class:`CheckpointRing`) holds up to K flat copies of the trainable weights as one (K, P) buffer plus
counters, so it is in the Lightning checkpoint and a resumed run draws from the same references. θ_0 (the initial
model) is saved at start; afterwards every ``every`` updates the current weights are saved, overwriting the oldest
once K are held (the spec keeps "up to K = 7"; which one is dropped when full is not stated: the oldest here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput, PolicyLoss
from common.methods.base import Method
from common.ops import seeded_uniform
from common.sampling.gaussian_step import seeded_normal

if TYPE_CHECKING:
    from common.loop import Loop

FLIPS = ("aaf", "indicator", "off")


def denoising_error(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """e = mean over every non-batch dim of (ε − ε̂)². (B, ...) x2 -> (B,)."""
    if eps_pred.shape != eps.shape:
        raise ValueError(f"denoising_error: eps_pred {tuple(eps_pred.shape)} and eps {tuple(eps.shape)} must match")
    return (eps - eps_pred).pow(2).flatten(1).mean(1)


def aaf_sign(err_w: Tensor, ref_err_w: Tensor, flip: Literal["aaf", "indicator", "off"] = "aaf") -> Tensor:
    """The anchor-based flipper's sign (B,): +1 where the current model fits the anchor at least as well as the
    reference (e_θ(x^w) ≤ e_ref(x^w), ties included), else −1 ("aaf") or 0 ("indicator"); all +1 for "off"."""
    if err_w.shape != ref_err_w.shape or err_w.dim() != 1:
        raise ValueError(f"aaf_sign: err_w {tuple(err_w.shape)} and ref_err_w {tuple(ref_err_w.shape)} must both be (B,)")
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    better = (err_w <= ref_err_w).to(err_w.dtype)  # (B,)
    if flip == "aaf":
        return 2 * better - 1
    if flip == "indicator":
        return better
    return torch.ones_like(err_w)


def seppo_losses(err_w: Tensor, ref_err_w: Tensor, err_l: Tensor, ref_err_l: Tensor, sign: Tensor, *,
                 beta: float = 2000.0, num_timesteps: int = 1000, weight: Tensor | float = 1.0,
                 half: bool = False) -> Tensor:
    """Per-pair SePPO loss (B,) from the four denoising errors (B,) and the sign (B,) (module docstring)."""
    shapes = {tuple(t.shape) for t in (err_w, ref_err_w, err_l, ref_err_l, sign)}
    if len(shapes) != 1 or err_w.dim() != 1:
        raise ValueError(f"seppo_losses: the four errors and the sign must all be (B,), got shapes {sorted(shapes)}")
    scale = beta * num_timesteps * (0.5 if half else 1.0)
    inner = -scale * weight * ((err_w - ref_err_w) - sign.detach() * (err_l - ref_err_l))  # (B,)
    return -F.logsigmoid(inner)


class CheckpointRing(nn.Module):
    """Up to ``size`` past copies of the trainable weights (flattened, one row each), checkpointed (module docstring).

    Args:
        size: K, the most checkpoints held (spec 7).
        every: updates between saves (spec 30).
    """

    def __init__(self, size: int = 7, every: int = 30):
        super().__init__()
        problems = []
        for name, v in (("size", size), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if problems:
            raise ValueError("CheckpointRing: " + "; ".join(problems))
        self.size, self.every = size, every
        self.register_buffer("slots", torch.zeros(size, 0))  # (K, P) flat weights; P set by bind()
        self.register_buffer("saved", torch.zeros((), dtype=torch.long))  # saves so far (θ_0 included)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # updates counted by step()
        self.register_buffer("ages", torch.zeros(size, dtype=torch.long))  # update count at which each slot was saved

    @property
    def held(self) -> int:
        return min(int(self.saved), self.size)  # ok: a host read of a counter, once per step

    def bind(self, params: Sequence[nn.Parameter]) -> None:
        """Size the ring for ``params`` (before a checkpoint is loaded into it); a no-op when already sized."""
        n = sum(p.numel() for p in params)
        if self.slots.shape[1] != n:
            ref = params[0]
            self.slots = torch.zeros(self.size, n, dtype=torch.float32, device=ref.device)

    @torch.no_grad()
    def save(self, params: Sequence[nn.Parameter]) -> None:
        """Write the current weights into the next slot (the oldest once the ring is full)."""
        flat = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).float()
        if flat.numel() != self.slots.shape[1]:
            raise ValueError(f"CheckpointRing.save: {flat.numel()} weights for a ring bound to {self.slots.shape[1]}; "
                             "call bind(params) with the same parameters first")
        slot = int(self.saved) % self.size  # ok: a host read of a counter
        self.slots[slot].copy_(flat.to(self.slots.device))
        self.ages[slot] = self.updates
        self.saved += 1

    def step(self, params: Sequence[nn.Parameter]) -> bool:
        """Count one update; save the weights when the count reaches a multiple of ``every``. Returns whether it saved."""
        self.updates += 1
        if int(self.updates) % self.every == 0:  # ok: a host read of a counter, once per update
            self.save(params)
            return True
        return False

    def draw(self, generator: torch.Generator | None = None) -> int:
        """j ~ U over the held checkpoints (the global torch RNG by default, which Lightning checkpoints)."""
        if int(self.saved) == 0:
            raise ValueError("CheckpointRing.draw: no checkpoint saved yet (save θ_0 at start)")
        return int(torch.randint(self.held, (), generator=generator))

    @torch.no_grad()
    def load_into(self, j: int, params: Sequence[nn.Parameter]) -> None:
        """Copy checkpoint ``j`` into ``params`` (in place; a frozen reference network's)."""
        if not 0 <= j < self.held:
            raise ValueError(f"CheckpointRing.load_into: j must be in [0, {self.held}), got {j}")
        torch.nn.utils.vector_to_parameters(self.slots[j].to(params[0].device, params[0].dtype), list(params))


class SePPOLoss(PolicyLoss):
    """SePPO's preference loss as the loop's policy loss. The method (:class:`SePPO`) computes the four denoising
    errors of each row in ``loss_inputs`` and passes them as ``seppo_errors`` (B, 4): e_θ(x^w), e_ref(x^w),
    e_θ(x^ref), e_ref(x^ref); the step log-probs the loop hands in are not used. Mean over the minibatch's rows.

    Args:
        beta: β (spec 2000, "as in Diffusion-DPO"; retune at small scale).
        num_timesteps: T of the β T factor (1000).
        flip: "aaf" (SePPO), "indicator" (drop the reference term when it fits the anchor better), "off" (w/o AAF).
        half: Diffusion-DPO's ½ inside the sigmoid.
    """

    def __init__(self, beta: float = 2000.0, num_timesteps: int = 1000, flip: Literal["aaf", "indicator", "off"] = "aaf",
                 half: bool = False):
        problems = []
        if not beta > 0:
            problems.append(f"beta must be > 0, got {beta}")
        if num_timesteps < 1:
            problems.append(f"num_timesteps must be >= 1, got {num_timesteps}")
        if flip not in FLIPS:
            problems.append(f"flip must be one of {FLIPS}, got {flip!r}")
        if problems:
            raise ValueError("SePPOLoss: " + "; ".join(problems))
        self.beta, self.num_timesteps, self.flip, self.half = float(beta), int(num_timesteps), flip, half

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch: RolloutBatch | None = None,
                 seppo_errors: Tensor | None = None) -> LossOutput:
        if seppo_errors is None or seppo_errors.dim() != 2 or seppo_errors.shape[1] != 4:
            raise ValueError("SePPOLoss needs seppo_errors (B, 4) from the SePPO method (list it under methods), got "
                             f"{None if seppo_errors is None else tuple(seppo_errors.shape)}")
        e_w, r_w, e_l, r_l = seppo_errors.unbind(1)  # (B,) each
        sign = aaf_sign(e_w.detach(), r_w.detach(), self.flip)
        per_row = seppo_losses(e_w, r_w, e_l, r_l, sign, beta=self.beta, num_timesteps=self.num_timesteps, half=self.half)
        norm = normaliser if normaliser is not None else Normaliser.of(mask)
        loss = per_row.sum() / norm.num_sequences
        d = seppo_errors.detach()
        return LossOutput(loss, {
            "seppo_loss": loss.detach(),
            "flip_frac": (sign < 1).float().sum() / norm.num_sequences,  # reference treated as a winner (or dropped)
            "winner_margin": (d[:, 1] - d[:, 0]).sum() / norm.num_sequences,  # e_ref(x^w) − e_θ(x^w)
            "loser_margin": (d[:, 3] - d[:, 2]).sum() / norm.num_sequences,
        })


def _timesteps_from_seeds(seeds: Tensor, num_timesteps: int, stream: int) -> Tensor:
    """A uniform timestep in [0, num_timesteps) per row, a pure function of its seed. (B,) -> (B,) long."""
    u = seeded_uniform(seeds, stream, (1,)).double()[:, 0]  # (B,) U[0, 1)
    return (u * num_timesteps).long().clamp(0, num_timesteps - 1)


class SePPO(Method):
    """SePPO's rollout and its errors (module docstring), over a ``DiffusionSamplerPolicy``.

    Each training step: draw j ~ U over the ring, load θ_j into the policy's reference network, sample the rows'
    reference images x^ref with θ_j (the policy's own sampler with its weights swapped in, without gradient, and
    restored exactly), and render the prompts' winning images x^w (``diffusion.multiview.data.render_samples`` in
    the ``winner_style``, seeded by the update count, so a resumed run renders the same). In the update, each row's
    four denoising errors e_θ(x^w), e_ref(x^w), e_θ(x^ref), e_ref(x^ref) at one (t, ε) drawn from the row's seed go
    to :class:`SePPOLoss` as ``seppo_errors``. After each update the ring counts it and saves every ``every``.

    Args:
        ring: the checkpoint ring (default ``CheckpointRing(7, 30)``).
        reference: "uniform" (SePPO), "first" (θ_0 always) or "latest" (the newest checkpoint; SPIN-like).
        winner_style: ``render_samples`` style of the winners ("winner": large, centred, saturated, jittered).
        num_train_timesteps, beta_start, beta_end: the DDPM training schedule of the ε-errors (the base's).
    """

    requires = ("seeds",)

    def __init__(self, ring: CheckpointRing | None = None, reference: Literal["uniform", "first", "latest"] = "uniform",
                 winner_style: str = "winner", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__()
        if reference not in ("uniform", "first", "latest"):
            raise ValueError(f"SePPO: reference must be 'uniform', 'first' or 'latest', got {reference!r}")
        self.ring = ring if ring is not None else CheckpointRing()
        self.reference, self.winner_style = reference, winner_style
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)  # (T,) DDPM linear
        self.register_buffer("last_ref", torch.zeros((), dtype=torch.long))  # the slot drawn this step

    def setup(self, loop: "Loop") -> None:
        problems = []
        if not isinstance(loop.loss, SePPOLoss):
            problems.append(f"the loss must be diffusion.multiview.seppo.SePPOLoss, got {type(loop.loss).__name__}")
        if not hasattr(loop.policy, "sample_batch") or not hasattr(loop.policy, "denoiser"):
            problems.append(f"the policy must be a DiffusionSamplerPolicy, got {type(loop.policy).__name__}")
        if problems:
            raise ValueError("SePPO: " + "; ".join(problems))
        params = loop.policy.trainable_parameters()
        loop.policy.enable_reference()  # the frozen copy that holds θ_ref (a submodule: checkpointed)
        self.ring.bind(params)
        if int(self.ring.saved) == 0:
            self.ring.save(params)  # θ_0 (a resumed run's ring is then loaded over it)

    def pick(self) -> int:
        if self.reference == "first":  # θ_0 sits in slot 0 until the ring wraps
            return 0 if int(self.ring.saved) <= self.ring.size else -1
        if self.reference == "latest":
            return (int(self.ring.saved) - 1) % self.ring.size
        return self.ring.draw()

    @torch.no_grad()
    def rollout(self, loop: "Loop", prompts, n: int) -> RolloutBatch:
        policy = loop.policy
        j = self.pick()
        if j < 0:
            raise ValueError("SePPO: reference='first' needs θ_0 in the ring, which a full ring has overwritten; "
                             "raise ring.size above the number of saves")
        params = policy.trainable_parameters()
        self.ring.load_into(j, list(policy.reference.parameters()))
        self.last_ref.fill_(j)
        current = torch.nn.utils.parameters_to_vector([p.detach() for p in params]).clone()
        self.ring.load_into(j, params)  # sample x^ref with θ_ref: the policy's own sampler, weights swapped in
        try:
            batch = policy.rollout(prompts, n)
        finally:
            torch.nn.utils.vector_to_parameters(current, params)  # restored exactly
        from diffusion.multiview.data import render_samples
        from diffusion.multiview.model import stack_views

        views = policy.sample_shape[0] // 3
        winners = stack_views(render_samples(batch.samples, views, self.winner_style, seed=int(self.ring.updates),
                                             size=policy.sample_shape[-1]))  # (B, C, H, W) in [-1, 1]
        return batch.replace(inputs={**batch.inputs, "winner": winners.to(batch.inputs["images"])})

    def errors(self, policy, micro: RolloutBatch) -> Tensor:
        """(b, 4) e_θ(x^w), e_ref(x^w), e_θ(x^ref), e_ref(x^ref) at the rows' (t, ε) (module docstring)."""
        x_w, x_l, cond = micro.inputs["winner"], micro.inputs["images"].detach(), micro.inputs["cond"]
        b = x_w.shape[0]
        t = _timesteps_from_seeds(micro.seeds, self.num_train_timesteps, stream=10_001)  # (b,)
        eps = seeded_normal(micro.seeds, 10_002, tuple(x_w.shape[1:]), x_w.dtype).to(x_w.device)  # (b, C, H, W)
        a = self.alphas_cumprod.to(x_w.device)[t.to(x_w.device)].to(x_w.dtype).view(-1, 1, 1, 1)
        x = torch.cat([a.sqrt() * x_w + (1 - a).sqrt() * eps, a.sqrt() * x_l + (1 - a).sqrt() * eps])  # (2b, C, H, W)
        tt, cc, ee = torch.cat([t, t]).to(x.device), torch.cat([cond, cond]), torch.cat([eps, eps])
        kw = policy.condition_kwarg

        def call(net):
            out = net(x, tt, **{kw: cc})
            return out.sample if hasattr(out, "sample") else out

        e_cur = denoising_error(call(policy.denoiser), ee)  # (2b,) with gradient
        with torch.no_grad():
            e_ref = denoising_error(call(policy.reference), ee)  # (2b,)
        return torch.stack([e_cur[:b], e_ref[:b], e_cur[b:], e_ref[b:]], 1)

    def loss_inputs(self, loop: "Loop", micro: RolloutBatch, out, inputs: dict) -> dict:
        return {"seppo_errors": self.errors(loop.policy, micro)}

    def after_update(self, loop: "Loop", batch: RolloutBatch) -> dict[str, Tensor]:
        self.ring.step(loop.policy.trainable_parameters())
        return {"seppo_ref_slot": self.last_ref.float(), "seppo_ring_held": torch.tensor(float(self.ring.held))}
