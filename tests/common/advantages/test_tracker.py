"""SPO single-stream value tracker (common/advantages/tracker.py): hand-computed advantages and Beta updates, a
plain-loop reference over many batches, the KL-adaptive forgetting, convergence on a stationary prompt, degenerate
and bad input, and the state round trip."""

import math

import pytest
import torch

from common.advantages.tracker import SPOTracker, kl_forgetting, spo_advantage
from common.batch import RolloutBatch


def batch_of(rewards, uids) -> RolloutBatch:
    r = torch.as_tensor(rewards, dtype=torch.float32)
    B = r.shape[0]
    z = torch.zeros(B, 1, dtype=torch.long)
    return RolloutBatch(prompt_ids=z, prompt_mask=z.bool(), completion_ids=z, completion_mask=~z.bool(),
                        group_ids=torch.arange(B), rewards=r, prompt_uid=torch.as_tensor(uids, dtype=torch.long))


def test_hand_computed_advantages_and_update() -> None:
    # N_0 = 1 / (1 - 0.875) = 8 -> alpha = beta = 4, v = 0.5 for every prompt.
    # r = (1, 0, 1): A = (0.5, -0.5, 0.5), mean 1/6, centred (1/3, -2/3, 1/3), unbiased std sqrt((1/9+4/9+1/9)/2)
    # = sqrt(1/3) -> Ã = (1/3, -2/3, 1/3) * sqrt(3) = (0.57735, -1.15470, 0.57735)
    t = SPOTracker(num_prompts=4, eps=0.0)
    adv = t(batch_of([1.0, 0.0, 1.0], [0, 1, 2]))
    s3 = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([s3 / 3, -2 * s3 / 3, s3 / 3]))
    # no KL observed: D = 0 -> rho = clamp(1, 0.875, 0.96) = 0.96; alpha_0 = 0.96*4 + 1 = 4.84, beta_0 = 3.84
    torch.testing.assert_close(t.alpha, torch.tensor([4.84, 3.84, 4.84, 4.0], dtype=torch.float64))
    torch.testing.assert_close(t.beta, torch.tensor([3.84, 4.84, 3.84, 4.0], dtype=torch.float64))
    assert t.visits.tolist() == [1, 1, 1, 0]
    # the next baseline of prompt 0 is 4.84 / 8.68 = 0.557604; its own earlier reward moved it, not this one
    torch.testing.assert_close(t.value()[0], torch.tensor(4.84 / 8.68, dtype=torch.float64))


def test_matches_a_plain_loop_reference_with_kl_drift() -> None:
    N, d_half, rmin, rmax, n0 = 5, 0.1, 0.5, 0.95, 3.0
    t = SPOTracker(num_prompts=N, d_half=d_half, rho_min=rmin, rho_max=rmax, prior_count=n0, eps=1e-6)
    alpha, beta, last, total = [n0 / 2] * N, [n0 / 2] * N, [0.0] * N, 0.0
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        uids = torch.randperm(N, generator=g)[:3].tolist()
        rewards = torch.rand(3, generator=g).tolist()  # non-binary rewards in [0, 1]
        adv = t(batch_of(rewards, uids))
        a = [r - alpha[u] / (alpha[u] + beta[u]) for r, u in zip(rewards, uids)]
        mean = sum(a) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in a) / 2)
        torch.testing.assert_close(adv, torch.tensor([(x - mean) / (std + 1e-6) for x in a]), atol=1e-5, rtol=1e-5)
        for r, u in zip(rewards, uids):
            rho = min(rmax, max(rmin, 2 ** (-(total - last[u]) / d_half)))
            alpha[u], beta[u], last[u] = rho * alpha[u] + r, rho * beta[u] + 1 - r, total
        kl = 0.03 * (step % 4)
        t.observe_kl(torch.tensor(kl))
        total += kl
    torch.testing.assert_close(t.alpha, torch.tensor(alpha, dtype=torch.float64))
    torch.testing.assert_close(t.beta, torch.tensor(beta, dtype=torch.float64))


def test_more_policy_drift_forgets_more() -> None:
    # prior alpha = beta = 4; r = 1. No drift: rho = rho_max = 1 -> v = 5/9. Drift D = D_half: rho = 0.5 -> v = 3/5.
    slow = SPOTracker(num_prompts=1, d_half=0.2, rho_min=0.1, rho_max=1.0, prior_count=8.0)
    fast = SPOTracker(num_prompts=1, d_half=0.2, rho_min=0.1, rho_max=1.0, prior_count=8.0)
    fast.observe_kl(torch.tensor(0.2))
    slow(batch_of([1.0], [0]))
    fast(batch_of([1.0], [0]))
    assert float(slow.value()[0]) == pytest.approx(5 / 9)
    assert float(fast.value()[0]) == pytest.approx(3 / 5)
    torch.testing.assert_close(kl_forgetting(torch.tensor([0.0, 0.2, 10.0]), d_half=0.2, rho_min=0.1, rho_max=0.9),
                               torch.tensor([0.9, 0.5, 0.1]))


def test_stationary_prompt_converges_to_its_success_rate() -> None:
    # spec §11 (e)(1): p = 0.3, rho = 1: |v - 0.3| < 0.03 after 2000 observations (3 sigma; fixed seed)
    t = SPOTracker(num_prompts=1, rho_min=1.0, rho_max=1.0, prior_count=2.0)
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(2000, generator=g) < 0.3).float()
    for chunk in rewards.split(50):
        t(batch_of(chunk.tolist(), [0] * 50))
    assert abs(float(t.value()[0]) - 0.3) < 0.03


def test_degenerate_batches_give_exact_zeros() -> None:
    t = SPOTracker(num_prompts=3)
    assert t(batch_of([1.0, 1.0, 1.0], [0, 1, 2])).tolist() == [0.0, 0.0, 0.0]  # equal baselines, equal rewards
    assert t(batch_of([0.0], [0])).tolist() == [0.0]  # a batch of one
    assert spo_advantage(torch.full((4,), 0.1), torch.full((4,), 0.7)).tolist() == [0.0] * 4


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        SPOTracker(num_prompts=0)
    with pytest.raises(ValueError, match="rho_min <= rho_max"):
        SPOTracker(num_prompts=2, rho_min=0.9, rho_max=0.5)
    with pytest.raises(ValueError, match="prior_count must be given"):
        SPOTracker(num_prompts=2, rho_min=1.0, rho_max=1.0)
    t = SPOTracker(num_prompts=2)
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\]"):
        t(batch_of([2.0], [0]))
    with pytest.raises(ValueError, match="finite"):
        t(batch_of([float("nan")], [0]))
    with pytest.raises(ValueError, match=r"prompt_uid must be in \[0, 2\)"):
        t(batch_of([1.0], [2]))
    b = batch_of([1.0], [0]).replace(prompt_uid=None)
    with pytest.raises(ValueError, match="PrioritisedData"):
        t(b)
    assert SPOTracker.requires == ("prompt_uid",)  # checked at start-up against what the run provides
    with pytest.raises(ValueError, match="baseline must have the shape"):
        spo_advantage(torch.zeros(3), torch.zeros(2))


def test_state_round_trips_through_state_dict() -> None:
    a = SPOTracker(num_prompts=3)
    a(batch_of([1.0, 0.0], [2, 0]))
    a.observe_kl(torch.tensor(0.5))
    b = SPOTracker(num_prompts=3)
    b.load_state_dict(a.state_dict())
    for name, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], v), name
    torch.testing.assert_close(b(batch_of([1.0, 1.0], [0, 1])), a(batch_of([1.0, 1.0], [0, 1])))
