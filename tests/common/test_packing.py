"""Padding-free packing (CausalLMPolicy(pack=True)) and token-budget micro-batches from a recipe
(``micro_batch_tokens`` / ``pack`` in YAML): log-probs, entropies and gradients equal to the padded path on a tiny
real Llama with mixed prompt and completion lengths, one loop update and one recipe step giving the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.advantages.group import GRPO
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy, packable
from common.rollout.base import Sampling
from helpers import DIGITS

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt": p} for p in ["1+2", "12+345", "7", "99+1"]]  # 3, 6, 1, 4 characters: left padding


def policy(pack: bool, share: bool = True, dtype=torch.float32, attn: str | None = None) -> CausalLMPolicy:
    pol = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=2, num_heads=2, alphabet=DIGITS, seed=0),
                         Sampling(max_new_tokens=8), share_prompt=share, pack=pack).to(dtype)
    if attn is not None:
        pol.model.set_attn_implementation(attn)
    return pol


@pytest.fixture(scope="module")
def batch():
    """12 rows (4 prompts x G = 3) of real samples, completions cut to lengths 1..8 in mixed order."""
    torch.manual_seed(0)
    b = policy(False).rollout(PROMPTS, 3)
    T = b.completion_mask.shape[1]
    keep = torch.arange(T)[None, :] <= (torch.arange(b.batch_size) * 5 % 8)[:, None]  # lengths 1 6 3 8 5 2 7 4 1 ...
    return b.replace(completion_mask=b.completion_mask & keep)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_the_padded_path(batch, share, attn, one_thread):
    """One packed row of Σ lengths tokens (counted from the masks), and the padded path's log-probs, entropies
    and gradients: float64 to 1e-11, float32 to its rounding (different shapes sum in other orders)."""
    assert packable(batch) and not bool(batch.prompt_mask.all())  # some prompts are left-padded
    prompts = batch.prompt_mask[::3].sum() if share else batch.prompt_mask.sum()  # each group's prompt once
    n_tokens = int(prompts + batch.completion_mask.sum())
    # (eager attention's padded path in float64 gives NaN after left padding in this transformers: float32 only)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6))[attn == "eager":]:
        padded, packed = policy(False, share, dtype, attn), policy(True, share, dtype, attn)
        seen = []
        packed.model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
        out_a, out_b = padded(batch, hidden=True), packed(batch, hidden=True)
        assert seen == [(1, n_tokens)] and n_tokens < batch.batch_size * (batch.prompt_ids.shape[1] + 8)
        m = batch.completion_mask
        torch.testing.assert_close(out_b.hidden[m], out_a.hidden[m], rtol=0, atol=tol * 100)  # hidden-state methods'
        assert not out_b.hidden[~m].any()  # zeros off the mask
        assert bool((out_a.logprobs[m] < 0).all())  # real log-probs where it matters
        torch.testing.assert_close(out_b.logprobs, out_a.logprobs, rtol=0, atol=tol * 10)
        torch.testing.assert_close(out_b.entropy, out_a.entropy, rtol=0, atol=tol * 10)
        w = torch.linspace(-1, 1, m.numel(), dtype=dtype).reshape(m.shape)  # a loss weighting every token differently
        ((out_a.logprobs * w).sum() + out_a.entropy.sum()).backward()
        ((out_b.logprobs * w).sum() + out_b.entropy.sum()).backward()
        ga = torch.cat([p.grad.flatten() for p in padded.model.parameters()])
        gb = torch.cat([p.grad.flatten() for p in packed.model.parameters()])
        assert ga.abs().max() > 0.1 and (ga - gb).abs().max() <= tol * ga.abs().max(), (dtype, (ga - gb).abs().max())


def test_rows_packing_cannot_reproduce_take_the_padded_path(batch):
    """A completion with a hole (a masked token before a kept one) needs the hidden state of a dropped token: the
    policy runs such a batch padded, so the result is still the padded path's."""
    holed = batch.replace(completion_mask=batch.completion_mask.clone().index_put_((torch.tensor([3]), torch.tensor([2])),
                                                                                    torch.tensor(False)))
    assert packable(batch) and not packable(holed)
    with torch.no_grad():
        torch.testing.assert_close(policy(True)(holed).logprobs, policy(False)(holed).logprobs, rtol=0, atol=0)


