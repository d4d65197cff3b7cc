"""ADHint (common/advantages/adhint.py): the hint-ratio schedule, hand-computed AE-RDP advantages, a plain-loop
reference, selective masking through the clipped loss (zero gradient on the hint tokens of a failed hinted
rollout), degenerate groups and bad inputs."""

import pytest
import torch

from common.advantages.adhint import ADHint, adhint_advantages, hint_ratio
from common.batch import RolloutBatch
from common.losses.ppo_clip import ClippedPolicyLoss


def test_hint_ratio_is_monotone_starts_at_omega_min_and_is_zero_for_solved_prompts():
    d = torch.linspace(0, 1, 11)
    w = hint_ratio(d, omega_min=0.1, omega_max=0.9)
    assert w[0] == 0  # Diff = 0: the policy always solves it -> no hint
    torch.testing.assert_close(w[1], torch.tensor(0.1 + 0.8 * 0.1))  # ω_min + (ω_max − ω_min)·Diff
    assert bool((w[1:].diff() >= 0).all()) and w[-1] == pytest.approx(0.9)
    tiny = hint_ratio(torch.tensor([1e-6]), omega_min=0.1, omega_max=0.9)
    assert tiny.item() == pytest.approx(0.1, abs=1e-5)  # → ω_min as Diff → 0+
    noisy = hint_ratio(torch.tensor([0.0, 1.0]), omega_max=0.95, noise=torch.tensor([0.05, 0.2]))
    assert noisy.tolist() == [0.0, 1.0]  # solved prompts stay unhinted even with noise; ω is clipped at 1


def test_hand_computed_advantages():
    # one group: naive rows 0, 1 with r = 1, 0; hinted rows 2, 3 with r = 1, 0 (hint of 2 tokens)
    # GRPO: μ = 0.5, σ (ddof 1) = sqrt(1/3) = 0.57735 -> A = ±0.5/0.57735 = ±0.866025 (eps 0)
    # Diff_naive = 1 − 0.5 = 0.5, Diff_hint = 0.5
    # row 0 naive positive: 0.866025·(1 + 0.5) = 1.299038;  row 1 naive negative: −0.866025
    # row 2 hinted positive: 0.866025;  row 3 hinted negative: −0.866025·(2 − 0.5) = −1.299038, hint tokens 0
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    hinted = torch.tensor([False, False, True, True])
    hint_mask = torch.tensor([[False] * 4, [False] * 4, [True, True, False, False], [True, True, False, False]])
    A = adhint_advantages(r, torch.zeros(4, dtype=torch.long), hinted, hint_mask, eps=0.0)
    a = 0.5 / (1 / 3) ** 0.5
    expected = torch.tensor([[1.5 * a] * 4, [-a] * 4, [a] * 4, [0.0, 0.0, -1.5 * a, -1.5 * a]])
    torch.testing.assert_close(A, expected)


def naive_reference(r, g, hinted, hint_mask, eps):
    out = torch.zeros(hint_mask.shape, dtype=torch.float64)
    for k in set(g.tolist()):
        rows = [i for i in range(len(g)) if g[i] == k]
        rk = torch.tensor([float(r[i]) for i in rows], dtype=torch.float64)
        std = rk.std() if len(rows) > 1 else torch.tensor(0.0, dtype=torch.float64)
        A = (rk - rk.mean()) / (std + eps) if float(rk.max() - rk.min()) > 0 else torch.zeros_like(rk)
        nv = [float(r[i]) for i in rows if not hinted[i]]
        hv = [float(r[i]) for i in rows if hinted[i]]
        dn = 1 - (sum(nv) / len(nv) if nv else 0.0)
        dh = 1 - (sum(hv) / len(hv) if hv else 0.0)
        for j, i in enumerate(rows):
            a = float(A[j])
            if not hinted[i] and a > 0:
                a *= 1 + dn
            elif hinted[i] and a < 0:
                a *= 1 + (1 - dh)
            for t in range(hint_mask.shape[1]):
                out[i, t] = 0.0 if (hinted[i] and a < 0 and hint_mask[i, t]) else a
    return out


def test_matches_a_plain_loop_on_ragged_interleaved_groups():
    gen = torch.Generator().manual_seed(0)
    B, T = 14, 6
    g = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 3, 3, 3, 1, 0, 2])
    r = torch.randint(0, 2, (B,), generator=gen).double()
    hinted = torch.rand(B, generator=gen) < 0.5
    k = torch.randint(1, 4, (B,), generator=gen) * hinted
    hint_mask = torch.arange(T)[None, :] < k[:, None]
    got = adhint_advantages(r, g, hinted, hint_mask, eps=1e-6, num_groups=4)
    torch.testing.assert_close(got, naive_reference(r, g, hinted, hint_mask, 1e-6), rtol=0, atol=1e-12)


def test_failed_hinted_rollout_gets_no_gradient_on_its_hint_tokens():
    """Spec §16 (e)(2): through the clipped loss, the hint tokens of a negative-advantage hinted rollout get
    gradient exactly 0, its continuation non-zero."""
    r = torch.tensor([1.0, 0.0])
    hinted = torch.tensor([False, True])
    mask = torch.ones(2, 5, dtype=torch.bool)
    hint_mask = torch.tensor([[False] * 5, [True, True, True, False, False]])
    A = adhint_advantages(r, torch.zeros(2, dtype=torch.long), hinted, hint_mask)
    lp = torch.full((2, 5), -1.0, requires_grad=True)
    ClippedPolicyLoss()(lp, lp.detach(), A, mask).loss.backward()
    assert lp.grad[1, :3].abs().max() == 0 and bool((lp.grad[1, 3:] != 0).all())
    assert bool((lp.grad[0] != 0).all())


def test_all_equal_group_gives_zeros_and_estimator_reads_hint_len():
    mask = torch.ones(4, 3, dtype=torch.bool)
    batch = RolloutBatch(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.tensor([0, 0, 1, 1]), rewards=torch.tensor([1.0, 1.0, 1.0, 0.0]),
                         hint_len=torch.tensor([0, 2, 0, 2]))
    A = ADHint()(batch)
    assert A.shape == (4, 3) and A[:2].abs().max() == 0 and torch.isfinite(A).all()
    assert A[3, :2].abs().max() == 0 and A[3, 2] < 0  # failed hinted row: hint tokens protected
    with pytest.raises(ValueError, match=r"ADHint needs RolloutBatch fields \['hint_len'\]"):  # never a silent 0
        ADHint()(batch.replace(hint_len=None))


def test_bad_inputs_name_the_argument():
    g = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="hinted must be a bool"):
        adhint_advantages(torch.zeros(2), g, torch.zeros(2), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hint_mask must be a bool"):
        adhint_advantages(torch.zeros(2), g, torch.zeros(2, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards must be finite"):
        adhint_advantages(torch.tensor([0.0, float("nan")]), g, torch.zeros(2, dtype=torch.bool),
                          torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="omega_min"):
        hint_ratio(torch.zeros(2), omega_min=0.5, omega_max=0.2)
    with pytest.raises(ValueError, match="eps"):
        ADHint(eps=-1)
