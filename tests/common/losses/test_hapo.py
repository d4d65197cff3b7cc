"""HAPO loss (common/losses/hapo.py): normalised entropy (range, sign, quantile rule, code-compat bug),
asymmetric clipping and advantage redistribution hand cases, the loss vs a plain formula with autograd,
micro-batch additivity, degenerate inputs and bad inputs."""

import pytest
import torch

from common.losses.aggregate import Normaliser
from common.losses.hapo import HAPOLoss, hapo_entropy_stats, hapo_token_terms, normalised_entropy
from helpers import random_token_batch as random_batch



# ------------------------------------------------------------------------------------------ h̃


@pytest.mark.parametrize("seed", range(4))
def test_normalised_entropy_range_sign_and_quantile(seed) -> None:
    _, _, H, _, mask = random_batch(seed)
    stats = hapo_entropy_stats(H, mask)
    z = torch.log(H[mask])
    q = torch.quantile(z, 0.8, interpolation="nearest")
    assert stats.pivot.item() == pytest.approx(q.item(), abs=1e-12)
    assert stats.scale.item() == pytest.approx(((z - q) ** 2).mean().sqrt().item(), rel=1e-12)
    h = normalised_entropy(H, mask, stats)
    assert h[mask].max().item() == pytest.approx(1.0) and h[mask].min().item() == pytest.approx(-1.0)
    assert torch.equal(torch.sign(h[mask]), torch.sign(z - q))  # sign(h̃) = sign(z − q)
    assert bool((h[~mask] == 0).all())


def test_code_compat_reproduces_the_sign_bug() -> None:
    _, _, H, _, mask = random_batch(0)
    h_code = normalised_entropy(H, mask, hapo_entropy_stats(H, mask, code_compat=True))
    h_paper = normalised_entropy(H, mask, hapo_entropy_stats(H, mask))
    assert bool((h_code[mask] >= 0).all())  # h·(1/min h) is positive on the negative branch
    torch.testing.assert_close(h_code[mask], h_paper[mask].abs())


