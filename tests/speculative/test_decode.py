"""Speculative decoding is lossless: T = 0 gives the target's greedy tokens exactly (tiny Llama and the bundled
SmolLM2, several tree shapes); T > 0 gives the target's distribution (chi-square on a 4-token vocabulary)."""

from __future__ import annotations

import pytest
import torch

from common.metrics import AcceptanceLength
from speculative.decode import DecodeStats, SpeculativeDecoder, greedy_decode
from speculative.draft import Draft


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).double().eval()  # float64: no near-ties between tree and sequential forwards
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("top_k,depth,total", [(1, 0, 1), (2, 1, 4), (4, 3, 16), (10, 7, 60)])
def test_greedy_speculative_decoding_returns_the_targets_greedy_tokens(top_k, depth, total):
    target = tiny_llama(12)
    draft = Draft.from_target(target, seed=1)
    # a draft that agrees with the target sometimes: its head is the target's head, its layer random
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)[:, prompt.shape[1]:]  # HF's greedy
    stats = DecodeStats()
    out = SpeculativeDecoder(target, draft, top_k, depth, total).generate(prompt, 30, stats=stats)
    assert torch.equal(out, reference)
    assert torch.equal(greedy_decode(target, prompt, 30), reference)
    assert stats.target_calls == 1 + len(stats.accepted)  # one target forward per cycle, plus the prefill
    assert stats.tau == pytest.approx((sum(stats.accepted) + len(stats.accepted)) / len(stats.accepted))


def test_stops_at_eos():
    target = tiny_llama(12)
    prompt = torch.tensor([[3, 1, 4]])
    reference = greedy_decode(target, prompt, 20)[0]
    eos = int(reference[5])  # pretend the 6th greedy token is end-of-sequence
    first = int((reference == eos).nonzero()[0, 0])
    out = SpeculativeDecoder(target, Draft.from_target(target), 4, 3, 12).generate(prompt, 20, eos_token_id=eos)
    assert torch.equal(out[0], reference[: first + 1])


def test_bundled_smollm2_a_few_tokens(bundled_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(bundled_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(bundled_path)
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    reference = target.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.eos_token_id)[:, prompt.shape[1]:]
    out = SpeculativeDecoder(target, Draft.from_target(target, train_head=False), 4, 2, 8).generate(prompt, 6)
    assert torch.equal(out, reference)


def test_sampling_is_lossless_chi_square():
    """First two generated tokens at T = 1 against the target's exact distribution (16 cells)."""
    V, n = 4, 600
    target = tiny_llama(V, seed=2)
    with torch.no_grad():  # make the target and a random draft disagree a lot: sharpen the target
        target.lm_head.weight.mul_(6.0)
    draft = Draft.from_target(target, seed=5)
    prompt = torch.tensor([[0, 1, 2, 3, 0]])
    with torch.no_grad():
        p1 = target(prompt).logits[0, -1].softmax(-1)  # (V,)
        second = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = target(second).logits[:, -1].softmax(-1)  # (V, V) p(x2 | x1)
    expected = (p1[:, None] * p2).flatten() * n  # (V²,)
    decoder = SpeculativeDecoder(target, draft, 2, 2, 5, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = 0
    for _ in range(n):
        stats = DecodeStats()
        out = decoder.generate(prompt, 2, generator=g, stats=stats)[0]
        counts[out[0] * V + out[1]] += 1
        accepted += sum(stats.accepted)
    assert accepted > n // 10, "the test needs drafted tokens to be accepted to mean anything"
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 37.7, f"chi-square {chi2:.1f} exceeds the 0.999 quantile of chi2(15) = 37.70"
    # and the test has power: the draft's own greedy proposal distribution is far from the target's
    greedy = SpeculativeDecoder(target, draft, 2, 2, 5, temperature=0.0).generate(prompt, 2)[0]
    assert expected[greedy[0] * V + greedy[1]] < n


def test_acceptance_length_metric():
    m = AcceptanceLength()
    m.update(torch.tensor([0, 2, 4]))  # (1 + 3 + 5) / 3 = 3
    m.update(torch.tensor([1]))  # (9 + 2) / 4 = 2.75
    assert m.compute().item() == pytest.approx(2.75)
    with pytest.raises(ValueError, match="accepted must be"):
        m.update(torch.tensor([[1]]))


def test_bad_input():
    target = tiny_llama(12)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SpeculativeDecoder(target, Draft.from_target(target), temperature=-1.0)
    with pytest.raises(ValueError, match=r"input_ids must be \(1, P\)"):
        SpeculativeDecoder(target, Draft.from_target(target)).generate(torch.zeros(2, 3, dtype=torch.long), 4)
