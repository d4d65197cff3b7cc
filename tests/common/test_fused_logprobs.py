"""The fused log-prob kernel (common/losses/fused_logprobs.py, token_logprobs(kernel="fused"/"auto")) against a
plain float64 reference, with arbitrary per-token upstream gradients of BOTH outputs.

Tolerances come from the float32 arithmetic (u = 2⁻²⁴), not from one run:
- logits z = (h·w + b)/T: |Δz| ≤ γ_H Σ_k |h_k w_k| / T + |z| u  (γ_n = n u / (1 − n u));
- log p = z − lse: |Δlog p| ≤ 2 max|Δz| + (2 + ln V)·u·(max|z| + ln V)  (max shift, exp, sum of V terms, log);
- H = −Σ p log p: |ΔH| ≤ Σ p (1 + |log p|)·|Δlog p| + γ_V Σ p |log p|;
- gradients δW/T, δᵀh/T with δ = g 1_y − p (g + e (log p + H)): each entry of δ is off by at most
  Δδ = |g| p |Δlog p| + |e| p (|Δlog p| (1 + |log p + H|) + |ΔH|); a product summed over K terms adds γ_K.
The asserted bound is twice that worst case (the reference computations also round), in float64.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common.losses.logprobs as logprobs_mod
from common.losses.fused_logprobs import fused_token_logprobs
from common.losses.logprobs import token_logprobs

N, H, V = 23, 12, 37
U = 2.0**-24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def make(seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)  # (N, H)
    weight = torch.randn(V, H, generator=g) * 0.7  # (V, H)
    b = torch.randn(V, generator=g) * 0.3 if bias else None  # (V,)
    targets = torch.randint(0, V, (N,), generator=g)  # (N,)
    c_lp, c_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)  # upstream gradients, per token
    return hidden, weight, b, targets, c_lp, c_ent


def reference(hidden, weight, bias, targets, temperature, c_lp, c_ent):
    """float64 values, gradients and the error bounds of the module docstring."""
    h, w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    b = None if bias is None else bias.double().requires_grad_(True)
    z = (h @ w.T + (0 if b is None else b)) / temperature  # (N, V)
    logp = z.log_softmax(-1)
    lp, ent = logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    loss = (c_lp.double() * lp).sum() + (c_ent.double() * ent).sum()
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    with torch.no_grad():
        p, lg = logp.exp(), logp.abs()
        dz = gamma(H) * (h.abs() @ w.abs().T + (0 if b is None else b.abs())) / temperature + z.abs() * U  # (N, V)
        ln_v = torch.log(torch.tensor(float(V), dtype=torch.float64))
        dlogp = 2 * dz.max(-1, keepdim=True).values + (2 + ln_v) * U * (z.abs().max(-1, keepdim=True).values + ln_v)  # (N, 1)
        dent = (p * (1 + lg) * dlogp).sum(-1) + gamma(V) * (p * lg).sum(-1)  # (N,)
        g, e = c_lp.double().abs()[:, None], c_ent.double().abs()[:, None]
        delta = g * p + g * torch.nn.functional.one_hot(targets, V) + e * p * (lg + ent.abs()[:, None])  # |δ| bound
        ddelta = g * p * dlogp + e * p * (dlogp * (1 + (logp + ent[:, None]).abs()) + dent[:, None])  # |Δδ|
        tol_h = (ddelta @ w.abs() + gamma(V) * delta @ w.abs()) / temperature  # (N, H)
        tol_w = (ddelta.T @ h.abs() + gamma(N) * delta.T @ h.abs()) / temperature  # (V, H)
        tol_b = (ddelta.sum(0) + gamma(N) * delta.sum(0)) / temperature  # (V,)
    tols = [tol_h, tol_w] + ([tol_b] if b is not None else [])
    return lp.detach(), ent.detach(), dlogp.squeeze(-1), dent, grads, tols


def assert_within(actual, expected, tol, what):
    err = (actual.double() - expected).abs()
    worst = (err / (2 * tol)).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3e} exceeds 2x the float32 bound (ratio {worst:.2f})"


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_of_both_outputs_match_float64(chunk, temperature, bias):
    hidden, weight, b, targets, c_lp, c_ent = make(chunk, bias)
    lp64, ent64, tol_lp, tol_ent, grads64, tols = reference(hidden, weight, b, targets, temperature, c_lp, c_ent)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b) if t is not None]
    lp, ent = token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                             temperature=temperature, chunk_size=chunk, kernel="fused")
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (N,)
    assert_within(lp, lp64, tol_lp, "logprobs")
    assert_within(ent, ent64, tol_ent, "entropy")
    ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
    for leaf, g64, tol, name in zip(leaves, grads64, tols, ("hidden", "weight", "bias")):
        assert_within(leaf.grad, g64, tol, f"grad {name}")


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_one_output_unused_gets_no_gradient_from_it(used):
    # the unused output's upstream gradient arrives as None; the result must equal a zero upstream weight
    hidden, weight, b, targets, c_lp, c_ent = make(5)
    c_lp, c_ent = (c_lp, torch.zeros(N)) if used == "logprobs" else (torch.zeros(N), c_ent)
    *_, grads64, tols = reference(hidden, weight, b, targets, 0.8, c_lp, c_ent)
    h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    lp, ent = fused_token_logprobs(h, w, targets, bb, 1 / 0.8, 5)
    ((c_lp * lp).sum() if used == "logprobs" else (c_ent * ent).sum()).backward()
    for leaf, g64, tol, name in zip((h, w, bb), grads64, tols, ("hidden", "weight", "bias")):
        assert_within(leaf.grad, g64, tol, f"grad {name}")


def test_auto_splits_rows_at_the_budget_and_equals_both_kernels(monkeypatch):
    # budget of 8 rows of float32 log-softmax: rows 0..7 fused, 8..22 checkpointed chunks (same chunk bounds)
    monkeypatch.setattr(logprobs_mod, "_RECOMPUTE_ABOVE_BYTES", 8 * V * 4 + 5)
    hidden, weight, b, targets, c_lp, c_ent = make(6)
    lp64, ent64, tol_lp, tol_ent, grads64, tols = reference(hidden, weight, b, targets, 1.0, c_lp, c_ent)
    results = {}
    for kernel in ("auto", "fused", "chunked"):
        h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
        lp, ent = token_logprobs(h, w, targets, bias=bb, chunk_size=4, kernel=kernel)
        ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
        results[kernel] = (lp, ent, h.grad, w.grad, bb.grad)
        assert_within(lp, lp64, tol_lp, f"{kernel} logprobs")
        assert_within(ent, ent64, tol_ent, f"{kernel} entropy")
        for got, g64, tol in zip((h.grad, w.grad, bb.grad), grads64, tols):
            assert_within(got, g64, tol, f"{kernel} grads")
    # the auto path's first 8 rows are the fused kernel's rows, bit for bit; the rest are the chunked kernel's
    assert torch.equal(results["auto"][0][:8], results["fused"][0][:8])
    assert torch.equal(results["auto"][0][8:], results["chunked"][0][8:])
    assert torch.equal(results["auto"][2][:8], results["fused"][2][:8])
    assert torch.equal(results["auto"][2][8:], results["chunked"][2][8:])


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, _, targets, c_lp, c_ent = make(7, bias=False)
    *_, grads64, tols = reference(hidden, weight, None, targets, 1.0, c_lp, c_ent)
    h = hidden.clone().requires_grad_(True)
    lp, ent = token_logprobs(h, weight, targets, kernel="fused")
    ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
    assert_within(h.grad, grads64[0], tols[0], "grad hidden (weight frozen)")
    w = weight.clone().requires_grad_(True)
    lp, ent = token_logprobs(hidden, w, targets, kernel="fused")
    ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
    assert_within(w.grad, grads64[1], tols[1], "grad weight (hidden frozen)")


def test_three_matmuls_no_recompute():
    # FLOPs of forward + backward: plain and fused do 3 (N, V, H) matmuls (z, δW, δᵀh); chunked-recompute does 4
    hidden, weight, _, targets, c_lp, c_ent = make(8, bias=False)
    mm = 2 * N * V * H

    class MatmulFlops(TorchDispatchMode):  # every mm / addmm overload, out= variants included
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "bmm", "baddbmm", "addmm_"):
                a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
                self.total += 2 * a.numel() * b.shape[-1]
            return func(*args, **(kwargs or {}))

    def flops(kernel):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with MatmulFlops() as counter:
            lp, ent = token_logprobs(h, w, targets, chunk_size=5, kernel=kernel, recompute=True if kernel == "chunked" else None)
            ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
        return counter.total

    assert flops("fused") == 3 * mm
    assert flops("chunked") == 4 * mm


def test_saves_one_float32_block_not_five():
    # bytes autograd keeps between forward and backward, beyond the inputs: fused = one (N, V) float32 log-softmax
    hidden, weight, _, targets, _, _ = make(9, bias=False)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    saved = []

    def pack(t):
        if t.data_ptr() not in (h.data_ptr(), w.data_ptr()):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(h, w, targets, kernel="fused")
    block = N * V * 4
    assert block <= sum(saved) < block + 4 * N * 8  # + targets (int64) and entropy (float32), (N,) each


def test_bfloat16_inputs():
    hidden, weight, b, targets, c_lp, c_ent = make(10)
    h, w = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    lp, ent = token_logprobs(h, w, targets, kernel="fused")
    assert lp.dtype == ent.dtype == torch.float32
    ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    # the plain computation on the same bf16 inputs: the matmuls round to bf16 (8 bits) in both
    h2, w2 = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    logp = (h2 @ w2.T).float().log_softmax(-1)
    lp2, ent2 = logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    ((c_lp * lp2).sum() + (c_ent * ent2).sum()).backward()
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-5)  # same bf16 logits, then float32 as above
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=2**-7, atol=2**-7 * h2.grad.float().abs().max().item())


def test_retain_graph_and_empty_and_bad_kernel():
    hidden, weight, _, targets, c_lp, _ = make(11, bias=False)
    w = weight.clone().requires_grad_(True)
    lp, _ = token_logprobs(hidden, w, targets, kernel="fused")
    (c_lp * lp).sum().backward(retain_graph=True)
    first = w.grad.clone()
    (c_lp * lp).sum().backward()
    torch.testing.assert_close(w.grad, 2 * first)
    e_lp, e_ent = token_logprobs(hidden[:0].requires_grad_(True), w, targets[:0], kernel="fused")
    assert e_lp.shape == e_ent.shape == (0,)
    with pytest.raises(ValueError, match="kernel"):
        token_logprobs(hidden, w, targets, kernel="liger")
