"""Clipped surrogate and ClippedPolicyLoss (common/losses/ppo_clip.py): torchtune-style hand cases with
real tolerances, gradients through the clip, the sequence-level ratio, KL/entropy terms, micro-batch
invariance of loss, gradient and metrics, and the REINFORCE identity at ratio 1."""

import math

import pytest
import torch

from common.losses.aggregate import AGGREGATIONS, Normaliser
from common.losses.ppo_clip import ClippedPolicyLoss, clipped_surrogate

# ---------------------------------------------------------------------------------------------- helpers


def one_token(log_ratio: float, advantage: float, **kwargs):
    """clipped_surrogate on one (B=1, T=1) token with ℓ_old = 0; returns (loss, ratio, clipped, dloss/dℓ)."""
    logprobs = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, ratio, clipped = clipped_surrogate(
        logprobs, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([advantage], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.bool), **kwargs,
    )
    loss.sum().backward()
    return loss.item(), ratio.item(), bool(clipped.item()), logprobs.grad.item()


def random_batch(seed: int, B: int = 6, T: int = 5):
    """float64 logprobs/old/ref/entropy (B, T), advantages (B,), a right-padded mask with one empty row.
    log-ratios have a per-token std 0.3 and a per-row offset of std 0.4, so that a good share of tokens
    (and of sequences, for the sequence-level ratio) is clipped."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    noise = 0.3 * torch.randn(B, T, dtype=torch.float64, generator=g)  # per token
    offset = 0.4 * torch.randn(B, 1, dtype=torch.float64, generator=g)  # per row
    logprobs = old + noise + offset
    ref = old + 0.5 * torch.randn(B, T, dtype=torch.float64, generator=g)
    entropy = torch.rand(B, T, dtype=torch.float64, generator=g) * 2
    advantages = torch.randn(B, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[seed % B] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logprobs, old, ref, entropy, advantages, mask


def micro_slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


# ----------------------------------------------------------------------- clipped_surrogate hand cases


def test_positive_advantage_ratio_above_clip() -> None:
    # ρ = e^0.5 = 1.6487 > 1.2: max(−1·1.6487, −1·1.2) = −1.2, clipped, no gradient through the clip
    loss, ratio, clipped, grad = one_token(0.5, +1.0)
    assert ratio == pytest.approx(math.exp(0.5), abs=1e-12)
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert clipped and grad == 0.0


def test_positive_advantage_ratio_below_clip_is_not_clipped() -> None:
    # ρ = e^−0.5 = 0.6065 < 0.8: max(−0.6065, −0.8) = −0.6065 (pessimistic side is the unclipped one)
    # dloss/dℓ = −A·ρ = −0.6065
    loss, _, clipped, grad = one_token(-0.5, +1.0)
    assert loss == pytest.approx(-math.exp(-0.5), abs=1e-12)
    assert not clipped
    assert grad == pytest.approx(-math.exp(-0.5), abs=1e-12)


def test_negative_advantage_ratio_below_clip() -> None:
    # A = −1, ρ = 0.5: max(0.5, 0.8) = 0.8, clipped, gradient 0
    loss, _, clipped, grad = one_token(math.log(0.5), -1.0)
    assert loss == pytest.approx(0.8, abs=1e-12)
    assert clipped and grad == 0.0


def test_negative_advantage_ratio_above_clip_is_not_clipped() -> None:
    # A = −1, ρ = 1.5: max(1.5, 1.2) = 1.5, not clipped, dloss/dℓ = −A·ρ = 1.5
    loss, _, clipped, grad = one_token(math.log(1.5), -1.0)
    assert loss == pytest.approx(1.5, abs=1e-12)
    assert not clipped
    assert grad == pytest.approx(1.5, abs=1e-12)


def test_inside_the_trust_region_is_plain_ratio_times_advantage() -> None:
    # A = 2, ρ = 1.1 ∈ [0.8, 1.2]: loss = −2·1.1 = −2.2, gradient −A·ρ = −2.2
    loss, _, clipped, grad = one_token(math.log(1.1), 2.0)
    assert loss == pytest.approx(-2.2, abs=1e-12)
    assert not clipped and grad == pytest.approx(-2.2, abs=1e-12)


def test_clip_higher_upper_bound() -> None:
    # DAPO clip-higher, eps_high = 0.28: ρ = e^0.5 is clipped at 1.28 (not 1.2) -> loss −1.28
    loss, _, clipped, _ = one_token(0.5, +1.0, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-1.28, abs=1e-12) and clipped
    # ρ = 1.25 is inside [0.8, 1.28] -> −1.25, unclipped (with eps_high = 0.2 it would be −1.2)
    loss, _, clipped, _ = one_token(math.log(1.25), +1.0, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-1.25, abs=1e-12) and not clipped
    assert one_token(math.log(1.25), +1.0)[0] == pytest.approx(-1.2, abs=1e-12)
    # the lower bound stays at 1 − 0.2: A = −1, ρ = 0.5 -> max(0.5, 0.8) = 0.8
    assert one_token(math.log(0.5), -1.0, eps_low=0.2, eps_high=0.28)[0] == pytest.approx(0.8, abs=1e-12)


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    # c = 3, A = −1, ρ = 10: PPO gives max(10, 1.2) = 10; dual-clip bounds it by −c·A = 3; gradient 0
    loss, _, clipped, grad = one_token(math.log(10.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0, abs=1e-12)
    assert clipped and grad == 0.0
    # ρ = 2 < c: max(2, 1.2) = 2 is below the bound 3, unchanged, gradient −A·ρ = 2
    loss, _, clipped, grad = one_token(math.log(2.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0, abs=1e-12) and not clipped and grad == pytest.approx(2.0, abs=1e-12)
    # positive advantages are untouched: A = +1, ρ = 10 -> −1.2 as without dual-clip
    assert one_token(math.log(10.0), +1.0, dual_clip=3.0)[0] == pytest.approx(-1.2, abs=1e-12)


def test_huge_log_ratio_stays_finite() -> None:
    # ℓ − ℓ_old = 50 is clamped to 10 before exp: ρ = e^10, loss (A = −1, unclipped side) = e^10, finite
    loss, ratio, _, grad = one_token(50.0, -1.0)
    assert ratio == pytest.approx(math.exp(10.0), rel=1e-12)
    assert loss == pytest.approx(math.exp(10.0), rel=1e-12)
    assert grad == 0.0  # beyond the clamp


def test_masked_positions_are_zero_and_unclipped() -> None:
    logprobs = torch.tensor([[0.5, 100.0]])  # the second token is padding with a garbage value
    loss, ratio, clipped = clipped_surrogate(
        logprobs, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[True, False]])
    )
    assert loss[0, 1].item() == 0.0 and ratio[0, 1].item() == 0.0 and not clipped[0, 1].item()
    assert loss[0, 0].item() == pytest.approx(-1.2, abs=1e-6)


def test_token_level_advantages_broadcast_per_token() -> None:
    # A (B, T) = [[1, −1]], both ρ = 1: loss = −A = [[−1, 1]]
    loss, _, _ = clipped_surrogate(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    )
    assert loss.tolist() == [[-1.0, 1.0]]


def test_sequence_level_ratio_is_exp_of_mean_log_ratio_over_valid_tokens() -> None:
    logprobs = torch.tensor([[0.1, 0.3, 100.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    # mean over the 2 valid tokens = (0.1 + 0.3) / 2 = 0.2 -> ρ = e^0.2 = 1.2214 for both; padding is ignored
    loss, ratio, _ = clipped_surrogate(
        logprobs, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), mask,
        eps_low=0.5, eps_high=0.5, ratio_level="sequence",
    )
    e = math.exp(0.2)
    torch.testing.assert_close(ratio, torch.tensor([[e, e, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, torch.tensor([[-e, -e, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    # Σ loss = −2·e^s with s = (ℓ_1 + ℓ_2)/2 -> d/dℓ_t = −2·e^s·(1/2) = −e^s on valid tokens, 0 on padding
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-e, -e, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_sequence_level_ratio_is_clipped_as_a_whole() -> None:
    # per-token log-ratios [0.0, 0.6] -> mean 0.3 -> ρ = e^0.3 = 1.35 > 1.2 for both tokens; A = 1 -> −1.2 each
    loss, _, clipped = clipped_surrogate(
        torch.tensor([[0.0, 0.6]]), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
        ratio_level="sequence",
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2]]), rtol=0, atol=1e-6)
    assert clipped.all()


def test_clipped_surrogate_bad_input() -> None:
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs"):
        clipped_surrogate(x, torch.zeros(2, 2), torch.zeros(2), m)
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_surrogate(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="ratio_level must be 'token' or 'sequence'"):
        clipped_surrogate(x, x, torch.zeros(2), m, ratio_level="seq")


# ---------------------------------------------------------------------------------- ClippedPolicyLoss


def test_kl_and_entropy_terms_add_as_documented() -> None:
    mask = torch.tensor([[True, True], [True, False]])
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ln2 = math.log(2.0)
    ref = logprobs + torch.tensor([[ln2, 0.0], [-ln2, 9.0]], dtype=torch.float64)  # δ = ref − ℓ
    entropy = torch.tensor([[1.0, 2.0], [3.0, 99.0]], dtype=torch.float64)
    # ρ = 1 everywhere (ℓ = ℓ_old) -> pg per token = −A = [−1, −1, 2] on the 3 valid tokens: Σ = 0
    # k3 = e^δ − δ − 1 = [2 − ln2 − 1, 0, 0.5 + ln2 − 1] = [0.30685, 0, 0.19315]: Σ = 0.5
    # H on valid tokens: 1 + 2 + 3 = 6
    # token_mean, β = 0.1, α = 0.01: 0/3 + 0.1·0.5/3 − 0.01·6/3 = 0.016667 − 0.02 = −0.0033333
    loss_fn = ClippedPolicyLoss(aggregation="token_mean", beta=0.1, entropy_coef=0.01)
    out = loss_fn(logprobs, logprobs, advantages, mask, ref_logprobs=ref, entropy=entropy)
    expected = torch.tensor(0.1 * 0.5 / 3 - 0.01 * 6 / 3, dtype=torch.float64)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)
    m = out.metrics
    torch.testing.assert_close(m["pg_loss"], torch.tensor(0.0, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["kl"], torch.tensor(0.5 / 3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["entropy"], torch.tensor(2.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert m["clip_frac"].item() == 0.0
    torch.testing.assert_close(m["ratio"], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert all(not v.requires_grad for v in m.values())


def test_kl_term_uses_the_aggregation_of_the_loss() -> None:
    mask = torch.tensor([[True, True], [True, False]])
    logprobs = torch.zeros(2, 2, dtype=torch.float64)
    ref = torch.tensor([[math.log(2.0), 0.0], [-math.log(2.0), 0.0]], dtype=torch.float64)
    # seq_mean_token_mean of k3 = ((0.30685 + 0) / 2 + 0.19315 / 1) / 2 = (0.153426 + 0.193147) / 2
    k3_a, k3_b = 1 - math.log(2.0), math.log(2.0) - 0.5
    expected = 0.04 * ((k3_a / 2) + k3_b) / 2
    out = ClippedPolicyLoss(beta=0.04)(logprobs, logprobs, torch.zeros(2, dtype=torch.float64), mask, ref_logprobs=ref)
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_entropy_metric_is_logged_even_without_bonus() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    x = torch.zeros(1, 2)
    out = ClippedPolicyLoss()(x, x, torch.ones(1), mask, entropy=torch.tensor([[1.0, 3.0]]))
    assert out.metrics["entropy"].item() == 2.0
    assert out.loss.item() == -1.0  # −A·ρ = −1 on both tokens; no entropy term with entropy_coef = 0


def test_beta_without_reference_raises() -> None:
    loss_fn = ClippedPolicyLoss(beta=0.04)
    assert loss_fn.needs_reference and not ClippedPolicyLoss().needs_reference
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logprobs is required when beta > 0"):
        loss_fn(x, x, torch.ones(1), torch.ones(1, 2, dtype=torch.bool))


def test_constructor_lists_every_bad_argument() -> None:
    with pytest.raises(ValueError) as info:
        ClippedPolicyLoss(
            eps_low=1.0, eps_high=-0.1, dual_clip=1.0, ratio_level="seq", aggregation="mean", beta=-1.0,
            kl_estimator="k4",
        )
    message = str(info.value)
    for name in ("eps_low", "eps_high", "dual_clip", "ratio_level", "aggregation", "beta", "kl_estimator"):
        assert name in message, name
    assert "token_mean" in message  # the valid aggregations are listed


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("split", [[1] * 6, [2, 2, 2], [1, 3, 2]], ids=["ones", "twos", "uneven"])
def test_micro_batches_sum_to_full_batch_loss_gradient_and_metrics(
    aggregation: str, ratio_level: str, split: list[int]
) -> None:
    logprobs, old, ref, entropy, advantages, mask = random_batch(seed=1)
    loss_fn = ClippedPolicyLoss(
        eps_high=0.28, dual_clip=3.0, ratio_level=ratio_level, aggregation=aggregation, beta=0.05, entropy_coef=0.01
    )
    norm = Normaliser.of(mask, max_len=8)  # global denominators of the optimiser batch

    full_lp, full_ent = logprobs.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    full = loss_fn(full_lp, old, advantages, mask, ref_logprobs=ref, entropy=full_ent, normaliser=norm)
    full.loss.backward()
    assert full.metrics["clip_frac"].item() > 0  # the clip is exercised

    micro_lp, micro_ent = logprobs.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    total_loss = torch.zeros((), dtype=torch.float64)
    total_metrics = {k: torch.zeros((), dtype=torch.float64) for k in full.metrics}
    for rows in micro_slices(split):
        out = loss_fn(
            micro_lp[rows], old[rows], advantages[rows], mask[rows],
            ref_logprobs=ref[rows], entropy=micro_ent[rows], normaliser=norm,
        )
        out.loss.backward()
        total_loss = total_loss + out.loss.detach()
        for k, v in out.metrics.items():
            total_metrics[k] = total_metrics[k] + v

    torch.testing.assert_close(total_loss, full.loss.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_lp.grad, full_lp.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_ent.grad, full_ent.grad, rtol=0, atol=1e-6)
    for k, v in full.metrics.items():
        torch.testing.assert_close(total_metrics[k], v.double(), rtol=0, atol=1e-6, msg=k)


def test_reinforce_identity_token_mean() -> None:
    # At ℓ = ℓ_old, ρ = 1 sits inside the clip, so d loss / d ℓ_it = −A_i · m_it / Σm (the policy gradient).
    _, _, _, _, advantages, mask = random_batch(seed=3)
    logprobs = (-torch.rand(mask.shape, dtype=torch.float64)).requires_grad_(True)
    ClippedPolicyLoss(aggregation="token_mean")(logprobs, logprobs.detach(), advantages, mask).loss.backward()
    expected = -advantages[:, None] * mask / mask.sum()
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


def test_reinforce_identity_seq_mean_token_mean() -> None:
    # GRPO aggregation: d loss / d ℓ_it = −A_i · m_it / (L_i · B'), B' = rows with L_i > 0
    _, _, _, _, advantages, mask = random_batch(seed=4)
    logprobs = (-torch.rand(mask.shape, dtype=torch.float64)).requires_grad_(True)
    ClippedPolicyLoss(aggregation="seq_mean_token_mean")(logprobs, logprobs.detach(), advantages, mask).loss.backward()
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    nonempty = (mask.sum(1) > 0).sum()
    expected = -advantages[:, None] * mask / (lengths * nonempty)
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)
