"""DRPO (common/losses/drpo.py): the paper's sign claim against GRPO with a length penalty, the closed-form
weights, gradients vs a plain-loop objective, the KL hinge, skipped groups, micro-batch splits and bad inputs."""

import math

import pytest
import torch

from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.drpo import DRPOLoss, drpo_objective


def make_batch(mask, group_ids, correct=None, rewards=None):
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, correct=correct, rewards=rewards)


def paper_group():
    """4 correct of lengths (100, 200, 400, 800), 4 wrong; C = 1000 (spec §6 (e))."""
    L = torch.tensor([100, 200, 400, 800, 300, 300, 300, 300])
    mask = torch.arange(1000)[None, :] < L[:, None]
    correct = torch.tensor([True] * 4 + [False] * 4)
    return L, mask, correct


def naive_objective(logprobs, mask, correct, group_ids, lam, tau, C):
    """Plain loop over groups: J_k = Σ_P w s − τ log mean_N exp(s/τ), 0 unless both classes; mean over K."""
    total, K = 0.0, 0
    for k in torch.unique(group_ids).tolist():
        rows = (group_ids == k).nonzero().flatten().tolist()
        K += 1
        s = {i: logprobs[i][mask[i]].mean() for i in rows if mask[i].any()}
        P = [i for i in s if correct[i]]
        N = [i for i in s if not correct[i]]
        if not P or not N:
            continue
        z = torch.tensor([(1 - mask[i].sum().item() / C) / lam for i in P], dtype=torch.float64)
        w = torch.softmax(z, 0)
        pos = sum(w[j] * s[i] for j, i in enumerate(P))
        neg = tau * torch.log(torch.stack([torch.exp(s[i] / tau) for i in N]).mean())
        total = total + pos - neg
    return total / K


