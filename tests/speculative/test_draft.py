"""The EAGLE-3 draft: training-time test computes exactly what the draft computes at decoding time, and the
token-level loss is the γ-weighted cross-entropy to the target's distribution."""

from __future__ import annotations

import pytest
import torch

from speculative.draft import Draft, feature_layers, target_features, ttt_loss, ttt_unroll
from speculative.gto import path_logprob


def tiny_target(vocab: int = 11):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double().eval()


def test_ttt_unroll_equals_the_decoding_time_chain():
    """Step k of TTT at position t = the draft fed its own hidden states along x_{t+2..} from the root (h_t, x_{t+1})."""
    target = tiny_target()
    draft = Draft.from_target(target, seed=1)
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, _, _ = target_features(target, ids, feature_layers(2))
        outs = ttt_unroll(draft, feats, ids, steps=3)
        # TTT log-probs of x_{t+k+2} at step k, summed over k < 3, for roots t = 2 and 5
        ttt = [sum(draft.logits(outs[k][b, t]).log_softmax(-1)[ids[b, t + k + 2]] for k in range(3))
               for b in range(2) for t in (2, 5)]
        g0, ctx = draft.context(feats[:, :-1], ids[:, 1:], torch.arange(11).expand(2, 11))
        seq, roots = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 5, 2, 5])
        branch = torch.stack([ids[b, t + 2 : t + 5] for b, t in zip(seq.tolist(), roots.tolist())])  # (4, 3)
        chain = path_logprob(draft, ctx, g0, seq, roots, branch, torch.full((4,), 3))
    assert torch.allclose(chain.double(), torch.stack(ttt), atol=1e-5)  # path_logprob sums in float32
    # step 0 is ordinary causal attention: a position never sees later pairs
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 11
    with torch.no_grad():
        feats2, _, _ = target_features(target, ids2, feature_layers(2))
        outs2 = ttt_unroll(draft, feats2, ids2, steps=2)
    assert torch.allclose(outs2[0][:, :6], outs[0][:, :6]) and torch.allclose(outs2[1][:, :5], outs[1][:, :5])


def test_ttt_loss_is_the_weighted_cross_entropy_to_the_target():
    target = tiny_target()
    draft = Draft.from_target(target, seed=2)
    ids = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        feats, logits, _ = target_features(target, ids, feature_layers(2))
        loss, _ = ttt_loss(draft, feats, logits, ids, valid, steps=2)
        outs = ttt_unroll(draft, feats, ids, steps=2)
    # plain loop: step k, pair t in [0, S-2-k], target distribution at position t+k+1
    expected = 0.0
    for k in range(2):
        terms = [-(logits[0, t + k + 1].softmax(-1) * draft.logits(outs[k][0, t]).log_softmax(-1)).sum()
                 for t in range(6 - 2 - k)]
        expected += 0.8**k * sum(terms) / len(terms)
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)  # ttt_loss works in float32
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ttt_loss(draft, feats[:, :1], logits[:, :1], ids[:, :1], valid[:, :1], steps=1)


def test_draft_copies_and_freezes_the_target_embedding():
    target = tiny_target()
    draft = Draft.from_target(target, train_head=False)
    assert torch.equal(draft.embed.weight, target.get_input_embeddings().weight)
    assert not draft.embed.weight.requires_grad and not draft.lm_head.weight.requires_grad
    assert Draft.from_target(target).lm_head.weight.requires_grad  # EAGLE-3: its own trainable head
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Draft(30, 11, 4, 64)


def test_reduced_draft_vocabulary():
    """EAGLE-3's d2t: the head covers a subset; logits are -inf elsewhere; the loss restricts the target."""
    from speculative.decode import SpeculativeDecoder, greedy_decode

    target = tiny_target()
    d2t = torch.tensor([0, 2, 3, 5, 7, 8])
    draft = Draft.from_target(target, seed=4, draft_vocab=d2t)
    g = torch.randn(3, 32, dtype=torch.float64)
    z = draft.logits(g)
    outside = torch.ones(11, dtype=torch.bool)
    outside[d2t] = False
    assert torch.isinf(z[:, outside]).all() and torch.isfinite(z[:, d2t]).all()
    prompt = torch.tensor([[1, 4, 9, 10]])
    assert torch.equal(SpeculativeDecoder(target, draft, 3, 2, 6).generate(prompt, 12), greedy_decode(target, prompt, 12))
    ids = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, logits, _ = target_features(target, ids, feature_layers(2))
        loss, _ = ttt_loss(draft, feats, logits, ids, torch.ones_like(ids, dtype=torch.bool), steps=1)
        outs = ttt_unroll(draft, feats, ids, steps=1)
    terms = [-(logits[0, t + 1, d2t].softmax(-1) * draft.draft_logits(outs[0][0, t]).log_softmax(-1)).sum()
             for t in range(4) if int(logits[0, t + 1].argmax()) in d2t.tolist()]  # argmax outside: skipped
    expected = sum(terms) / max(len(terms), 1)
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    # cached target outputs: logits already restricted to d2t + where the full argmax lies in it -> the same loss
    in_vocab = torch.isin(logits.argmax(-1), d2t)  # (1, 6)
    with torch.no_grad():
        loss_r, _ = ttt_loss(draft, feats, logits[..., d2t], ids, torch.ones_like(ids, dtype=torch.bool), steps=1,
                             in_vocab=in_vocab)
    assert loss_r.item() == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="need in_vocab"):
        ttt_loss(draft, feats, logits[..., d2t], ids, torch.ones_like(ids, dtype=torch.bool), steps=1)
    with pytest.raises(ValueError, match="draft_vocab must be"):
        Draft.from_target(target, draft_vocab=torch.tensor([0, 11]))
