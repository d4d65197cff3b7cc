"""Token log-probs and entropies through the LM head with one matmul per chunk in each direction and no
recomputed logits: the "fused" kernel of :func:`common.losses.logprobs.token_logprobs`.

What it equals (to float32 rounding), for hidden states ``h`` (N, H), head ``W`` (V, H), bias ``b`` and
temperature ``T``::

    z      = (h @ W.T + b) / T                      # (N, V) float32
    logp   = z - logsumexp(z)                       # (N, V)
    lp_i   = logp[i, y_i],   H_i = -Σ_v p_iv logp_iv,   p = exp(logp)

Gradients. For upstream gradients ``g_i = ∂L/∂lp_i`` and ``e_i = ∂L/∂H_i`` (arbitrary per token)::

    ∂lp_i/∂z_iv = 1[v = y_i] - p_iv
    ∂H_i /∂z_iv = -p_iv (logp_iv + H_i)             # H = lse - Σ p z, so ∂H/∂z_v = -p_v (z_v - Σ p z)
    δ_iv = ∂L/∂z_iv = g_i 1[v = y_i] - p_iv (g_i + e_i (logp_iv + H_i))
    ∂L/∂h = δ W / T,   ∂L/∂W = δᵀ h / T,   ∂L/∂b = Σ_i δ_i / T

(computed with ``H_i + 1 − Σ_v p_iv`` in place of ``H_i``: equal in exact arithmetic, and what log_softmax's own
backward gives on the rounded p, so the gradient is that of the values returned, as in the plain computation.)

Why the forward cannot hand back finished gradients here. Fused linear-cross-entropy kernels (Liger
Kernel's ``LigerFusedLinearCrossEntropy``, Hsu et al. 2024, arXiv 2410.10989) form ``δ W`` and ``δᵀ h`` in
the forward pass because their output is a scalar loss: the upstream gradient is one number that scales
the stored result. Here the outputs are per-token and the loss that consumes them (clipped ratios,
sequence means, KL terms) is applied afterwards, so ``g`` and ``e`` are unknown in the forward pass.
``∂L/∂h`` could still be stored as two (N, H) pieces (``(1_y - p) W`` and ``p (logp + H) W``, two extra
matmuls), but ``∂L/∂W = Σ_i (g_i a_i + e_i b_i) ⊗ h_i`` is a linear map of the 2N numbers ``(g, e)`` whose
image has dimension ~2N: any exact representation of it holds Θ(N·V) numbers, i.e. ``p`` itself, or
recomputes ``p`` from ``h`` (one more matmul: the checkpointed chunked kernel, Cut Cross-Entropy, Wijmans
et al. 2024, arXiv 2411.09009). This kernel takes the first option: it keeps one float32 (N, V) log-softmax
(the plain computation keeps about five such tensors at its peak: logits, log-softmax, its exp and their
gradients) and forms δ chunk by chunk in the backward pass, where ``g`` and ``e`` are known — three matmuls
in all, as many as the plain computation, exact for any upstream gradients of both outputs. Peak memory
is one (N, V) float32 block plus two small scratch blocks (``SCRATCH_BYTES`` each); when that block is too large,
:func:`common.losses.logprobs.token_logprobs` stores it only for the rows that fit its budget and
recomputes the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# Rows per block of scratch work: two (rows, V) float32 scratch buffers stay under 2 x this many bytes, so the
# peak is the stored (N, V) block plus a few tens of MiB however large ``chunk_size`` is (at V = 49,152:
# 170 rows, still a matmul of full efficiency with H = 576).
SCRATCH_BYTES = 32 << 20


def block_rows(chunk_size: int, vocab: int) -> int:
    return max(1, min(chunk_size, SCRATCH_BYTES // (4 * vocab)))


def block_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, inv_temp: float, x: Tensor,
                  t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One block of rows: fills ``x`` (n, V) float32 with log-softmax(z), z = (h Wᵀ + b)·inv_temp, using ``t``
    (n, V) as scratch; returns logprobs (n,), entropy (n,) and Σ_v exp(x) (n,) (for the backward). The
    chunked kernel's arithmetic op for op (common/losses/logprobs.py), so a row gets the same bits on every
    path: π/π_old is exactly 1 at the first step when the old log-probs come from a no-grad forward."""
    if hidden.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        if bias is None:
            torch.mm(hidden, weight.t(), out=t)
        else:
            torch.addmm(bias, hidden, weight.t(), out=t)
    else:  # the plain computation rounds the matmul to the model's dtype, then goes to float32
        t.copy_(F.linear(hidden, weight, bias))
    t.mul_(inv_temp)  # z = logits / T (as the chunked kernel: ×1.0 is exact)
    torch._log_softmax(t, -1, False, out=x)  # torch.log_softmax's kernel, written into the stored block
    lp = x.gather(-1, ids[:, None]).squeeze(-1)
    torch.exp(x, out=t)  # p
    mass = t.sum(-1)  # Σ p: 1 up to the rounding of log p (about 1e-5 at V = 49k)
    ent = t.mul_(x).sum(-1).neg_()  # −Σ p log p
    return lp, ent, mass


