"""Chunked log-probs and entropy (common/losses/logprobs.py) against the naive full-vocabulary reference
stated in the module docstring, for values and for gradients wrt hidden states, weight and bias."""

import pytest
import torch
import torch.nn.functional as F

from common.losses.logprobs import selective_log_softmax, token_logprobs

N, H, V = 10, 8, 13
CHUNKS = [1, 7, 64]  # one row at a time, a chunk that does not divide N, one chunk larger than N
TEMPERATURES = [1.0, 0.7, 2.0]

# ---------------------------------------------------------------------------------------------- helpers


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)  # (N, H)
    weight = torch.randn(V, H, generator=g) * 0.5  # (V, H)
    bias = torch.randn(V, generator=g) * 0.1  # (V,)
    targets = torch.randint(0, V, (N,), generator=g)  # (N,)
    return hidden, weight, bias, targets


def naive(hidden, weight, targets, bias=None, temperature: float = 1.0):
    """The docstring's reference: full (N, V) float32 log_softmax, gather, and −Σ p log p."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)) / temperature  # (N, V)
    logp_all = logits.float().log_softmax(-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# --------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_token_logprobs_equals_naive(chunk_size: int, temperature: float) -> None:
    hidden, weight, bias, targets = make_inputs()
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size)
    ref_logp, ref_entropy = naive(hidden, weight, targets, temperature=temperature)
    assert logp.shape == entropy.shape == (N,) and logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_logprobs_with_bias_equals_naive(chunk_size: int) -> None:
    hidden, weight, bias, targets = make_inputs(1)
    logp, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, chunk_size=chunk_size)
    ref_logp, ref_entropy = naive(hidden, weight, targets, bias=bias, temperature=0.7)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)


def test_uniform_logits_hand_computed() -> None:
    # weight = 0 -> logits all 0 -> uniform over V: log p = −ln V, H = ln V
    hidden, _, _, targets = make_inputs()
    logp, entropy = token_logprobs(hidden, torch.zeros(V, H), targets, chunk_size=3)
    ln_v = torch.log(torch.tensor(float(V)))
    torch.testing.assert_close(logp, torch.full((N,), -ln_v.item()), rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, torch.full((N,), ln_v.item()), rtol=0, atol=1e-6)


def test_bfloat16_inputs_give_float32_outputs() -> None:
    hidden, weight, _, targets = make_inputs()
    logp, entropy = token_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=4)
    assert logp.dtype == entropy.dtype == torch.float32
    ref_logp, _ = naive(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0.1)  # bf16 matmul: loose but not vacuous


def test_zero_rows_return_empty() -> None:
    hidden = torch.zeros(0, H, requires_grad=True)
    logp, entropy = token_logprobs(hidden, torch.randn(V, H), torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    assert logp.dtype == entropy.dtype == torch.float32


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_equal_naive(chunk_size: int, temperature: float) -> None:
    hidden, weight, bias, targets = make_inputs(2)
    g = torch.Generator().manual_seed(3)
    c_logp, c_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)  # weights both outputs

    h1, w1, b1 = leaves(hidden, weight, bias)
    logp, entropy = token_logprobs(h1, w1, targets, bias=b1, temperature=temperature, chunk_size=chunk_size)
    ((c_logp * logp).sum() + (c_ent * entropy).sum()).backward()

    h2, w2, b2 = leaves(hidden, weight, bias)
    ref_logp, ref_entropy = naive(h2, w2, targets, bias=b2, temperature=temperature)
    ((c_logp * ref_logp).sum() + (c_ent * ref_entropy).sum()).backward()

    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=0, atol=1e-5)


def test_gradient_flows_only_to_weight_when_hidden_is_frozen() -> None:
    hidden, weight, _, targets = make_inputs(4)
    (w1,) = leaves(weight)
    token_logprobs(hidden, w1, targets, chunk_size=3)[0].sum().backward()
    (w2,) = leaves(weight)
    naive(hidden, w2, targets)[0].sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-5)


def test_no_graph_under_no_grad() -> None:
    hidden, weight, _, targets = make_inputs()
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        logp, entropy = token_logprobs(h, w, targets, chunk_size=4)
    assert not logp.requires_grad and not entropy.requires_grad


# ------------------------------------------------------------------------------- selective_log_softmax


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_selective_log_softmax_equals_naive(chunk_size: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, V, generator=g) * 3  # (B, T, V)
    targets = torch.randint(0, V, (2, 5), generator=g)  # (B, T)
    expected = (logits / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    got = selective_log_softmax(logits, targets, temperature=temperature, chunk_size=chunk_size)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_selective_log_softmax_bfloat16_computes_in_float32() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(6)).bfloat16()
    targets = torch.arange(4)
    expected = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, targets, chunk_size=3), expected, rtol=0, atol=1e-6)


def test_selective_log_softmax_empty() -> None:
    out = selective_log_softmax(torch.zeros(0, V), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_token_logprobs_bad_temperature_raises(temperature: float) -> None:
    hidden, weight, _, targets = make_inputs()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, targets, temperature=temperature)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_token_logprobs_bad_chunk_size_raises(chunk_size: int) -> None:
    hidden, weight, _, targets = make_inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        token_logprobs(hidden, weight, targets, chunk_size=chunk_size)


def test_token_logprobs_bad_shapes_raise_naming_hidden_and_targets() -> None:
    hidden, weight, _, targets = make_inputs()
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and targets \(N,\)"):
        token_logprobs(hidden[None], weight, targets)
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and targets \(N,\)"):
        token_logprobs(hidden, weight, targets[:-1])


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_selective_log_softmax_bad_temperature_raises(temperature: float) -> None:
    # same contract as token_logprobs: a non-positive temperature is user error, not -inf/NaN log-probs
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(torch.randn(3, V), torch.zeros(3, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_selective_log_softmax_bad_chunk_size_raises(chunk_size: int) -> None:
    # chunk_size = −3 would otherwise make range() empty and return all-zero log-probs silently
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_softmax(torch.randn(3, V), torch.zeros(3, dtype=torch.long), chunk_size=chunk_size)


def test_recompute_path_equals_the_stored_path_values_and_gradients():
    """Activation checkpointing per chunk (the large-batch path) changes memory, not numbers."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    out = []
    for recompute in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = token_logprobs(h, w, targets, chunk_size=8, recompute=recompute)
        (lp.sum() + 0.5 * ent.sum()).backward()
        out.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
