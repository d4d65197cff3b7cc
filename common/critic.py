"""A value head on a language model's hidden states: the critic of T-PPO and of step-level DAPO.

    V_φ(s_t) = w·h_t + b                     linear head (hidden = 0)
    V_φ(s_t) = w₂·tanh(W₁ h_t + b₁) + b₂       one hidden layer (hidden > 0)

``h_t (…, H)`` is the last-layer hidden state after the prompt and the first t completion tokens (the state
s_t), as ``CausalLMPolicy.forward(batch, hidden=True)`` returns it. The output layer starts at zero, so an
untrained critic predicts V = 0 everywhere (then GAE with λ = 1, γ = 1 is plain REINFORCE on the outcome).
It is an ``nn.Module``: its weights are in the Lightning checkpoint with the policy's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """Scalar value of each hidden state. Shapes: (..., H) -> (...).

    Args:
        hidden_size: H, the width of the hidden states it reads.
        hidden: width of one tanh hidden layer (0 = a linear head).
    """

    def __init__(self, hidden_size: int, hidden: int = 0):
        super().__init__()
        if hidden_size < 1 or hidden < 0:
            raise ValueError(f"hidden_size must be >= 1 and hidden >= 0, got hidden_size={hidden_size}, hidden={hidden}")
        layers: list[nn.Module] = [nn.Linear(hidden_size, hidden), nn.Tanh()] if hidden else []
        out = nn.Linear(hidden or hidden_size, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.net(hidden_states.to(self.net[-1].weight.dtype)).squeeze(-1)


def value_loss(values: Tensor, targets: Tensor, mask: Tensor, num_tokens: Tensor) -> Tensor:
    """Half squared error on the masked tokens, summed and divided by ``num_tokens`` (the optimiser batch's
    count, so micro-batches sum to the full-batch value): ½ Σ m (V − G)² / N. Shapes: (B, T) x3, () -> ()."""
    if values.shape != targets.shape or values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)}, targets {tuple(targets.shape)} and mask {tuple(mask.shape)} "
                         "must all be (B, T)")
    err = torch.where(mask, values - targets, torch.zeros_like(values))  # (B, T); no gradient off the mask
    return 0.5 * err.pow(2).sum() / num_tokens
