"""ADHint rollouts (the ADHintRollout method part) through the text-reasoning module on a tiny real model with real
generation: naive and hinted rows of a group, the hint forced as the first completion tokens (RolloutBatch.hint_len),
the schedule from the naive rewards, no hint for an always-solved prompt, and a training step with the token-level
ADHint advantages."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from common.advantages.adhint import ADHint
from common.models import TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from text_reasoning.hints import ADHintRollout, reference_solution
from text_reasoning.module import TextReasoningModule


class Constant(RewardFunction):
    name = "constant"

    def __init__(self, value: float):
        self.value = value

    def __call__(self, completions, samples):
        return torch.full((len(completions),), self.value)


def make_module(reward: float = 0.0, naive_samples: int = 2, omega_min: float = 0.0, omega_max: float = 0.5,
                noise: float = 0.0, **overrides) -> TextReasoningModule:
    kwargs = dict(
        policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
        rewards=[Constant(reward)], verifier=Constant(reward), sampling=Sampling(max_new_tokens=4),
        group_size=6, lr=3e-3, log_samples_every=0, advantage=ADHint(),
        methods=[ADHintRollout(naive_samples=naive_samples, omega_min=omega_min, omega_max=omega_max, noise=noise)],
    )
    kwargs.update(overrides)
    return TextReasoningModule(**kwargs)


def prompts_with_solutions(n: int) -> list[dict]:
    return [dict(p, solution=f"{p['prompt']}={p['answer']}") for p in digit_prompts(n)]


def test_hard_prompts_get_the_scheduled_hint_as_forced_completion_prefix():
    module = make_module(reward=0.0)  # nothing solved: Diff = 1, ω = ω_max = 0.5
    prompts = prompts_with_solutions(2)
    torch.manual_seed(0)
    batch = module.loop.rollout(prompts)
    assert batch.batch_size == 2 * 6 and batch.hint_len.dtype == torch.long
    assert sorted(batch.group_ids.tolist()) == [0] * 6 + [1] * 6
    for p, s in enumerate(prompts):
        ref = module.policy.tokenizer(reference_solution(s), add_special_tokens=False)["input_ids"]  # e.g. "12+34=46": 8 tokens
        rows = (batch.group_ids == p).nonzero().flatten().tolist()
        k = [int(batch.hint_len[i]) for i in rows]
        assert sorted(k) == [0, 0] + [len(ref) // 2] * 4  # 2 naive, 4 hinted with ⌊0.5·|y*|⌋ tokens
        prompt_rows = {tuple(batch.prompt_ids[i][batch.prompt_mask[i]].tolist()) for i in rows}
        assert len(prompt_rows) == 1  # hinted rows keep the plain prompt: the hint is in the completion
        for i in rows:
            n = int(batch.hint_len[i])
            assert batch.completion_ids[i, :n].tolist() == ref[:n] and bool(batch.completion_mask[i, :n].all())
            assert batch.completions[i].startswith(module.policy.tokenizer.decode(ref[:n]))
    assert reference_solution({"task": "arithmetic", "operands": [3, 4], "op": "+", "answer": "7"}) == "3 + 4 = 7"


def test_an_always_solved_prompt_gets_no_hint():
    module = make_module(reward=1.0, noise=0.05)  # Diff = 0 -> ω = 0 even with noise
    torch.manual_seed(0)
    batch = module.loop.rollout(prompts_with_solutions(2))
    assert batch.hint_len.tolist() == [0] * 12


def test_a_training_step_uses_token_level_advantages_with_protected_hints():
    module = make_module(reward=0.0, rewards=[Constant(0.0)])
    prompts = prompts_with_solutions(4)
    torch.manual_seed(0)
    rollouts = module.score(module.loop.rollout(prompts[:2]))
    rollouts = rollouts.replace(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0] * 2))  # a mixed group
    A = module.advantage(rollouts)
    assert A.shape == rollouts.completion_mask.shape
    for i, n in enumerate(rollouts.hint_len.tolist()):
        if n and rollouts.rewards[i] == 0:
            assert A[i, :n].abs().max() == 0 and A[i, n] < 0
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(prompts, batch_size=2, collate_fn=list))
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    assert trainer.logged_metrics["train/hinted_frac"] == 4 / 6  # 2 naive + 4 hinted rows per group


def test_bad_arguments():
    with pytest.raises(ValueError, match="naive_samples"):
        make_module(naive_samples=6)
    with pytest.raises(ValueError, match="omega_min"):
        make_module(omega_min=0.9, omega_max=0.5)
    with pytest.raises(ValueError, match=r"ADHint requires RolloutBatch.hint_len"):  # the estimator without the method
        make_module(methods=[])
