"""The bidirectional masked-diffusion LM (diffusion/dllm/model.py) and LLaDA's sampler (diffusion/dllm/sampler.py)."""

from __future__ import annotations

import torch

from diffusion.dllm.model import BidirectionalLM, TinyDiffusionLM, masked_diffusion_sft_loss
from diffusion.dllm.sampler import most_confident, num_transfer_tokens, propose, sample


def tiny(**kw):
    return TinyDiffusionLM(alphabet="0123=", hidden_size=32, num_layers=1, num_heads=2, **kw).load()


def test_attention_is_bidirectional_and_ignores_padding(one_thread):
    model, tok = tiny()
    ids = torch.tensor([[0, 1, 3, 4, 5, 6, 7]])  # one left pad
    mask = ids != tok.pad_token_id
    base = model(ids, mask)
    later = ids.clone()
    later[0, -1] = 3
    # a later token changes the first real position's logits (causal attention would leave them unchanged) ...
    assert (model(later, mask)[0, 1] - base[0, 1]).abs().max() > 1e-4
    # ... which the same weights under causal attention do not
    causal = model.model
    for m in causal.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = True
    causal.config.is_causal = True
    torch.testing.assert_close(causal(input_ids=later).logits[0, :2], causal(input_ids=ids).logits[0, :2], rtol=0, atol=1e-6)
    model, _ = tiny()
    padded = ids.clone()
    padded[0, 0] = 4  # a different token under the padding mask changes nothing
    torch.testing.assert_close(model(padded, mask)[:, 1:], base[:, 1:], rtol=0, atol=1e-6)


def test_dream_shift_reads_the_previous_positions_logits():
    model, _ = tiny()
    shifted = BidirectionalLM(model.model, shift=True)
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    plain, moved = model.__class__(model.model, shift=False)(ids), shifted(ids)
    torch.testing.assert_close(moved[:, 1:], plain[:, :-1], rtol=0, atol=0)


def test_a_tiny_model_trained_from_scratch_learns_to_reverse(one_thread):
    """Masked-diffusion SFT (LLaDA's loss) on generated data: the reversed 3-digit prompt, greedy sampling
    (3 steps, one block) gets >= 90 % exact (chance 1/64)."""
    torch.manual_seed(0)
    model, tok = TinyDiffusionLM(alphabet="0123=", hidden_size=48, num_layers=2, num_heads=4).load()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    digit0 = tok.convert_tokens_to_ids("0")

    def data(n):
        d = torch.randint(0, 4, (n, 3), generator=g) + digit0
        prompt = torch.cat([torch.full((n, 1), tok.bos_token_id), d, torch.full((n, 1), tok.convert_tokens_to_ids("="))], 1)
        return prompt, d.flip(1)

    losses = []
    for _ in range(150):
        prompt, target = data(64)
        loss = masked_diffusion_sft_loss(model, prompt, torch.ones_like(prompt, dtype=torch.bool), target,
                                         torch.ones_like(target, dtype=torch.bool), tok.mask_token_id, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    prompt, target = data(200)
    out = sample(model, prompt, torch.ones_like(prompt, dtype=torch.bool), gen_length=3, block_length=3, steps=3,
                 temperature=0.0, mask_id=tok.mask_token_id)
    acc = (out.tokens == target).all(1).float().mean()
    assert acc >= 0.9, (acc, losses[:3], losses[-3:])


def test_transfer_counts_split_evenly_with_the_remainder_first():
    masked = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert num_transfer_tokens(masked, 3).tolist() == [[3, 2, 2], [1, 0, 0]]


def hand_model(probs):
    """A fixed table of next-token probabilities per completion position (a hand case, not a model): logits are
    log(probs) at the last T positions whatever the input."""
    table = torch.tensor(probs, dtype=torch.float64).log()  # (T, V)

    def logits(ids, mask):
        out = torch.zeros(*ids.shape, table.shape[1], dtype=torch.float64)
        out[:, -table.shape[0]:] = table
        return out
    return logits


# position: p(token) over V = 3 tokens (the third is MASK, never proposed); greedy confidences 0.6, 0.55, 0.9, 0.7
PROBS = [[0.6, 0.4, 0.0], [0.45, 0.55, 0.0], [0.1, 0.9, 0.0], [0.7, 0.3, 0.0]]


def test_the_most_confident_positions_are_committed_first():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    pm = torch.ones(1, 2, dtype=torch.bool)
    run = lambda **kw: sample(hand_model(PROBS), prompt, pm, gen_length=4, temperature=0.0, mask_id=2, **kw)
    one = run(block_length=4, steps=4)
    assert one.step.tolist() == [[2, 3, 0, 1]]  # by confidence 0.9 > 0.7 > 0.6 > 0.55
    assert one.tokens.tolist() == [[0, 1, 1, 0]]
    assert run(block_length=4, steps=2).step.tolist() == [[1, 1, 0, 0]]  # two per step: {2, 3} then {0, 1}
    assert run(block_length=2, steps=4).step.tolist() == [[0, 1, 2, 3]]  # blocks first, confidence within a block
    # hand ranking with ties: leftmost first, only candidates, exactly k per row
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
    cand = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert most_confident(conf, cand, torch.tensor([2, 3])).tolist() == [[True, False, True, False], [True, True, True, False]]


def test_gumbel_max_draws_from_the_tempered_softmax():
    """Frequencies of 200k float64 Gumbel-max proposals match softmax(l / τ) within 5 standard errors."""
    logits = torch.tensor([[[1.0, 0.0, -1.0, 0.5]]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n, tau = 200_000, 1.5
    tokens, conf = propose(logits.expand(n, 1, 4), tau, g)
    freq = torch.bincount(tokens[:, 0], minlength=4).double() / n
    p = (logits[0, 0] / tau).softmax(-1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    torch.testing.assert_close(conf[:, 0], logits[0, 0].softmax(-1)[tokens[:, 0]])  # confidence at temperature 1


def test_hint_positions_never_change_and_everything_else_is_committed_once(one_thread):
    model, tok = tiny()
    g = torch.Generator().manual_seed(1)
    B, T = 6, 8
    prompt = torch.randint(3, 8, (B, 4), generator=g)
    pm = torch.ones(B, 4, dtype=torch.bool)
    pm[0, :2] = False
    hint_mask = torch.rand(B, T, generator=g) < 0.4
    hint_ids = torch.randint(3, 8, (B, T), generator=g)
    out = sample(model, prompt, pm, gen_length=T, block_length=4, steps=4, temperature=1.0, mask_id=tok.mask_token_id,
                 hint_ids=hint_ids, hint_mask=hint_mask, generator=g)
    assert torch.equal(out.tokens[hint_mask], hint_ids[hint_mask])
    assert torch.equal(out.step == -1, hint_mask) and torch.equal(out.hint_mask, hint_mask)
    assert not (out.tokens == tok.mask_token_id).any()
    # positions of block 0 are committed in steps 0-1, block 1 in steps 2-3, the counts split as evenly as possible
    assert ((out.step[:, :4] < 2) | hint_mask[:, :4]).all() and ((out.step[:, 4:] >= 2) | hint_mask[:, 4:]).all()
    for s in range(4):
        blk = slice(0, 4) if s < 2 else slice(4, 8)
        free = (~hint_mask[:, blk]).sum(1)
        expected = free // 2 + (s % 2 < free % 2).long()
        assert torch.equal((out.step == s).sum(1), expected)
