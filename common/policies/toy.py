"""Small policies that are not language models, trained by the same loop: a categorical policy over K actions
(contextual bandits) and a Gaussian policy over continuous actions with the shape of a diffusion sampler's chain.

``CategoricalPolicy``: one action per row, a ~ softmax(MLP(x) / τ), x the prompt's context (C,). With
``mask_prob > 0`` its log-probs are a *randomised estimate*, the shape of a masked-diffusion LM's one-step
estimator (d1 / IGPO: a random mask per inner iteration): log π̂(a | x) = log softmax(MLP(x ⊙ m / (1 − p)))_a with
m ~ Bernoulli(1 − p) drawn from the row's recorded seed and the inner epoch (``common.ops.seeded_uniform``), so old,
reference and current log-probs of one epoch share the mask whatever the micro-batch split.

``GaussianPolicy``: T steps of a D-dimensional chain, the shape of a diffusion sampler's denoising steps
(DDPO / Flow-GRPO treat each step as a Gaussian action):

    s_0 = x,   a_t ~ N(μ_θ(s_t, t), σ² I),   s_{t+1} = s_t + a_t                     (t = 0..T-1)
    log π(a_t | s_t) = −‖a_t − μ_θ(s_t, t)‖² / (2σ²) − D log σ − (D/2) log 2π          (σ = exp(log_std), learnable)

The states are a function of the context and the recorded actions (s_t = x + Σ_{u<t} a_u), so old, reference
and current log-probs are recomputed from what the batch records. Prompts are dicts with a ``"context"``
(a list of C floats); the context travels in ``batch.inputs["context"]`` (B, C).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.ops import seeded_uniform
from common.policies.base import Policy, PolicyOutput


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, out))


class _Logits(nn.Module):
    """A free logit vector (K,), the same for every context (a multi-armed bandit). Shapes: (B, 0) -> (B, K)."""

    def __init__(self, num_actions: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_actions))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


class _MeanStd(nn.Module):
    """μ_θ(s, t) and a learnable log σ: one module, so the frozen reference copies both."""

    def __init__(self, dim: int, hidden: int, init_log_std: float):
        super().__init__()
        self.mu = _mlp(dim + 1, hidden, dim)
        self.log_std = nn.Parameter(torch.tensor(float(init_log_std)))


def contexts(prompts: Sequence[dict], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The prompts' contexts as a (P, C) tensor."""
    return torch.as_tensor([list(p["context"]) for p in prompts], dtype=dtype, device=device)


class _ToyPolicy(Policy):
    """What the toy policies share: a network ``net``, a frozen reference copy on demand, rollout layout."""

    net: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def enable_reference(self) -> None:
        if getattr(self, "reference", None) is None:
            self.reference = copy.deepcopy(self.net).requires_grad_(False)

    def _layout(self, prompts: Sequence[dict], n: int) -> tuple[Tensor, Tensor, list[dict]]:
        x = contexts(prompts, self.device, self.dtype).repeat_interleave(n, 0)  # (B, C): row p·n + j is sample j of p
        group_ids = torch.arange(len(prompts), device=self.device).repeat_interleave(n)  # (B,)
        return x, group_ids, [dict(p) for p in prompts for _ in range(n)]


