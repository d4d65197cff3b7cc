"""Masked-diffusion SFT (diffusion/dllm/sft.py) on the shared SFT module: the prompt is never masked, the mask rate
is E[t], the loss equals a plain per-example loop over full logits for the same draws, packing changes nothing, and a
few steps lower the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.loop import Stepper
from common.sft import SFTModule, encode_examples, sft_update
from diffusion.dllm.data import ALPHABET
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy
from diffusion.dllm.sft import ChainSumTraces, MaskedDiffusionCE


def make_module(shift: bool = False) -> SFTModule:
    policy = MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=ALPHABET, hidden_size=32, num_layers=2, num_heads=4, shift=shift))
    return SFTModule(policy=policy, objective=MaskedDiffusionCE(pad_to=12), lr=1e-3)


def examples(n: int = 6, trace: str = "concise") -> list[dict]:
    return ChainSumTraces(trace=trace, held_out=20).make(n, 0)


def test_traces_padding_and_the_prompt_is_never_masked():
    module = make_module()
    ex = examples(6)
    tok = module.policy.tokenizer
    batch = encode_examples(module.policy, module.objective, ex)
    for e, s in enumerate(ex):  # the response is the trace, EOS-padded to gen_length = 12
        targets = batch.input_ids[(batch.example_ids == e) & batch.target_mask].tolist()
        trace = tok(s["trace"], add_special_tokens=False)["input_ids"]
        assert targets == trace + [tok.eos_token_id] * (12 - len(trace))
        prompt = batch.input_ids[(batch.example_ids == e) & ~batch.target_mask].tolist()
        assert prompt == module.policy.encode([s])[0][0].tolist()  # the RL policy's own prompt encoding
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(300):
        t, masked = module.objective.draw(batch, g)
        assert not (masked & ~batch.target_mask).any()  # never a prompt or padding token
        assert ((t >= 1e-3) & (t <= 1)).all()
        rates.append(masked.sum() / batch.target_mask.sum())
    # E[mask rate] = E[t] = (1 - ε)/2 + ε; 300 x 6 independent t ~ U: std of the mean ~ sqrt(1/12 / 1800) = 0.007
    assert abs(float(torch.stack(rates).mean()) - (0.5 * (1 - 1e-3) + 1e-3)) < 0.03


def plain_loss(policy, batch, t, masked, examples_):
    """Each example on its own row: BidirectionalLM's full logits, CE at its masked response tokens / t, summed;
    divided by the batch's number of response tokens."""
    total, count = torch.zeros(()), 0
    for e in range(len(examples_)):
        sel = batch.example_ids == e
        ids, m, te = batch.input_ids[sel], masked[sel], t[sel]
        noisy = ids.masked_fill(m, policy.tokenizer.mask_token_id)
        logits = policy.model(noisy[None])[0]  # (L_e, V)
        total = total + (F.cross_entropy(logits[m], ids[m], reduction="none") / te[m]).sum()
        count += int((sel & batch.target_mask).sum())
    return total / count


def test_loss_equals_a_plain_loop_and_packing_changes_nothing():
    for shift in (False, True):
        module = make_module(shift)
        policy, obj = module.policy, module.objective
        ex = examples(6, "verbose")  # lengths differ: padding and packing matter
        plain = encode_examples(policy, obj, ex)
        packed = encode_examples(policy, obj, ex, pack_length=64)
        assert packed.input_ids.shape[0] < plain.input_ids.shape[0]
        t, masked = obj.draw(plain, torch.Generator().manual_seed(1))
        tp, mp = obj.draw(packed, torch.Generator().manual_seed(1))
        for e in range(len(ex)):  # the same draws per example, packed or not
            assert torch.equal(masked[plain.example_ids == e], mp[packed.example_ids == e])
        with torch.no_grad():
            total, count = obj.loss(policy, plain, t, masked)
            total_p, count_p = obj.loss(policy, packed, tp, mp)
            ref = plain_loss(policy, plain, t, masked, ex)
        assert int(count) == int(count_p)
        # float32 logits of a 2-layer d=32 model; ~50 CE terms each within a few ulp, weighted by 1/t <= 1e3 for the
        # rare small t: 1e-5 relative of the mean
        torch.testing.assert_close(total / count, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(total_p, total, rtol=1e-5, atol=1e-5)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    module = make_module()
    policy, obj = module.policy, module.objective
    params = [p for p in policy.model.parameters() if p.requires_grad]
    stepper = Stepper(torch.optim.AdamW(params, lr=3e-3), params)
    data = examples(32)
    g = torch.Generator().manual_seed(0)
    batch = encode_examples(policy, obj, data)

    def eval_loss():  # the same 4 draws each time: a fixed estimate of the expectation
        with torch.no_grad():
            gen = torch.Generator().manual_seed(123)
            return sum(float(obj.loss(policy, batch, *obj.draw(batch, gen))[0]) for _ in range(4)) / (4 * int(batch.target_mask.sum()))

    before = eval_loss()
    policy.model.train()
    for _ in range(25):
        idx = torch.randint(len(data), (8,), generator=g).tolist()
        sft_update(policy, obj, encode_examples(policy, obj, [data[i] for i in idx], pack_length=128), stepper)
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
