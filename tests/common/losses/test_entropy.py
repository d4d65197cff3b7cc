"""Entropy-aware token selection (common/losses/entropy.py): the top-20% entropy filter, Clip-Cov and KL-Cov
against plain references, exact zero gradients on the dropped tokens, reproducible draws and bad inputs."""

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.entropy import (ClipCovLoss, EntropyTopQuantileLoss, KLCovLoss, kl_cov_select,
                                   token_covariance, top_entropy_mask)
from common.losses.ppo_clip import ClippedPolicyLoss
from helpers import random_token_batch as random_batch



# ------------------------------------------------------------------------------------------ top 20%


def test_top_entropy_hand_case() -> None:
    # 10 valid tokens with entropies 0.1 .. 1.0; top 20% = ⌈0.2·10⌉ = 2 tokens: 0.9 and 1.0
    H = torch.tensor([[0.1, 0.5, 1.0, 0.3, 0.0], [0.9, 0.2, 0.4, 0.6, 0.7], [0.8, 5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[True] * 4 + [False], [True] * 5, [True] + [False] * 4])  # 5.0s and 0.0 are padding
    keep = top_entropy_mask(H, mask, 0.2)
    assert keep.nonzero().tolist() == [[0, 2], [1, 0]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("q", [0.05, 0.2, 0.5, 1.0])
def test_top_entropy_matches_sorted_reference(seed, q) -> None:
    _, _, H, _, mask = random_batch(seed)
    valid = H[mask].sort(descending=True).values
    k = max(1, int(torch.ceil(torch.tensor(q * valid.numel())).item()))
    assert torch.equal(top_entropy_mask(H, mask, q), mask & (H >= valid[k - 1]))
    assert int(top_entropy_mask(H, mask, q).sum()) == k  # continuous entropies: no ties


def test_top_quantile_loss_is_the_clipped_loss_on_kept_tokens_with_full_denominator() -> None:
    lp0, old, H, A, mask = random_batch(1)
    loss = EntropyTopQuantileLoss(quantile=0.2)
    lp = lp0.clone().requires_grad_(True)
    out = loss(lp, old, A, mask, entropy=H)
    out.loss.backward()
    keep = top_entropy_mask(H, mask, 0.2)
    # naive: per-token clipped loss, zeroed off the kept tokens, divided by ALL valid tokens
    ratio = torch.exp(lp0 - old)
    per = torch.maximum(-A[:, None] * ratio, -A[:, None] * ratio.clamp(0.8, 1.28))
    ref_lp = lp0.clone().requires_grad_(True)
    ref_ratio = torch.exp(ref_lp - old)
    ref = (torch.maximum(-A[:, None] * ref_ratio, -A[:, None] * ref_ratio.clamp(0.8, 1.28)) * keep).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(lp.grad, ref_lp.grad)
    assert lp.grad[mask & ~keep].abs().sum().item() == 0.0
    assert out.metrics["kept_frac"].item() == pytest.approx(keep.sum().item() / mask.sum().item())
    assert per.shape == mask.shape


def test_quantile_one_is_the_plain_clipped_loss() -> None:
    lp, old, H, A, mask = random_batch(2)
    a = EntropyTopQuantileLoss(quantile=1.0)(lp, old, A, mask, entropy=H)
    b = ClippedPolicyLoss(eps_low=0.2, eps_high=0.28, aggregation="token_mean")(lp, old, A, mask, entropy=H)
    torch.testing.assert_close(a.loss, b.loss)


# ------------------------------------------------------------------------------------------ covariance


def test_token_covariance_hand_case() -> None:
    # ℓ = (−1, −3) on row 0, A = 2 / ℓ = (−2,) on row 1, A = −1: means ℓ̄ = −2, Ā = (2 + 2 − 1)/3 = 1
    # Cov = ((1)(1), (−1)(1), (0)(−2)) = (1, −1, 0)
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    cov = token_covariance(lp, torch.tensor([2.0, -1.0], dtype=torch.float64), mask)
    torch.testing.assert_close(cov[mask], torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    assert cov[1, 1].item() == -torch.inf


@pytest.mark.parametrize("seed", range(3))
def test_clip_cov_exactness(seed) -> None:
    # exactly min(n, |C|) tokens get zero gradient; all of them lie in (lb, ub) and were not PPO-clipped
    lp0, old, H, A, mask = random_batch(seed, B=8, T=16)
    A = A * 3
    lb, ub, ratio = 0.05, 5.0, 0.1
    loss = ClipCovLoss(ratio=ratio, lb=lb, ub=ub, seed=seed)
    lp = lp0.clone().requires_grad_(True)
    out = loss(lp, old, A, mask)
    out.loss.backward()
    cov = token_covariance(lp0, A, mask)
    rho = torch.exp(lp0 - old)
    clipped = (-A[:, None] * rho.clamp(0.8, 1.2)) > (-A[:, None] * rho)
    candidates = mask & ~clipped & (cov > lb) & (cov < ub)
    zero_grad = mask & (lp.grad == 0) & ~clipped
    n = max(1, int(ratio * mask.sum().item()))
    assert int(zero_grad.sum()) == min(n, int(candidates.sum())) > 0
    assert bool(candidates[zero_grad].all())
    assert out.metrics["cov_clip_frac"].item() == pytest.approx(int(zero_grad.sum()) / mask.sum().item())


def test_clip_cov_draw_is_reproducible_and_step_dependent() -> None:
    lp, old, H, A, mask = random_batch(4, B=8, T=16)
    drops = []
    for step in (3, 3, 4):
        loss = ClipCovLoss(ratio=0.1, lb=-10.0, ub=10.0, seed=7)
        loss.set_step(step)
        x = lp.clone().requires_grad_(True)
        loss(x, old, A * 3, mask).loss.backward()
        drops.append(mask & (x.grad == 0))
    assert torch.equal(drops[0], drops[1]) and not torch.equal(drops[0], drops[2])


def test_clip_cov_with_no_candidates_is_the_clipped_loss() -> None:
    lp, old, H, A, mask = random_batch(5)
    a = ClipCovLoss(lb=100.0, ub=200.0)(lp, old, A, mask)
    b = ClippedPolicyLoss(aggregation="token_mean")(lp, old, A, mask)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.metrics["cov_clip_frac"].item() == 0.0


# ------------------------------------------------------------------------------------------ KL-Cov


@pytest.mark.parametrize("seed", range(3))
def test_kl_cov_matches_naive_formula(seed) -> None:
    lp0, old, H, A, mask = random_batch(seed, B=8, T=16)
    ratio, coef = 0.1, 1.0
    lp = lp0.clone().requires_grad_(True)
    out = KLCovLoss(ratio=ratio, coef=coef)(lp, old, A, mask)
    out.loss.backward()
    # naive: top-k valid tokens by Cov (plain sort), −Aρ + coef|ℓ − ℓ_old| there, −Aρ elsewhere, token mean
    cov = token_covariance(lp0, A, mask)
    k = max(1, int(ratio * mask.sum().item()))
    idx = cov.flatten().argsort(descending=True)[:k]
    picked = torch.zeros(cov.numel(), dtype=torch.bool)
    picked[idx] = True
    picked = picked.view_as(cov)
    assert torch.equal(kl_cov_select(lp0, A, mask, ratio=ratio), picked)
    ref_lp = lp0.clone().requires_grad_(True)
    per = -A[:, None] * torch.exp(ref_lp - old) + coef * picked * (ref_lp - old).abs()
    ref = (per * mask).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(lp.grad, ref_lp.grad)
    assert out.metrics["kl_cov_frac"].item() == pytest.approx(k / mask.sum().item())


@pytest.mark.parametrize("cls", [EntropyTopQuantileLoss, ClipCovLoss, KLCovLoss])
def test_micro_batch_invariance_with_full_micro_batch_normaliser(cls) -> None:
    # the loss is additive over micro-batches given the selection; with one micro-batch the normaliser is exact
    lp, old, H, A, mask = random_batch(6)
    loss = cls()
    a = loss(lp, old, A, mask, entropy=H)
    b = loss(lp, old, A, mask, entropy=H, normaliser=Normaliser.of(mask))
    torch.testing.assert_close(a.loss, b.loss)


def test_degenerate_inputs_are_finite() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    lp = torch.tensor([[-30.0, 0.0], [0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    H = torch.zeros(2, 2)
    for loss in (EntropyTopQuantileLoss(), ClipCovLoss(), KLCovLoss()):
        lp.grad = None
        out = loss(lp, old, torch.tensor([1.0, 1.0]), mask, entropy=H)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
    empty = torch.zeros(2, 2, dtype=torch.bool)
    out = EntropyTopQuantileLoss()(lp, old, torch.ones(2), empty, entropy=H)
    assert out.loss.item() == 0.0


def test_bad_inputs_name_the_argument() -> None:
    lp, old, H, A, mask = random_batch(0)
    with pytest.raises(ValueError, match="entropy"):
        EntropyTopQuantileLoss()(lp, old, A, mask)
    for make, word in ((lambda: EntropyTopQuantileLoss(quantile=0.0), "quantile"),
                       (lambda: ClipCovLoss(ratio=0.0), "ratio"), (lambda: ClipCovLoss(lb=5.0, ub=1.0), "lb"),
                       (lambda: KLCovLoss(coef=-1.0), "coef"), (lambda: KLCovLoss(aggregation="mean"), "aggregation")):
        with pytest.raises(ValueError, match=word):
            make()
    with pytest.raises(ValueError, match="advantages"):
        KLCovLoss()(lp, old, A[:3], mask)
