"""GA-GRPO: hand-computed weights, clipping to the bounds, all-equal groups and groups of one at exactly zero."""

from __future__ import annotations

import math

import pytest
import torch

from common.batch import RolloutBatch
from multimodal.medscope.advantage import GAGRPO, ga_grpo


def test_multiplicative_by_hand_and_clipped():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    e = torch.tensor([1.0, 0.0, 0.2, 0.8])  # mean 0.5
    sd = math.sqrt(4 / 3 * 0.25)  # unbiased std of (1, 0, 1, 0)
    a_hat = [(x - 0.5) / (sd + 1e-6) for x in r.tolist()]
    # gamma 2 pushes rows 0 and 3 past the bounds: w = 1 + 2·sign(Â)·(e − 0.5)
    w = [min(max(1 + 2 * math.copysign(1, a) * (x - 0.5), 0.5), 1.5) for a, x in zip(a_hat, e.tolist())]
    assert w == [1.5, 1.5, 0.5, 0.5]  # clipped at both ends (raw 2.0, 2.0, 0.4, 0.4)
    out = ga_grpo(r, e, torch.zeros(4, dtype=torch.long), gamma=2.0)
    torch.testing.assert_close(out, torch.tensor([wi * ai for wi, ai in zip(w, a_hat)]), rtol=0, atol=1e-6)
    inner = ga_grpo(r, e, torch.zeros(4, dtype=torch.long), gamma=0.5)
    w_in = [1 + 0.5 * math.copysign(1, a) * (x - 0.5) for a, x in zip(a_hat, e.tolist())]  # 1.25, 1.25, 0.85, 0.85
    torch.testing.assert_close(inner, torch.tensor([wi * ai for wi, ai in zip(w_in, a_hat)]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_all_equal_groups_and_groups_of_one_are_zero(mode):
    r = torch.tensor([0.7, 0.7, 0.7, 0.2, 0.9, 0.4])
    e = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.1, 0.9])
    g = torch.tensor([0, 0, 0, 1, 1, 2])  # group 0 all equal rewards (evidence varies), group 2 a single row
    out = ga_grpo(r, e, g, mode=mode)
    assert torch.isfinite(out).all()
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[5].item() == 0.0
    assert out[3] < 0 < out[4]


def test_additive_by_hand_and_the_estimator_reads_the_grounding_component():
    r, e, g = torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.6]), torch.zeros(2, dtype=torch.long)
    sd_r, sd_e = math.sqrt(0.5), math.sqrt(2 * 0.04)
    want = [0.5 / (sd_r + 1e-6) + 0.5 * (-0.2) / (sd_e + 1e-6), -0.5 / (sd_r + 1e-6) + 0.5 * 0.2 / (sd_e + 1e-6)]
    torch.testing.assert_close(ga_grpo(r, e, g, mode="additive"), torch.tensor(want), rtol=0, atol=1e-5)
    b = RolloutBatch(completion_ids=torch.zeros(2, 1, dtype=torch.long), completion_mask=torch.ones(2, 1, dtype=torch.bool),
                     group_ids=g, rewards=r, reward_components=torch.stack([r, e, torch.ones(2)], 1),
                     reward_names=("accuracy", "grounding", "format"))
    torch.testing.assert_close(GAGRPO()(b), ga_grpo(r, e, g))
    with pytest.raises(ValueError, match="evidence='iou'"):
        GAGRPO(evidence="iou")(b)
    with pytest.raises(ValueError, match="low and high"):
        GAGRPO(low=1.2)
    with pytest.raises(ValueError, match="mode"):
        GAGRPO(mode="both")
