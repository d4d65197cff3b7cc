"""DPO and ADPO (common/losses/preference.py): hand values, the DPO = pairwise-ADPO identity (values and
gradients), shift invariance, plain-loop references for pairs, targets and the listwise loss, degenerate groups,
micro-batch splits and bad inputs."""

import math

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.preference import (ADPOLoss, DPOLoss, adpo_loss, adpo_targets, dpo_loss, group_log_softmax,
                                      preference_pairs)


def make_batch(mask, group_ids, rewards):
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, rewards=rewards)


def test_dpo_hand_values():
    # Δ = 0: −log σ(0) = log 2;  β = 0.1, Δ = 2: −log σ(0.2) = log(1 + e^−0.2) = 0.5981388693
    out = dpo_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), beta=0.1)
    torch.testing.assert_close(out, torch.tensor([math.log(2), math.log(1 + math.exp(-0.2))]))
    # ε_ls = 0.25: 0.75·log(1 + e^−0.2) + 0.25·log(1 + e^0.2) = 0.75·0.5981389 + 0.25·0.7981389 = 0.6481389
    out = dpo_loss(torch.tensor([3.0]), torch.tensor([1.0]), beta=0.1, label_smoothing=0.25)
    torch.testing.assert_close(out, torch.tensor([0.6481388693]))


def test_preference_pairs_hand_case():
    # group 0 rows 0, 2, 5: rewards 1, 0, 1 -> chosen 0 (first of the tied best), rejected 2
    # group 1 rows 1, 3: rewards 0.5, 0.5 -> no pair;  group 2 rows 4, 6 (6 empty): only one valid row -> no pair
    r = torch.tensor([1.0, 0.5, 0.0, 0.5, 0.3, 1.0, 0.9])
    g = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    valid = torch.tensor([True, True, True, True, True, True, False])
    chosen, rejected, has = preference_pairs(r, g, valid, 3)
    assert has.tolist() == [True, False, False]
    assert (chosen[0].item(), rejected[0].item()) == (0, 2)


def logits_like(B, T, seed, dtype=torch.float64):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_dpo_loss_at_initialisation_is_log2_and_gradient_pushes_chosen_up():
    mask = torch.ones(4, 3, dtype=torch.bool)
    lp = (-logits_like(4, 3, 0).abs()).requires_grad_(True)
    batch = make_batch(mask, torch.zeros(4, dtype=torch.long), torch.tensor([0.0, 1.0, 0.5, 0.0]))
    out = DPOLoss(beta=0.1)(lp, lp.detach(), torch.zeros(4), mask, ref_logprobs=lp.detach(), batch=batch)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(math.log(2), dtype=torch.float64))
    out.loss.backward()
    # chosen row 1, rejected row 0 (first of the tied worst): ∂L/∂ℓ = −β σ(−βΔ) = −0.05 on chosen, +0.05 on rejected
    torch.testing.assert_close(lp.grad[1], torch.full((3,), -0.05, dtype=torch.float64))
    torch.testing.assert_close(lp.grad[0], torch.full((3,), 0.05, dtype=torch.float64))
    assert lp.grad[2:].abs().max() == 0


def test_pairwise_adpo_with_hard_label_equals_dpo_values_and_gradients():
    """n = 2, q = (1, 0), τ = 1/β: KL(q‖p) = −log p_w = −log σ(Δ/τ) = L_DPO (spec §21 (e)(1))."""
    beta = 0.1
    s = logits_like(2, 1, 1).flatten().requires_grad_(True)  # (2,) scores of (chosen, rejected)
    s_ref = logits_like(2, 1, 2).flatten()
    adpo = adpo_loss(s, s_ref, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                     tau=1 / beta).sum()
    (g_adpo,) = torch.autograd.grad(adpo, s)
    dpo = dpo_loss((s[0] - s_ref[0])[None], (s[1] - s_ref[1])[None], beta=beta).sum()
    (g_dpo,) = torch.autograd.grad(dpo, s)
    torch.testing.assert_close(adpo, dpo, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_adpo, g_dpo, rtol=0, atol=1e-12)


def test_adpo_shift_invariance_per_group():
    g = torch.tensor([0, 1, 0, 1, 1, 0])
    s, s_a = logits_like(6, 1, 3).flatten(), logits_like(6, 1, 4).flatten()
    q = adpo_targets(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.2]), g, num_groups=2)
    shifted = s + torch.tensor([5.0, -3.0])[g]  # a different constant per group
    torch.testing.assert_close(adpo_loss(shifted, s_a, q, g, num_groups=2), adpo_loss(s, s_a, q, g, num_groups=2))