def test_paper_sign_check_drpo_vs_grpo_with_length_penalty() -> None:
    L, mask, correct = paper_group()
    # GRPO with r = 1 − L/C for correct, 0 for wrong: r = (0.9, 0.8, 0.6, 0.2, 0, 0, 0, 0), mean 0.3125
    # → the 800-token correct answer has r − mean = 0.2 − 0.3125 < 0: a negative advantage
    r = torch.where(correct, 1 - L / 1000, torch.zeros(8)).double()
    A = grpo(r, torch.zeros(8, dtype=torch.long))
    assert A[3].item() < 0 and bool((A[:3] > 0).all())
    # DRPO: w = softmax((1 − u)/0.1) over the correct rows, all > 0 and decreasing in length;
    # ∂loss/∂s_i = −w_i/K < 0 for every correct i
    lp = (-torch.rand(8, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    out = DRPOLoss(max_len=1000)(lp, lp.detach(), torch.zeros(8), mask, batch=make_batch(mask, torch.zeros(8, dtype=torch.long), correct))
    out.loss.backward()
    dloss_ds = lp.grad.sum(1)  # s_i is a mean over L_i tokens, so Σ_t ∂loss/∂ℓ_t = ∂loss/∂s_i
    z = torch.tensor([0.9, 0.8, 0.6, 0.2], dtype=torch.float64) / 0.1  # (1 − u)/λ = (9, 8, 6, 2)
    w = torch.softmax(z, 0)  # (0.7049, 0.2593, 0.0351, 0.00064)
    torch.testing.assert_close(dloss_ds[:4], -w)
    assert bool((dloss_ds[:4] < 0).all()) and bool((w[1:] < w[:-1]).all())
    assert bool((dloss_ds[4:] > 0).all())  # wrong answers are pushed down
    # the negative term's gradient is softmax_N(s/τ): it sums to 1 over N
    assert dloss_ds[4:].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_lambda_infinity_gives_uniform_weights() -> None:
    L, mask, correct = paper_group()
    lp = -torch.rand(8, 1000, dtype=torch.float64)
    _, _, w = drpo_objective(lp, mask, correct, torch.zeros(8, dtype=torch.long), lam=math.inf, max_len=1000)
    torch.testing.assert_close(w, torch.tensor([0.25] * 4 + [0.0] * 4, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_matches_plain_loop_value_and_gradient(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 9
    group_ids = torch.randint(0, 4, (B,), generator=g)  # non-contiguous, unequal groups
    correct = torch.rand(B, generator=g) < 0.5
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp0 = -torch.rand(B, T, dtype=torch.float64, generator=g) * 2
    loss = DRPOLoss(lam=0.3, tau=2.0, beta=0.0, max_len=T)
    lp = lp0.clone().requires_grad_(True)
    out = loss(lp, lp0, torch.zeros(B), mask, batch=make_batch(mask, group_ids, correct))
    out.loss.backward()
    ref_lp = lp0.clone().requires_grad_(True)
    ref = -naive_objective(ref_lp, mask, correct, group_ids, 0.3, 2.0, T)
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach() if torch.is_tensor(ref) else torch.tensor(ref, dtype=torch.float64))
    torch.testing.assert_close(lp.grad, ref_lp.grad)
    torch.testing.assert_close(out.metrics["objective"], -out.loss.detach())  # no KL term here


def test_groups_without_both_classes_contribute_zero_but_count_in_K() -> None:
    # group 0 mixed (1 right, 1 wrong), group 1 all right: K = 2, loss = −J_0/2
    mask = torch.ones(4, 3, dtype=torch.bool)
    lp = torch.log(torch.tensor([[0.5] * 3, [0.25] * 3, [0.9] * 3, [0.8] * 3], dtype=torch.float64))
    correct = torch.tensor([True, False, True, True])
    out = DRPOLoss(beta=0.0, max_len=3)(lp, lp, torch.zeros(4), mask,
                                        batch=make_batch(mask, torch.tensor([0, 0, 1, 1]), correct))
    # J_0 = s_0 − τ log exp(s_1/τ) = log 0.5 − log 0.25 = log 2
    assert out.loss.item() == pytest.approx(-math.log(2) / 2, abs=1e-12)
    assert out.metrics["mixed_group_frac"].item() == pytest.approx(0.5)


def test_kl_hinge_penalty_hand_case() -> None:
    # one token per row, ℓ_old − ℓ = 0.01 everywhere → K_old = 0.01; penalty β[K_old − δ]_+·K_old
    # = 1000·(0.01 − 1e-4)·0.01 = 0.099, with gradient ∂/∂ℓ = −β(K_old − δ)/N = −9.9/2 per token
    mask = torch.ones(2, 1, dtype=torch.bool)
    lp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64, requires_grad=True)
    correct = torch.tensor([True, True])  # no mixed group: the objective is 0
    out = DRPOLoss()(lp, lp.detach() + 0.01, torch.zeros(2), mask, batch=make_batch(mask, torch.tensor([0, 0]), correct))
    out.loss.backward()
    assert out.metrics["kl"].item() == pytest.approx(0.01)
    assert out.loss.item() == pytest.approx(0.099, rel=1e-9)
    torch.testing.assert_close(lp.grad, torch.full((2, 1), -9.9 / 2, dtype=torch.float64))
    out = DRPOLoss()(lp, lp.detach() + 1e-5, torch.zeros(2), mask, batch=make_batch(mask, torch.tensor([0, 0]), correct))
    assert out.loss.item() == 0.0  # K_old = 1e-5 < δ: no penalty


@pytest.mark.parametrize("sizes", [[4, 4, 4], [8, 4]])
def test_micro_batches_of_whole_equal_groups_match_the_full_batch(sizes) -> None:
    g = torch.Generator().manual_seed(3)
    B, T = 12, 6
    group_ids = torch.arange(B) // 4  # three whole groups of 4
    correct = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    lp0 = -torch.rand(B, T, dtype=torch.float64, generator=g)
    old = lp0 + 0.05 * torch.rand(B, T, dtype=torch.float64, generator=g)
    loss = DRPOLoss(lam=0.5, tau=1.0, beta=0.0, max_len=T)
    full_lp = lp0.clone().requires_grad_(True)
    full = loss(full_lp, old, torch.zeros(B), mask, batch=make_batch(mask, group_ids, correct))
    full.loss.backward()
    norm = Normaliser.of(mask, T)
    lp = lp0.clone().requires_grad_(True)
    total, metrics, start = 0.0, {}, 0
    for n in sizes:
        sl = slice(start, start + n)
        out = loss(lp[sl], old[sl], torch.zeros(n), mask[sl], normaliser=norm,
                   batch=make_batch(mask[sl], group_ids[sl], correct[sl]))
        out.loss.backward()
        total = total + out.loss.detach()
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
        start += n
    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(lp.grad, full_lp.grad)
    for k in full.metrics:
        torch.testing.assert_close(metrics[k], full.metrics[k])


def test_degenerate_inputs_are_finite() -> None:
    mask = torch.tensor([[True, True], [False, False], [True, False], [True, True]])
    lp = torch.tensor([[-50.0, -60.0], [0.0, 0.0], [-1e-3, 0.0], [-80.0, -90.0]], requires_grad=True)
    for lam in (1e-4, 0.1, math.inf):
        for correct in ([True, False, True, False], [True, True, True, True], [False] * 4):
            out = DRPOLoss(lam=lam)(lp, lp.detach(), torch.zeros(4), mask,
                                   batch=make_batch(mask, torch.tensor([0, 0, 0, 0]), torch.tensor(correct)))
            lp.grad = None
            out.loss.backward()
            assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
            assert lp.grad[1].abs().sum().item() == 0.0  # the empty completion is in neither class


def test_binary_rewards_when_correct_is_missing_and_bad_inputs() -> None:
    mask = torch.ones(2, 2, dtype=torch.bool)
    lp = -torch.rand(2, 2)
    ok = DRPOLoss()(lp, lp, torch.zeros(2), mask, batch=make_batch(mask, torch.tensor([0, 0]), rewards=torch.tensor([1.0, 0.0])))
    assert torch.isfinite(ok.loss)
    with pytest.raises(ValueError, match="rewards must be exactly 0 or 1"):
        DRPOLoss()(lp, lp, torch.zeros(2), mask, batch=make_batch(mask, torch.tensor([0, 0]), rewards=torch.tensor([0.5, 0.0])))
    with pytest.raises(ValueError, match="batch"):
        DRPOLoss()(lp, lp, torch.zeros(2), mask)
    for kwargs, word in (({"lam": 0.0}, "lam"), ({"tau": -1.0}, "tau"), ({"beta": -1.0}, "beta"),
                         ({"delta": -1.0}, "delta"), ({"max_len": 0}, "max_len")):
        with pytest.raises(ValueError, match=word):
            DRPOLoss(**kwargs)
