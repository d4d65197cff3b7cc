"""CausalLMPolicy(gradient_checkpointing=True): each decoder layer is recomputed in the backward instead of keeping
its activations. It must change memory only: log-probs, entropies and gradients equal those without it, on the
shared-prompt path (whose KV cache the layers append to, and the recompute appends to again) and the plain one,
with full fine-tuning and with LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.models import LoRA, TinyLlama
from common.policies.causal_lm import CausalLMPolicy, checkpointed_layers
from common.rollout.base import Sampling
from helpers import DIGITS

EPS32 = torch.finfo(torch.float32).eps


def policy(gradient_checkpointing: bool, share_prompt: bool, lora: bool) -> CausalLMPolicy:
    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=3, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=6), share_prompt=share_prompt,
                          lora=LoRA(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]) if lora else None,
                          gradient_checkpointing=gradient_checkpointing)


def pair(share_prompt: bool, lora: bool) -> tuple[CausalLMPolicy, CausalLMPolicy]:
    """(without, with) checkpointing, identical weights (LoRA's B made non-zero so its A gets a gradient too)."""
    off, on = policy(False, share_prompt, lora), policy(True, share_prompt, lora)
    if lora:
        with torch.no_grad():
            for name, p in off.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn_like(p))
    on.model.load_state_dict(off.model.state_dict())
    return off, on


def batch_of(pol: CausalLMPolicy):
    """Real sampled completions: 3 prompts of different lengths (left padding) x G = 3."""
    torch.manual_seed(0)
    return pol.rollout([{"prompt": "1+2"}, {"prompt": "12345+678"}, {"prompt": "9"}], 3)


def loss_and_grads(pol: CausalLMPolicy, batch, weights: torch.Tensor):
    """A loss that touches every completion position: sum w·log π + 0.1·H; returns outputs and named grads."""
    pol.model.zero_grad(set_to_none=True)
    out = pol(batch)
    (out.logprobs * weights).sum().add(0.1 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    return out.logprobs.detach(), out.entropy.detach(), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared_prompt", "plain"])
def test_checkpointing_changes_neither_logprobs_nor_gradients(share_prompt, lora, one_thread):
    off, on = pair(share_prompt, lora)
    batch = batch_of(off)
    if share_prompt:  # the shared path must really be taken: groups share their prompt rows
        assert len(torch.unique(batch.group_ids)) < batch.batch_size
    weights = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    lp0, ent0, g0 = loss_and_grads(off, batch, weights)
    lp1, ent1, g1 = loss_and_grads(on, batch, weights)
    # The recompute runs the same float32 kernels on the same inputs and the backward graph is the original one,
    # so values agree to rounding: a few ulps of each quantity's scale (a reordered sum of n terms would be off
    # by at most n·eps·max|term|; 64 eps covers that for the <= 27 positions and 3 layers here).
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=64 * EPS32 * lp0.abs().max().item())
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=64 * EPS32 * ent0.abs().max().item())
    assert g0.keys() == g1.keys() and g0
    if lora:
        assert all("lora_" in n for n in g0)
        assert all(g.abs().max() > 0 for g in g0.values())  # A and B both get a gradient, with and without
    for name in g0:
        scale = g0[name].abs().max().item()
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=64 * EPS32 * max(scale, 1e-12), msg=name)


def test_checkpointing_on_the_shared_path_equals_the_plain_forward_without_it(one_thread):
    """The two changes together (prompt run once per group, layers recomputed) against the reference computation:
    one plain forward per row, activations kept. Tolerance as tests/text_reasoning's shared-vs-plain test (the
    two paths sum attention over the prompt in different blocks)."""
    plain, _ = pair(share_prompt=False, lora=False)
    _, shared_ckpt = pair(share_prompt=True, lora=False)
    batch = batch_of(plain)
    weights = torch.ones(batch.completion_mask.shape)
    lp0, _, g0 = loss_and_grads(plain, batch, weights)
    lp1, _, g1 = loss_and_grads(shared_ckpt, batch, weights)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_layers_are_recomputed_and_their_activations_not_kept(one_thread):
    """With checkpointing, the tensors autograd keeps outside the checkpointed layers are a fraction of what it
    keeps without (only the head's and the cache expansion's), and each layer's MLP runs twice (forward, then the
    backward's recompute). Without a graph (old/reference log-probs) nothing is wrapped or recomputed."""
    off, on = pair(share_prompt=True, lora=False)
    batch = batch_of(off)
    saved, runs = {}, {}

    def measure(pol, key):
        bytes_kept, calls = [0], [0]

        def pack(t):
            bytes_kept[0] += t.numel() * t.element_size()
            return t

        # a pre-hook: the recompute stops early, inside the MLP, once its last saved tensor is back (post-hooks miss it)
        hooks = [layer.mlp.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
                 for layer in pol.model.model.layers]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pol(batch)
        out.logprobs.sum().backward()
        saved[key], runs[key] = bytes_kept[0], calls[0]
        with torch.no_grad():
            pol(batch)
        runs[key + "_no_grad"] = calls[0] - runs[key]
        for h in hooks:
            h.remove()

    measure(off, "off")
    measure(on, "on")
    layers, passes = 3, 2  # the prompt pass and the completion pass of the shared path
    assert runs == {"off": layers * passes, "off_no_grad": layers * passes,
                    "on": 2 * layers * passes, "on_no_grad": layers * passes}
    assert saved["on"] < 0.5 * saved["off"], saved
    assert not any("forward" in vars(m) for m in on.model.modules())  # the wrappers are removed after each call


def test_a_model_without_decoder_layers_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        with checkpointed_layers(nn.Sequential(nn.Linear(2, 2))):
            pass
