"""One-step off-policy rollouts (common/methods/overlap.py) on a tiny real Llama: the batch trained on at step k is
exactly the one a plain synchronous ``generate`` samples from the weights before update k−1 with the same seed;
its behaviour log-probs are those of a plain forward of those weights; the loss weights tokens by π_old/μ computed
from them; the flag off is today's loop; a resume from the method's state continues exactly."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.advantages.group import GRPO
from common.loop import Loop, Stepper
from common.losses.correction import RolloutCorrection
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.overlap import OneStepOffPolicy
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts

ROOT = Path(__file__).resolve().parents[1]
G = 4
PROMPTS = [digit_prompts(2, seed=s) for s in range(4)]  # one prompt batch a step


def policy() -> CausalLMPolicy:
    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=6, logprobs=True))


def score(batch):  # a reward with spread within groups: the completion's length
    return batch.replace(rewards=batch.completion_mask.sum(1).float())


def make(methods=(), loss=None):
    pol = policy()
    loss = loss if loss is not None else RolloutCorrection(ClippedPolicyLoss(), cap=1e6)  # cap: no truncation
    loop = Loop(pol, score, GRPO(), loss, methods=list(methods), group_size=G)
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=3e-2)
    return pol, loop, Stepper(opt, pol.trainable_parameters(), max_grad_norm=0.0)


def snapshot_policy(state: dict) -> CausalLMPolicy:
    pol = policy()
    pol.model.load_state_dict(state)
    return pol


def test_step_k_trains_on_the_batch_the_weights_before_update_k_minus_1_sample_with_its_seed(one_thread):
    method = OneStepOffPolicy()
    pol, loop, stepper = make([method])
    torch.manual_seed(123)
    seed0 = int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(123)))  # the hook's first draw
    weights, seeds, used, metrics = [], [], [], []
    for k in range(3):
        weights.append(copy.deepcopy(pol.model.state_dict()))  # θ_k, before update k
        got = loop.collect(PROMPTS[k])
        seeds.append(method.pending.seed)  # the seed of the batch for step k+1
        torch.randn(10_000)  # the main thread draws from the global RNG while the thread samples: no effect
        used.append(got.kept)
        metrics.append(loop.update(got.kept, stepper))
    # step 0 samples its own prompts synchronously with θ_0; step k >= 1 the prompts of step k−1 with θ_{k−1}
    for k, (state, prompts, seed) in enumerate([(weights[0], PROMPTS[0], seed0), (weights[0], PROMPTS[0], seeds[0]),
                                                (weights[1], PROMPTS[1], seeds[1])]):
        ref = snapshot_policy(state)
        torch.manual_seed(seed)
        want = ref.rollout(prompts, G)  # today's synchronous HF path, global RNG seeded with the same seed
        batch = used[k]
        assert torch.equal(batch.completion_ids, want.completion_ids) and torch.equal(batch.completion_mask, want.completion_mask)
        assert torch.equal(batch.behaviour_logprobs, want.behaviour_logprobs), k
        assert batch.completions == want.completions and batch.samples == want.samples
        # the behaviour log-probs are a plain forward of the snapshot (float32 rounding of the KV-cached decode)
        m = batch.completion_mask
        torch.testing.assert_close(ref(batch).logprobs.detach()[m], batch.behaviour_logprobs[m], rtol=0, atol=1e-5)
    # the weights moved, so the stale batch is off-policy and the correction weights π_old/μ are not 1
    k, batch = 2, used[2]
    old = snapshot_policy(weights[2])(batch).logprobs.detach()  # π_old = θ_2, what update 2 starts from
    m = batch.completion_mask
    assert (old - batch.behaviour_logprobs)[m].abs().max() > 1e-3
    w = torch.exp(old - batch.behaviour_logprobs)[m]  # hand-computed token weights, cap 1e6 never reached
    torch.testing.assert_close(metrics[2]["is_ratio_mean"], w.mean(), rtol=1e-5, atol=0)
    assert abs(float(w.mean()) - 1) > 1e-3
    torch.testing.assert_close(metrics[0]["is_ratio_mean"], torch.tensor(1.0), rtol=0, atol=1e-5)  # step 0: on-policy
    method.pending.result()


def test_the_flag_off_is_the_synchronous_loop(one_thread):
    finals = []
    for methods in ([], [OneStepOffPolicy(enabled=False)]):
        pol, loop, stepper = make(methods)
        torch.manual_seed(5)
        for k in range(2):
            loop.update(loop.collect(PROMPTS[k]).kept, stepper)
        finals.append(pol.model.state_dict())
    for name, v in finals[0].items():
        assert torch.equal(finals[1][name], v), name


def test_resume_from_the_methods_state_continues_exactly(one_thread):
    def run(steps, pol, loop, stepper):
        for k in steps:
            loop.update(loop.collect(PROMPTS[k]).kept, stepper)

    torch.manual_seed(9)
    pol, loop, stepper = make([OneStepOffPolicy()])
    run(range(4), pol, loop, stepper)
    straight = pol.model.state_dict()

    torch.manual_seed(9)
    method = OneStepOffPolicy()
    pol, loop, stepper = make([method])
    run(range(2), pol, loop, stepper)
    state = copy.deepcopy({"model": pol.model.state_dict(), "opt": stepper.optimizer.state_dict(),
                           "method": method.state_dict(), "rng": torch.get_rng_state()})  # the checkpoint of step 1
    assert state["method"]["_extra_state"]["pending"]["completion_ids"].shape[0] == 2 * G  # the batch for step 2

    method = OneStepOffPolicy()  # a fresh process
    pol, loop, stepper = make([method])
    pol.model.load_state_dict(state["model"]), stepper.optimizer.load_state_dict(state["opt"])
    method.load_state_dict(state["method"]), torch.set_rng_state(state["rng"])
    run(range(2, 4), pol, loop, stepper)
    for name, v in straight.items():
        assert torch.equal(pol.model.state_dict()[name], v), name


def test_needs_the_rollout_correction():
    with pytest.raises(ValueError, match="RolloutCorrection"):
        make([OneStepOffPolicy()], loss=ClippedPolicyLoss())


def test_the_benchmarks_quick_mode_times_both_loops_and_writes_nothing(tmp_path):
    env = {**os.environ, "ADVLAB_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/overlap.py", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in proc.stdout.splitlines() if r.startswith("| ") and " s |" in r}
    assert sorted(rows) == ["one-step overlap", "synchronous"]
    for step, collect, update, ratio in rows.values():  # a step is its collect plus its update
        s, c, u = (float(x.strip().removesuffix(" s")) for x in (step, collect, update))
        assert s > 0 and abs(s - c - u) <= 0.011
    assert "Load average" in proc.stdout and not any(tmp_path.iterdir())