class CategoricalPolicy(_ToyPolicy):
    """A contextual-bandit policy: a ~ softmax(MLP(x) / temperature) over ``num_actions`` actions (T = 1).

    Args:
        context_dim: C, the context size; 0 = a context-free (multi-armed) bandit whose policy is a free logit
            vector ``logits`` (K,) rather than an MLP.
        num_actions: K.
        hidden: width of the MLP's hidden layer.
        temperature: τ of sampling and of the log-probs.
        mask_prob: p of the randomised log-prob estimate (module docstring); 0 = exact log-probs.
        seed: initialisation seed.
    """

    def __init__(self, context_dim: int = 4, num_actions: int = 4, hidden: int = 32, temperature: float = 1.0,
                 mask_prob: float = 0.0, seed: int = 0):
        super().__init__()
        if context_dim < 0 or num_actions < 2 or hidden < 1 or temperature <= 0 or not 0 <= mask_prob < 1:
            raise ValueError(f"CategoricalPolicy needs context_dim >= 0, num_actions >= 2, hidden >= 1, temperature > 0, "
                             f"0 <= mask_prob < 1; got {context_dim}, {num_actions}, {hidden}, {temperature}, {mask_prob}")
        self.mask_prob = mask_prob
        self.epoch_dependent = mask_prob > 0  # old log-probs are then computed per inner epoch
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = _mlp(context_dim, hidden, num_actions) if context_dim else _Logits(num_actions)
        self.temperature, self.reference = temperature, None
        self.horizon = 1

    def log_softmax(self, x: Tensor, reference: bool = False) -> Tensor:  # (B, C) -> (B, K)
        net = self.reference if reference else self.net
        return (net(x) / self.temperature).log_softmax(-1)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        x, group_ids, samples = self._layout(prompts, n)
        logp = self.log_softmax(x)  # (B, K)
        a = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)  # (B,)
        seeds = torch.randint(0, 2**62, a.shape, device=a.device)  # (B,) the estimator's randomness, recorded
        return RolloutBatch(completion_ids=a[:, None], completion_mask=torch.ones_like(a[:, None], dtype=torch.bool),
                            group_ids=group_ids, inputs={"context": x}, samples=samples, seeds=seeds,
                            behaviour_logprobs=logp.gather(1, a[:, None]))

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        x = batch.inputs["context"]  # (B, C)
        if self.mask_prob > 0:  # m ~ Bernoulli(1 − p) from (row seed, epoch): the same draw for old / ref / current
            keep = seeded_uniform(batch.seeds, epoch, x.shape[1:]) >= self.mask_prob  # (B, C)
            x = x * keep.to(x.dtype) / (1 - self.mask_prob)
        logp = self.log_softmax(x, reference)  # (B, K)
        lp = logp.gather(1, batch.completion_ids)  # (B, 1)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)  # (B, 1)
        m = batch.completion_mask
        return PolicyOutput(lp * m, entropy * m)


class GaussianPolicy(_ToyPolicy):
    """A Gaussian policy over a T-step chain of D-dimensional actions (module docstring).

    Args:
        dim: D, the state and action size (the context size too).
        steps: T, actions per rollout.
        hidden: width of the mean network's hidden layer.
        init_log_std: log σ at initialisation (σ is learnable, shared by every step and dimension).
        seed: initialisation seed.
    """

    def __init__(self, dim: int = 2, steps: int = 4, hidden: int = 32, init_log_std: float = -1.0, seed: int = 0):
        super().__init__()
        if dim < 1 or steps < 1 or hidden < 1:
            raise ValueError(f"GaussianPolicy needs dim >= 1, steps >= 1, hidden >= 1; got {dim}, {steps}, {hidden}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = _MeanStd(dim, hidden, init_log_std)  # μ_θ(s_t, t / T), log σ
        self.dim, self.steps, self.reference = dim, steps, None
        self.horizon = steps

    def mean(self, states: Tensor, reference: bool = False) -> Tensor:  # (B, T, D) -> (B, T, D)
        t = torch.arange(states.shape[1], device=states.device, dtype=states.dtype) / self.steps  # (T,)
        net = self.reference if reference else self.net
        return net.mu(torch.cat([states, t[None, :, None].expand(*states.shape[:2], 1)], -1))

    @torch.no_grad()
    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        x, group_ids, samples = self._layout(prompts, n)  # (B, D)
        s, actions = x, []
        for t in range(self.steps):  # ok: the chain is sequential in t, vectorised over the batch
            mu = self.mean(s[:, None])[:, 0]  # (B, D)
            a = mu if greedy else mu + self.net.log_std.exp() * torch.randn_like(mu)
            actions.append(a)
            s = s + a
        a = torch.stack(actions, 1)  # (B, T, D)
        batch = RolloutBatch(completion_ids=a, completion_mask=torch.ones(a.shape[:2], dtype=torch.bool, device=a.device),
                             group_ids=group_ids, inputs={"context": x}, samples=samples)
        return batch.replace(behaviour_logprobs=self(batch).logprobs)

    def states(self, batch: RolloutBatch) -> Tensor:
        """s_t = x + Σ_{u<t} a_u for t = 0..T-1. Shapes: -> (B, T, D)."""
        a = batch.completion_ids  # (B, T, D)
        return batch.inputs["context"][:, None] + a.cumsum(1) - a

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        a, m = batch.completion_ids, batch.completion_mask  # (B, T, D), (B, T)
        mu = self.mean(self.states(batch), reference)  # (B, T, D)
        log_std = (self.reference if reference else self.net).log_std  # ()
        lp = (-(a - mu).pow(2).sum(-1) / (2 * (2 * log_std).exp()) - self.dim * log_std
              - 0.5 * self.dim * math.log(2 * math.pi))  # (B, T)
        entropy = (self.dim * (log_std + 0.5 * math.log(2 * math.pi * math.e))).expand_as(lp)  # (B, T)
        return PolicyOutput(lp * m, entropy * m)


class _Table(nn.Module):
    """A free logit table θ (num_prompts, K)."""

    def __init__(self, num_prompts: int, num_actions: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_prompts, num_actions))


