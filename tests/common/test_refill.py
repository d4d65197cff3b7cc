"""Dynamic sampling refills a step from new prompts (DAPO, arXiv 2503.14476, §3.2 and Algorithm 1): each refill round
takes the next batch of the data module's stream, never the step's own prompts again, and the next step continues
after the refills, so every batch of the stream is trained on once. Real tiny model, real generation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from common.data import PromptStream
from common.methods.base import Method
from common.models import TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling
from common.sampling.filters import DynamicSampling
from helpers import DIGITS, digit_data, digit_prompts
from text_reasoning.module import TextReasoningModule


class HasSeven(RewardFunction):
    name = "has7"

    def __call__(self, completions, samples):
        return torch.tensor([float("7" in c) for c in completions])


class RoundLog(Method):
    """Records the prompts of every rollout round (after_rollout runs once per round)."""

    def __init__(self):
        super().__init__()
        self.rounds: list[list[str]] = []

    def after_rollout(self, loop, batch):
        self.rounds.append(list(dict.fromkeys(s["prompt"] for s in batch.samples)))  # the round's prompts, in order
        return batch


def tiny(rounds: int, log: RoundLog | None = None, max_groups: int = 4) -> TextReasoningModule:
    return TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                               rewards=[HasSeven()], verifier=HasSeven(), sampling=Sampling(max_new_tokens=4),
                               group_size=4, selector=DynamicSampling(max_groups=max_groups),
                               max_generation_rounds=rounds, methods=[log] if log is not None else [],
                               log_samples_every=0)


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def test_refill_rounds_draw_the_next_batches_of_the_stream():
    n, per_step, steps = 64, 2, 3
    log = RoundLog()
    module, data = tiny(rounds=4, log=log), digit_data(n, per_step)
    L.seed_everything(0, verbose=False)
    trainer(steps).fit(module, datamodule=data)
    # per step, 1 to 4 rounds: the step's batch, then refills (2 prompts x 4 samples give at most 2 mixed groups of
    # the 4 wanted, so a step refills unless its first round already had enough)
    assert len(log.rounds) > steps, "no step refilled: the test would not see a refill round"
    stream = iter(PromptStream(digit_prompts(n), per_step, seed=0))
    expected = [[s["prompt"] for s in next(stream)] for _ in log.rounds]
    assert log.rounds == expected  # round k of the run is batch k of the stream: refills are new, consecutive batches
    assert data.batches_served == len(log.rounds)  # the data position counts every round (exact resume)
    seen = [p for r in log.rounds for p in r]
    assert len(seen) == len(set(seen))  # no prompt sampled twice (64 prompts: the stream is within its first pass)


def test_every_refill_prompt_is_new_to_its_step():
    log = RoundLog()
    module = tiny(rounds=3, log=log, max_groups=8)  # 8 groups from 2 prompts a round: every step uses all 3 rounds
    L.seed_everything(1, verbose=False)
    trainer(2).fit(module, datamodule=digit_data(32, 2))
    assert len(log.rounds) == 6
    for step in range(2):
        first, *refills = log.rounds[3 * step : 3 * step + 3]
        assert all(not set(first) & set(r) for r in refills), (first, refills)


def test_refill_rounds_without_a_source_of_new_prompts_fail_naming_the_argument():
    module = tiny(rounds=2)
    with pytest.raises(ValueError, match="max_generation_rounds=2 refills a step from new prompts"):
        module.loop.collect(digit_prompts(2))
    module.loop.collect(digit_prompts(2), more=lambda: digit_prompts(2, seed=1))  # plain code passes a function


def test_a_resumed_data_position_continues_the_stream():
    # the checkpointed position after 5 rounds: the next step trains on stream batch 5 and refills from 6, 7, ...
    log, data = RoundLog(), digit_data(64, 2)
    data.load_state_dict({"batches_served": 5})
    L.seed_everything(0, verbose=False)
    trainer(1).fit(tiny(rounds=3, log=log, max_groups=8), datamodule=data)
    stream = iter(PromptStream(digit_prompts(64), 2, seed=0, start=5))
    assert log.rounds == [[s["prompt"] for s in next(stream)] for _ in range(3)] and data.batches_served == 8