def test_hand_case_stats() -> None:
    # H = e^(0, 1, 2, 3, 4): z = (0..4); nearest quantile 0.8 → index round(0.8·4) = 3, q = 3;
    # s = sqrt(mean((−3,−2,−1,0,1)²)) = sqrt(15/5) = sqrt 3; h = (−3,−2,−1,0,1)/sqrt3;
    # h̃ = (−1, −2/3, −1/3, 0, 1)
    H = torch.exp(torch.arange(5, dtype=torch.float64))[None, :]
    mask = torch.ones(1, 5, dtype=torch.bool)
    stats = hapo_entropy_stats(H, mask)
    assert stats.pivot.item() == 3.0 and stats.scale.item() == pytest.approx(3**0.5)
    torch.testing.assert_close(normalised_entropy(H, mask, stats)[0],
                               torch.tensor([-1.0, -2 / 3, -1 / 3, 0.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ clip / advantage


def test_asymmetric_clip_cases() -> None:
    # h̃ = −1 → ε'_low = 0.2(1 + 1) = 0.4, ε'_high = 0.2; h̃ = +1 → ε'_high = 0.4; h̃ = 0 → unchanged
    h = torch.tensor([[-1.0, 1.0, 0.0, -0.5, 0.5]])
    eps_lo, eps_hi, _ = hapo_token_terms(h, torch.ones_like(h), torch.ones_like(h), eps_low=0.2, eps_high=0.2,
                                         clip_alpha=1.0, adv_beta=1.0)
    torch.testing.assert_close(eps_lo, torch.tensor([[0.4, 0.2, 0.2, 0.3, 0.2]]))
    torch.testing.assert_close(eps_hi, torch.tensor([[0.2, 0.4, 0.2, 0.2, 0.3]]))


def test_advantage_redistribution_cases() -> None:
    # A = 1, β = 1. High entropy h̃ = 0.5 (band 0.9 < ρ < 1.15): ρ = 1 in band → A' = A = 1; ρ = 1.3 out → Ã = 1.5.
    # Low entropy h̃ = −0.5 (ε'_low = 0.3, band 0.85 < ρ < 1.1): ρ = 1 in band → Ã = 0.5; ρ = 0.8 out → A = 1.
    h = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    ratio = torch.tensor([[1.0, 1.3, 1.0, 0.8]])
    _, _, A = hapo_token_terms(h, ratio, torch.ones_like(h), eps_low=0.2, eps_high=0.2, clip_alpha=1.0, adv_beta=1.0)
    torch.testing.assert_close(A, torch.tensor([[1.0, 1.5, 0.5, 1.0]]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("code_compat", [False, True])
def test_loss_matches_plain_formula_and_autograd(seed, code_compat) -> None:
    lp0, old, H, A, mask = random_batch(seed)
    A = 2 * A
    lp = lp0.clone().requires_grad_(True)
    out = HAPOLoss(code_compat=code_compat)(lp, old, A, mask, entropy=H)
    out.loss.backward()
    # naive: loop over tokens with the h̃ of this batch
    h = normalised_entropy(H, mask, hapo_entropy_stats(H, mask, code_compat=code_compat))
    ref_lp = lp0.clone().requires_grad_(True)
    total = 0.0
    for i, t in mask.nonzero().tolist():
        ht, a = h[i, t].item(), A[i].item()
        lo = 0.2 * (1 - ht) if ht <= 0 else 0.2
        hi = 0.2 * (1 + ht) if ht > 0 else 0.2
        rho = torch.exp(ref_lp[i, t] - old[i, t])
        band = 1 - lo / 2 < rho.item() < 1 + hi / 2
        a2 = (a if band else a * (1 + ht)) if ht > 0 else (a * (1 + ht) if band else a)
        c = torch.maximum(-a2 * rho, -a2 * rho.clamp(1 - lo, 1 + hi))
        if a2 < 0:
            c = torch.minimum(c, torch.tensor(-10.0 * a2, dtype=torch.float64))
        total = total + c
    ref = total / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(lp.grad, ref_lp.grad)


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    # A = −1 on one token with a huge ratio ρ = e^5 = 148: PPO loss 148 → dual-clip bound −c·A = 10
    H = torch.ones(1, 1)
    out = HAPOLoss()(torch.tensor([[5.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), entropy=H)
    assert out.loss.item() == pytest.approx(10.0)


def test_one_micro_batch_equals_the_minibatch() -> None:
    # the token-mean is over the global normaliser; h̃'s statistics are per micro-batch (as in the code), so only
    # micro_batch_size=None is exact
    lp, old, H, A, mask = random_batch(3)
    a = HAPOLoss()(lp, old, A, mask, entropy=H)
    b = HAPOLoss()(lp, old, A, mask, entropy=H, normaliser=Normaliser.of(mask))
    torch.testing.assert_close(a.loss, b.loss)


def test_degenerate_inputs_are_finite() -> None:
    mask = torch.tensor([[True, True], [False, False]])
    H = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # one-hot distributions, equal entropies
    lp = torch.tensor([[-30.0, 0.0], [0.0, 0.0]], requires_grad=True)
    out = HAPOLoss()(lp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask, entropy=H)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
    out = HAPOLoss()(lp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.zeros(2, 2, dtype=torch.bool), entropy=H)
    assert out.loss.item() == 0.0


def test_bad_inputs_name_the_argument() -> None:
    lp, old, H, A, mask = random_batch(0)
    with pytest.raises(ValueError, match="entropy"):
        HAPOLoss()(lp, old, A, mask)
    with pytest.raises(ValueError, match="advantages"):
        HAPOLoss()(lp, old, A[:2], mask, entropy=H)
    for kwargs, word in (({"eps_low": 1.5}, "eps_low"), ({"clip_alpha": -1.0}, "clip_alpha"),
                         ({"entropy_pivot": 2.0}, "entropy_pivot"), ({"dual_clip": 0.5}, "dual_clip"),
                         ({"aggregation": "sum"}, "aggregation")):
        with pytest.raises(ValueError, match=word):
            HAPOLoss(**kwargs)