def naive_adpo(s, s_a, r, g, tau, beta_r):
    """Plain loop over groups: q = softmax(((r − μ)/(σ_ddof1 + 1e-8))/β_r), p = softmax((s − s_a)/τ), KL(q‖p)."""
    out = []
    for k in sorted(set(g.tolist())):
        rows = [i for i in range(len(g)) if g[i] == k]
        rk = r[rows]
        A = (rk - rk.mean()) / (rk.std() + 1e-8) if len(rows) > 1 else torch.zeros_like(rk)
        q = torch.softmax(A / beta_r, 0)
        p = torch.softmax((s[rows] - s_a[rows]) / tau, 0)
        out.append(sum(q[j] * (math.log(q[j]) - math.log(p[j])) for j in range(len(rows))))
    return torch.tensor(out, dtype=torch.float64)


def test_adpo_matches_a_plain_loop_on_ragged_interleaved_groups():
    gen = torch.Generator().manual_seed(5)
    g = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 3, 3, 3, 3])
    r = torch.randint(0, 3, (12,), generator=gen).double()
    s, s_a = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    got = adpo_loss(s, s_a, adpo_targets(r, g, num_groups=4), g, tau=0.8, num_groups=4)
    torch.testing.assert_close(got, naive_adpo(s, s_a, r, g, 0.8, 0.5), rtol=0, atol=1e-10)


def test_adpo_targets_all_equal_group_is_uniform_and_invalid_rows_get_zero():
    g = torch.tensor([0, 0, 0, 1, 1])
    q = adpo_targets(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]), g, valid=torch.tensor([True, True, True, True, False]),
                     num_groups=2)
    torch.testing.assert_close(q, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.0]))
    torch.testing.assert_close(group_log_softmax(torch.zeros(3), torch.zeros(3, dtype=torch.long)).exp(),
                               torch.full((3,), 1 / 3))


def test_degenerate_groups_give_zero_dpo_loss_and_no_nan():
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    lp = logits_like(4, 2, 6).requires_grad_(True)
    batch = make_batch(mask, torch.tensor([0, 0, 0, 1]), torch.tensor([0.3, 0.3, 1.0, 0.0]))  # row 2 empty
    out = DPOLoss()(lp, lp.detach(), torch.zeros(4), mask, ref_logprobs=lp.detach() - 1, batch=batch)
    out.loss.backward()
    assert out.loss.item() == 0 and lp.grad.abs().max() == 0 and out.metrics["pair_frac"].item() == 0
    adpo = ADPOLoss()(lp, lp.detach(), torch.zeros(4), mask, batch=batch)
    assert torch.isfinite(adpo.loss) and adpo.loss.item() == pytest.approx(0.0, abs=1e-12)  # p = q = uniform at start


def test_micro_batch_split_equals_one_pass():
    """Two micro-batches of whole groups (equal sizes) give the loss and gradient of one pass."""
    B, T = 8, 5
    mask = torch.arange(T)[None, :] < torch.tensor([5, 3, 4, 1, 2, 5, 4, 3])[:, None]
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2])
    for loss in (DPOLoss(beta=0.5), ADPOLoss(anchor="reference")):
        lp = (-logits_like(B, T, 7).abs()).requires_grad_(True)
        ref = -logits_like(B, T, 8).abs()
        norm = Normaliser.of(mask)
        whole = loss(lp, lp.detach(), torch.zeros(B), mask, ref_logprobs=ref, normaliser=norm, batch=make_batch(mask, g, r)).loss
        (g_whole,) = torch.autograd.grad(whole, lp)
        parts = sum(loss(lp[i], lp.detach()[i], torch.zeros(4), mask[i], ref_logprobs=ref[i], normaliser=norm,
                         batch=make_batch(mask[i], g[i], r[i])).loss for i in (slice(0, 4), slice(4, 8)))
        (g_parts,) = torch.autograd.grad(parts, lp)
        torch.testing.assert_close(parts, whole)
        torch.testing.assert_close(g_parts, g_whole)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOLoss(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(label_smoothing=0.5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        ADPOLoss(tau=0)
    with pytest.raises(ValueError, match="anchor must be"):
        ADPOLoss(anchor="ema")
    mask = torch.ones(2, 2, dtype=torch.bool)
    lp = torch.zeros(2, 2)
    batch = make_batch(mask, torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        DPOLoss()(lp, lp, torch.zeros(2), mask, batch=batch)
    with pytest.raises(ValueError, match="batch.rewards"):
        DPOLoss()(lp, lp, torch.zeros(2), mask, ref_logprobs=lp)
    with pytest.raises(ValueError, match="reference log-probs"):
        ADPOLoss(anchor="reference")(lp, lp, torch.zeros(2), mask, batch=batch)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="beta_r must be > 0"):
        adpo_targets(torch.zeros(2), torch.zeros(2, dtype=torch.long), beta_r=0)
