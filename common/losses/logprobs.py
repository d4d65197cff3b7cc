"""Log-probabilities and entropies of sampled tokens without a float32 ``log_softmax`` over ``(B, T, V)``.

Naive reference (what this module equals, to float rounding)::

    logits = hidden @ W.T / temperature                            # (N, V) float32
    logp   = logits.log_softmax(-1).gather(-1, targets[:, None])   # (N,)
    H      = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)

Here the rows are processed in chunks of ``chunk_size``. Two kernels compute the gradients (``kernel``):

- ``"fused"`` (:mod:`common.losses.fused_logprobs`): one float32 (N, V) log-softmax is kept from the forward
  pass and the gradients of both outputs are formed from it chunk by chunk in the backward pass: three matmuls,
  as many as the plain computation, and one (N, V) block instead of the plain computation's ~five.
- ``"chunked"``: each chunk's graph is kept, or, with ``recompute``, each chunk is wrapped in activation
  checkpointing so neither pass holds more than one ``(chunk_size, V)`` block of logits: O(chunk_size·V)
  memory for one extra chunk matmul in the backward (~1.5x the plain time on CPU).
- ``"auto"`` (default): the fused kernel for as many rows as fit ``_RECOMPUTE_ABOVE_BYTES`` of stored float32
  log-softmax, the checkpointed chunks for the rest: no extra matmul while the batch fits the budget, bounded
  memory beyond it (the extra matmul only for the rows past the budget). A float64 head (a reference
  computation) takes the chunks, whose gradients autograd accumulates in float64.
Only the rows that are needed (completion positions) are passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from common.losses.fused_logprobs import block_rows, fused_token_logprobs, token_logprobs_no_grad

# Above this size of float32 logits for the whole batch (N·V·4 bytes), chunks are recomputed in the backward
# pass instead of kept: 1 GiB is ~5,400 rows of SmolLM2's 49,152-token vocabulary. The "auto" kernel keeps the
# fused kernel's stored log-softmax within the same budget.
_RECOMPUTE_ABOVE_BYTES = 1 << 30
KERNELS = ("auto", "fused", "chunked")


def _chunk_logprobs_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float):
    logits = F.linear(hidden, weight, bias).float() * inv_temp  # (n, V) float32
    logp_all = torch.log_softmax(logits, dim=-1)  # (n, V)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    # H = −Σ p log p on the normalised log-probs: lse − Σ p·logit would cancel two large numbers in float32
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (n,)
    return logp, entropy


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    recompute: bool | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Log-prob and entropy of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    ``kernel`` picks how gradients are computed (module docstring): "auto" (default: fused up to the memory
    budget, checkpointed chunks beyond), "fused" (all rows fused: N·V·4 bytes kept) or "chunked". Passing
    ``recompute`` explicitly with "auto" selects "chunked" (the behaviour before the fused kernel existed).

    ``recompute`` wraps each chunk in activation checkpointing (logits are recomputed in the backward pass:
    O(chunk·V) memory for one extra chunk matmul); None = only when the float32 logits of all N rows would
    exceed ``_RECOMPUTE_ABOVE_BYTES``, so small batches do not pay the extra matmul.
    Shapes: hidden (N, H), weight (V, H), targets (N,) -> logprobs (N,) float32, entropy (N,) float32.
    Gradients flow to ``hidden`` and ``weight`` through both outputs.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[1]} (hidden's), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move both to one device")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    inv_temp = 1.0 / temperature
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad and kernel != "chunked":  # the fused kernel's arithmetic, nothing kept
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty
        return token_logprobs_no_grad(hidden, weight, bias, targets, inv_temp, chunk_size)
    fused_rows = 0  # rows [0, fused_rows) go through the fused kernel, the rest through chunks
    if needs_grad and kernel == "fused":
        fused_rows = hidden.shape[0]
    elif needs_grad and kernel == "auto" and recompute is None and weight.dtype != torch.float64:
        # float64 is a reference computation: the chunked path keeps autograd's float64 gradient accumulation, so a
        # float64 DDP/FSDP step equals one process to 1e-10 (the fused kernel accumulates ∂W in float32 over blocks)
        block = block_rows(chunk_size, weight.shape[0])
        fused_rows = min(hidden.shape[0], _RECOMPUTE_ABOVE_BYTES // (4 * weight.shape[0]) // block * block)
        recompute = fused_rows < hidden.shape[0]  # rows past the budget: checkpointed chunks on the same blocks
        chunk_size = block
    logps, ents = [], []
    if fused_rows > 0:
        lp, ent = fused_token_logprobs(hidden[:fused_rows], weight, targets[:fused_rows], bias, inv_temp, chunk_size)
        logps.append(lp)
        ents.append(ent)
    if recompute is None:
        recompute = hidden.shape[0] * weight.shape[0] * 4 > _RECOMPUTE_ABOVE_BYTES
    for s in range(fused_rows, hidden.shape[0], chunk_size):  # ok: loop over chunks of rows, not samples
        args = (hidden[s : s + chunk_size], weight, bias, targets[s : s + chunk_size], inv_temp)
        lp, ent = checkpoint(_chunk_logprobs_entropy, *args, use_reentrant=False) if needs_grad and recompute else _chunk_logprobs_entropy(*args)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def selective_log_softmax(logits: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, targets)`` for logits that already exist, one chunk of
    rows at a time in float32. Shapes: logits (..., V), targets (...) -> (...) float32."""
    ids_ok = targets.dtype in (torch.int32, torch.int64) and targets.device == logits.device
    if targets.shape != logits.shape[:-1] or not ids_ok:
        raise ValueError(
            f"targets must be integer token ids of shape {tuple(logits.shape[:-1])} (logits less V) on "
            f"{logits.device}, got {targets.dtype} {tuple(targets.shape)} on {targets.device}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    idx = targets.reshape(-1)
    out = []
    for s in range(0, flat.shape[0], chunk_size):  # ok: loop over chunks of rows
        chunk = flat[s : s + chunk_size].float() / temperature
        out.append(chunk.gather(-1, idx[s : s + chunk_size, None]).squeeze(-1) - torch.logsumexp(chunk, -1))
    return torch.cat(out).reshape(targets.shape) if out else logits.new_zeros(targets.shape, dtype=torch.float32)