class TabularPolicy(_ToyPolicy):
    """One free logit row per prompt, θ (num_prompts, K): π(a | prompt i) = softmax(θ_i)_a (a bandit per prompt; T = 1).

    Prompts are dicts with an ``"index"`` i in [0, num_prompts); the row's index travels in ``batch.inputs["prompt"]``
    (B,), so rows a replay buffer brings back are scored under the current θ. Row p·n + j is draw j of prompt p, drawn
    with replacement from ``generator`` (a script's own stream) or the global RNG (``generator`` None).

    Args:
        num_prompts: rows of θ.
        num_actions: K.
    """

    def __init__(self, num_prompts: int = 8, num_actions: int = 4):
        super().__init__()
        if num_prompts < 1 or num_actions < 2:
            raise ValueError(f"TabularPolicy needs num_prompts >= 1 and num_actions >= 2, got {num_prompts}, {num_actions}")
        self.net, self.reference, self.horizon = _Table(num_prompts, num_actions), None, 1
        self.generator: torch.Generator | None = None

    @property
    def logits(self) -> Tensor:  # (num_prompts, K) θ
        return self.net.logits

    @torch.no_grad()
    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        idx = torch.tensor([p["index"] for p in prompts], device=self.device)  # (P,)
        probs = torch.softmax(self.logits[idx], 1)  # (P, K)
        a = (probs.argmax(1, keepdim=True).expand(-1, n) if greedy
             else torch.multinomial(probs, n, replacement=True, generator=self.generator)).flatten()  # (B,)
        return RolloutBatch(completion_ids=a[:, None], completion_mask=torch.ones(a.shape[0], 1, dtype=torch.bool, device=a.device),
                            group_ids=torch.arange(len(prompts), device=a.device).repeat_interleave(n),
                            inputs={"prompt": idx.repeat_interleave(n)}, samples=[dict(p) for p in prompts for _ in range(n)],
                            completions=[str(int(x)) for x in a])

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        table = (self.reference if reference else self.net).logits
        logp = torch.log_softmax(table[batch.inputs["prompt"]], 1)  # (B, K)
        m = batch.completion_mask  # (B, 1)
        return PolicyOutput(logp.gather(1, batch.completion_ids) * m, -(logp.exp() * logp).sum(-1, keepdim=True) * m)
