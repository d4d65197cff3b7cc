"""The bundled SmolLM2-135M-Instruct adapted into a masked-diffusion LM (diffusion/dllm/model.py,
``SmolLM2DiffusionLM``, as Dream adapts an autoregressive checkpoint): the same weights plus one MASK row; with a
causal mask and Dream's shift it reproduces SmolLM2's next-token logits; with its own (bidirectional) mask, early
positions see later tokens."""

from __future__ import annotations

import pytest
import torch

from common.models import BundledSmolLM2
from diffusion.dllm.model import SmolLM2DiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy

TEXT = ["<|im_start|>user\n45123<|im_end|>\n<|im_start|>assistant\n9603#3<|im_end|>",
        "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n15, because<|im_end|>"]


@pytest.fixture(scope="module")
def models():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ar, tok = BundledSmolLM2().load()
    dllm, dtok = SmolLM2DiffusionLM().load()
    yield ar.eval(), tok, dllm.eval(), dtok
    torch.set_num_threads(before)


def test_weights_are_smollm2s_plus_one_mask_row_the_mean_embedding(models):
    ar, tok, dllm, dtok = models
    V = len(tok)
    assert dtok.mask_token_id == V and len(dtok) == V + 1 and dtok.mask_token == "<mask>"
    assert dtok.eos_token_id == tok.eos_token_id and dtok.bos_token_id == tok.bos_token_id
    ours = dllm.state_dict()
    theirs = ar.state_dict()
    assert set(ours) == {"model." + k for k in theirs}
    emb = "model.embed_tokens.weight"
    for k, v in theirs.items():
        if k in (emb, "lm_head.weight"):
            w = ours["model." + k]
            assert w.shape == (V + 1, v.shape[1]) and torch.equal(w[:V], v)
            torch.testing.assert_close(w[V], v.mean(0), rtol=0, atol=0)
        else:
            assert torch.equal(ours["model." + k], v), k
    assert dllm.head.weight.data_ptr() == dllm.model.get_input_embeddings().weight.data_ptr()  # still tied
    assert dllm.shift and not dllm.config.is_causal


def test_causal_mask_with_the_shift_reproduces_smollm2s_next_token_logits(models):
    """Dream's shift: the diffusion LM's logits at position i are the AR model's at i − 1 (which predict token i).
    Float32 tolerance: the same arithmetic with an explicit additive mask instead of SDPA's causal flag (equal
    bit for bit on this CPU; the bound leaves room for another SDPA kernel: 2e-5 of the largest logit)."""
    ar, tok, dllm, _ = models
    enc = tok(TEXT[:1], return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"]  # (1, L), no padding
    with torch.no_grad():
        want = ar(input_ids=ids).logits  # (1, L, V)
        got = dllm(ids, causal=True)[..., : want.shape[-1]]  # (1, L, V): the MASK column is new
        dllm.shift = False
        unshifted = dllm(ids, causal=True)[..., : want.shape[-1]]
        dllm.shift = True
    scale = want.abs().max()
    torch.testing.assert_close(got[:, 1:], want[:, :-1], rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(unshifted, want, rtol=0, atol=2e-5 * scale)  # the flag is the whole difference
    assert (got[:, 1:] - want[:, 1:]).abs().max() > 1.0  # ... and without it the alignment is off by one
    assert torch.equal(got[:, 0], unshifted[:, 0])  # position 0 keeps its own state


def test_the_bidirectional_mask_lets_early_positions_see_later_tokens(models):
    _, tok, dllm, dtok = models
    ids = tok(TEXT[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    other = ids.clone()
    other[0, -3] = dtok.mask_token_id  # a later token becomes MASK
    with torch.no_grad():
        a, b = dllm(ids), dllm(other)  # (1, L, V)
        ac, bc = dllm(ids, causal=True), dllm(other, causal=True)
    assert (a[0, 2] - b[0, 2]).abs().max() > 1e-3  # position 2 depends on token L − 3
    assert torch.equal(ac[0, : ids.shape[1] - 2], bc[0, : ids.shape[1] - 2])  # causal (shifted): up to L − 3 unchanged


def test_the_policy_reads_smollm2s_chat_format_and_samples_without_mask(models):
    """The policy built on the adapted model: BOS + ChatML (no system prompt), and the sampler never commits MASK."""
    pol = MaskedDiffusionPolicy(SmolLM2DiffusionLM(), gen_length=4, block_length=4, steps=2)
    ids, mask = pol.encode([{"prompt": "45123"}])
    assert pol.tokenizer.decode(ids[0][mask[0]]) == "<|im_start|>user\n45123<|im_end|>\n<|im_start|>assistant\n"
    batch = pol.rollout([{"prompt": "45123"}], 1, greedy=True)
    assert batch.completion_ids.shape == (1, 4) and not (batch.completion_ids == pol.mask_id).any()


def test_a_missing_checkpoint_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        SmolLM2DiffusionLM(checkpoint=str(tmp_path / "nope"))