def token_logprobs_no_grad(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float,
                           chunk_size: int) -> tuple[Tensor, Tensor]:
    """The fused kernel's forward without storing anything (no graph): one (block, V) pair of buffers.
    Shapes: hidden (N, H) -> logprobs (N,), entropy (N,) float32."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk_size = block_rows(chunk_size, vocab)
    lp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    x = torch.empty(min(chunk_size, n_rows), vocab, dtype=torch.float32, device=hidden.device)
    t = torch.empty_like(x)
    ids = targets.long()
    with torch.no_grad():
        for s in range(0, n_rows, chunk_size):  # ok: loop over chunks of rows
            e = min(s + chunk_size, n_rows)
            lp[s:e], ent[s:e], _ = block_forward(hidden[s:e], weight, bias, ids[s:e], inv_temp, x[: e - s], t[: e - s])
    return lp, ent


class FusedTokenLogprobs(torch.autograd.Function):
    """forward(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64, inv_temp, chunk_size)
    -> logprobs (N,) float32, entropy (N,) float32. Saves the float32 log-softmax (N, V) for the backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float,
                chunk_size: int):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        chunk_size = block_rows(chunk_size, vocab)
        logp = torch.empty(n_rows, vocab, dtype=torch.float32, device=hidden.device)  # (N, V): all that is kept
        lp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,)
        ent = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,)
        mass = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,) Σ_v p as rounded
        buf = torch.empty(min(chunk_size, n_rows), vocab, dtype=torch.float32, device=hidden.device)  # (n, V) scratch
        ids = targets.long()
        for s in range(0, n_rows, chunk_size):  # ok: loop over chunks of rows, not samples
            e = min(s + chunk_size, n_rows)
            lp[s:e], ent[s:e], mass[s:e] = block_forward(hidden[s:e], weight, bias, ids[s:e], inv_temp, logp[s:e], buf[: e - s])
        del buf
        # logp is an intermediate: saved here, autograd frees it after the backward (kept under retain_graph)
        # the entropy's gradient uses H + 1 − Σp, which is log_softmax's backward on the rounded p (Σp = 1 exactly
        # gives −p (log p + H)): the gradient is that of the values returned, as in the plain computation
        ctx.save_for_backward(hidden, weight, bias, ids, ent - mass + 1, logp)
        ctx.inv_temp, ctx.chunk_size = inv_temp, chunk_size  # chunk_size: rows per block, after block_rows
        ctx.set_materialize_grads(False)  # an output the loss does not use arrives as None: no work for it
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, bias, ids, ent, logp = ctx.saved_tensors  # ent: H + 1 − Σp (forward)
        inv_temp, chunk = ctx.inv_temp, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        # Accumulated over chunks in float32 (the plain computation does one matmul over all rows).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None  # (V,)
        n_rows = hidden.shape[0]
        d_buf = torch.empty(min(chunk, n_rows), logp.shape[1], dtype=torch.float32, device=logp.device)  # (n, V)
        p_buf = torch.empty_like(d_buf)  # (n, V)
        for s in range(0, n_rows, chunk):  # ok: loop over chunks of rows
            e = min(s + chunk, n_rows)
            x, d, p = logp[s:e], d_buf[: e - s], p_buf[: e - s]  # (n, V) log-softmax and scratch
            g = None if g_lp is None else g_lp[s:e, None].float()  # (n, 1)
            # δ/T = (g 1_y − p (g + e (logp + H))) / T, built in place in d
            if g_ent is not None:
                torch.add(x, ent[s:e, None], out=d).mul_(g_ent[s:e, None].float())
                if g is not None:
                    d.add_(g)
            else:
                d.copy_(g.expand_as(x))
            d.mul_(torch.exp(x, out=p)).mul_(-inv_temp)
            if g is not None:
                d.scatter_add_(-1, ids[s:e, None], g * inv_temp)
            # d = ∂L/∂(h Wᵀ + b), float32 (n, V); the matmuls run in the model's dtype, as in the plain backward
            dz = d if weight.dtype == torch.float32 else d.to(weight.dtype)
            if need_h:
                grad_h[s:e] = dz @ weight
            if need_w:
                if dz.dtype == torch.float32 and hidden.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), hidden[s:e])
                else:
                    grad_w += (dz.t() @ hidden[s:e]).float()
            if need_b:
                grad_b += d.sum(0)
            del dz
        del d_buf, p_buf
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def fused_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         inv_temp: float = 1.0, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Shapes: hidden (N, H), weight (V, H), targets (N,), bias (V,) | None -> logprobs (N,), entropy (N,)
    float32. Inputs are checked by :func:`common.losses.logprobs.token_logprobs`, the public entry point."""
    return FusedTokenLogprobs.apply(hidden, weight, bias, targets, inv_temp, chunk_size)
