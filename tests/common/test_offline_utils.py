"""§15 utilities: IQL's expectile loss and AWR weights, PCPG's smoothing (common/offline_utils.py) and SharpeRatio@k
(common/metrics.py), against hand values and plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import SharpeRatioAtK, sharpe_ratio_at_k
from common.offline_utils import awr_weights, expectile_loss, smooth_over_time


def test_expectile_loss_hand_values_and_minimiser():
    u = torch.tensor([2.0, -1.0])
    assert expectile_loss(u, 0.7) == pytest.approx((0.7 * 4 + 0.3 * 1) / 2)
    assert expectile_loss(u, 0.7, mask=torch.tensor([False, True])) == pytest.approx(0.3)
    assert expectile_loss(u, 0.7, mask=torch.tensor([False, False])) == 0
    # the minimiser of E[ℓ_τ(x − v)] over v is the τ-expectile: above the mean for τ > 0.5, the mean at τ = 0.5
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        expectile_loss(x - v, 0.9).backward()
        opt.step()
    # the 0.9-expectile e solves 0.9·(1 − e) = 0.1·3e  ->  e = 0.9 / 1.2 = 0.75
    assert float(v) == pytest.approx(0.75, abs=1e-4)
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(u, 1.0)


def test_awr_weights_clip_no_overflow_detached():
    a = torch.tensor([0.0, 0.5, 1e4, -1e4], requires_grad=True)
    w = awr_weights(a, beta=3.0, max_weight=100.0)
    assert w.tolist()[:2] == pytest.approx([1.0, math.exp(1.5)])
    assert w[2] == pytest.approx(100.0) and w[3] == 0.0 and torch.isfinite(w).all() and not w.requires_grad
    with pytest.raises(ValueError, match="beta"):
        awr_weights(a, beta=-1.0)
    with pytest.raises(ValueError, match="finite"):
        awr_weights(torch.tensor([float("nan")]))


def test_smooth_over_time_matches_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 7)
    mask = torch.rand(3, 7) > 0.3
    x[~mask] = float("nan")  # masked values never enter
    k = [0.25, 0.5, 0.25]
    for renorm in (False, True):
        y = smooth_over_time(x, mask, k, renormalise=renorm)
        for b in range(3):
            for t in range(7):
                if not mask[b, t]:
                    assert y[b, t] == 0
                    continue
                num = sum(k[j + 1] * float(x[b, t + j]) for j in (-1, 0, 1) if 0 <= t + j < 7 and mask[b, t + j])
                den = sum(k[j + 1] for j in (-1, 0, 1) if 0 <= t + j < 7 and mask[b, t + j])
                assert float(y[b, t]) == pytest.approx(num / den if renorm else num, abs=1e-6)
    asym = smooth_over_time(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool), [0.0, 0.0, 1.0])
    assert asym.tolist() == [[2.0, 3.0, 0.0]]  # w_{+1}: y_t = x_{t+1}
    with pytest.raises(ValueError, match="odd"):
        smooth_over_time(x, mask, [0.5, 0.5])


def test_sharpe_ratio_at_k_hand_values():
    est = torch.tensor([0.9, 0.1, 0.5, 0.7])
    true = torch.tensor([1.0, 3.0, 2.0, 0.0])
    # top-2 by estimate: policies 0, 3 -> J = {1, 0}; best 1, population std 0.5; J_b = 0.5 -> (1 − 0.5)/0.5 = 1
    assert float(sharpe_ratio_at_k(est, true, 0.5, 2)) == pytest.approx(1.0)
    # top-3: {1, 0, 2}: best 2, std sqrt(2/3)
    assert float(sharpe_ratio_at_k(est, true, 0.5, 3)) == pytest.approx(1.5 / math.sqrt(2 / 3))
    assert float(sharpe_ratio_at_k(est, true, 0.5, 1)) == 0.0  # std@1 = 0: 0, never inf
    m = SharpeRatioAtK(k=2, behaviour_value=0.5)
    m.update(est[:2], true[:2])
    m.update(est[2:], true[2:])
    assert float(m.compute()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must"):
        sharpe_ratio_at_k(est, true, 0.5, 5)
