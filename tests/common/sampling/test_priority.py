"""SPO's prioritised prompt sampling (common/sampling/priority.py) and the data module that uses it
(text_reasoning/spo.py): hand-computed weights, bad input, and draws as a pure function of the batch number."""

import pytest
import torch

from common.sampling.priority import spo_priority
from text_reasoning.data import Arithmetic
from text_reasoning.spo import PrioritisedData


def test_hand_computed_weights() -> None:
    alpha, beta = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    # v = (0.5, 0.75): sqrt(v(1-v)) = (0.5, 0.433013); + 0.05 -> (0.55, 0.483013); P_0 = 0.55 / 1.033013 = 0.532423
    torch.testing.assert_close(spo_priority(alpha, beta, gamma=0.0, eps_explore=0.05)[0], torch.tensor(0.532423), atol=1e-6, rtol=0)
    # gamma = 1, N_eff = (2, 4): (0.25, 0.108253) + 0.05 = (0.3, 0.158253); P_0 = 0.3 / 0.458253 = 0.654660
    torch.testing.assert_close(spo_priority(alpha, beta, gamma=1.0, eps_explore=0.05)[0], torch.tensor(0.654660), atol=1e-6, rtol=0)
    # a certain prompt (v = 1) keeps only the exploration weight
    p = spo_priority(torch.tensor([5.0, 2.0]), torch.tensor([0.0, 2.0]), gamma=0.0, eps_explore=0.05)
    torch.testing.assert_close(p, torch.tensor([0.05 / 0.6, 0.55 / 0.6]))


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="gamma must be in"):
        spo_priority(torch.ones(2), torch.ones(2), gamma=2.0, eps_explore=0.05)
    with pytest.raises(ValueError, match="alpha and beta"):
        spo_priority(torch.ones(2), torch.ones(3), gamma=0.0, eps_explore=0.05)
    with pytest.raises(ValueError, match="eps_explore"):
        PrioritisedData(tasks=[Arithmetic()], eps_explore=-1.0)


def test_draws_are_distinct_follow_the_weights_and_repeat_per_batch_number() -> None:
    data = PrioritisedData(tasks=[Arithmetic(digits=1)], train_size=10, val_size=2, prompts_per_step=3)
    data.setup()
    assert [s["uid"] for s in data.train_set] == list(range(10))
    probs = torch.zeros(10, dtype=torch.float64)
    probs[[2, 5, 7]] = 1.0 / 3
    assert sorted(s["uid"] for s in data.draw(4, probs)) == [2, 5, 7]
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    first = [s["uid"] for s in data.draw(9, uniform)]
    assert len(set(first)) == 3 and first == [s["uid"] for s in data.draw(9, uniform)]