def test_bad_attention_implementation_is_named(batch):
    pol = policy(True)
    pol.model.config._attn_implementation = "flash_attention_2"  # what a GPU user may load; no explicit 4D mask here
    with pytest.raises(ValueError, match="pack: .*flash_attention_2.*expected 'sdpa' or 'eager'"):
        pol(batch)


def test_loop_update_packed_in_token_micro_batches_equals_the_padded_update(batch, one_thread):
    """Loop(micro_batch_tokens) over a packing policy: one update moves the weights as the padded single micro-batch
    does (float64), per-token outputs back in rollout order at full width."""
    def score(b):
        r = (b.completion_ids == 7).double().mean(1) + 1e-3 * torch.arange(b.batch_size, dtype=torch.float64)
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",))

    pol_a, pol_b = policy(False, dtype=torch.float64), policy(True, dtype=torch.float64)
    loop_a = Loop(pol_a, score, GRPO(), ClippedPolicyLoss(), group_size=3)
    loop_b = Loop(pol_b, score, GRPO(), ClippedPolicyLoss(), group_size=3, micro_batch_tokens=40)
    rows = loop_a.advantage(score(batch))
    b = batch.replace(advantages=rows)
    assert len(loop_b.micro_batches(b)[0]) > 1
    before = [p.detach().clone() for p in pol_a.trainable_parameters()]
    for pol, loop in ((pol_a, loop_a), (pol_b, loop_b)):
        opt = torch.optim.SGD(pol.trainable_parameters(), lr=1.0)
        loop.update(b, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0.0))
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(pol_a.trainable_parameters(), before))
    gap = max((p.detach() - q.detach()).abs().max().item()
              for p, q in zip(pol_a.trainable_parameters(), pol_b.trainable_parameters()))
    assert moved > 1e-4 and gap <= 1e-6 * moved, (moved, gap)  # the head's float32 log-softmax, as test_token_batches
    with torch.no_grad():
        torch.testing.assert_close(loop_b.logprobs(b), loop_a.logprobs(b), rtol=0, atol=1e-6)


# a tiny character-level Llama (EOS is one of 14 tokens, so sampled lengths are mixed) and a dense reward, so that
# the step has non-zero advantages: what the recipe does at scale, in a second
SHRINK = """
model:
  init_args:
    policy: {class_path: common.models.TinyLlama, init_args: {alphabet: "0123456789+"}}
    rewards: [{class_path: common.rewards.length.LengthReward, init_args: {target: 4}}]
    sampling: {max_new_tokens: 10}
data: {init_args: {train_size: 64, val_size: 8}}
trainer: {max_steps: 2, logger: false, enable_progress_bar: false}
"""


def recipe_step(tmp_path: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    """One step of the demo recipe, shrunk, through the CLI (in process); the policy's weights after it."""
    from common.cli import main

    run = tmp_path / name
    run.mkdir()
    (run / "shrink.yaml").write_text(SHRINK)
    main(["fit", "--config", str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"), "--config", str(run / "shrink.yaml"),
          "--trainer.default_root_dir", str(run), *extra])
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.model.")}


def test_recipe_with_micro_batch_tokens_and_pack_trains_as_the_row_micro_batched_recipe(tmp_path, one_thread):
    """``micro_batch_tokens`` and ``pack`` from the command line (as from YAML): two steps of the demo recipe (32 rows
    of mixed lengths, 16 per micro-batch by rows) give the same weights within float32 rounding. Two steps: AdamW's
    first step is about lr·sign(g), blind to the gradient's scale; the second is not."""
    rows = recipe_step(tmp_path, "rows")
    packed = recipe_step(tmp_path, "packed", "--model.init_args.micro_batch_tokens", "64", "--model.init_args.pack", "true")
    start = TinyLlama(alphabet=DIGITS).load()[0].state_dict()
    moved = max((rows[f"policy.model.{k}"] - v).abs().max().item() for k, v in start.items())
    gap = max((rows[k] - packed[k]).abs().max().item() for k in rows)
    assert moved > 2e-5 and gap <= 1e-2 * moved, (gap, moved)  # lr = 2e-5 a step


def test_benchmark_quick_runs(tmp_path):
    env = {**os.environ, "ADVLAB_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/packing.py"), "--quick", "--allow-shared"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "packing_quick.md").read_text()
    assert "packed" in text and "padded rows" in text
