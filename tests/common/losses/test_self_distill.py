"""SDPO and SRPO losses (common/losses/self_distill.py, common/losses/srpo.py): divergence endpoints against
torch's kl_div, the tail bucket, density of the distillation gradient, the EMA rule, the token-mean over teacher
rows, SRPO's routing table, its weights, the all-correct = GRPO identity, the paper's ambiguity example, and bad
inputs."""

import pytest
import torch
import torch.nn.functional as F

from common.batch import RolloutBatch
from common.losses.ppo_clip import ClippedPolicyLoss
from common.losses.self_distill import Distillation, SDPOLoss, ema_update_, generalized_jsd, is_weight, topk_with_tail
from common.losses.srpo import SRPOLoss, entropy_weights, srpo_routes


def dist(*shape, seed=0):
    return torch.log_softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), -1)


def test_alpha_endpoints_equal_torch_kl_and_half_is_symmetric():
    P, Q = dist(4, 6, seed=1), dist(4, 6, seed=2)
    torch.testing.assert_close(generalized_jsd(P, Q, 0.0), F.kl_div(P, Q, reduction="none", log_target=True).sum(-1),
                               rtol=0, atol=0)  # KL(Q ‖ P)
    torch.testing.assert_close(generalized_jsd(P, Q, 1.0), F.kl_div(Q, P, reduction="none", log_target=True).sum(-1),
                               rtol=0, atol=0)  # KL(P ‖ Q)
    torch.testing.assert_close(generalized_jsd(P, Q, 0.5), generalized_jsd(Q, P, 0.5), rtol=0, atol=1e-15)


def test_generalized_jsd_matches_the_plain_formula():
    """(1 − α)·KL(P ‖ M) + α·KL(Q ‖ M), M = (1 − α)P + αQ, written with probabilities."""
    P, Q = dist(3, 5, seed=3).exp(), dist(3, 5, seed=4).exp()
    a = 0.3
    M = (1 - a) * P + a * Q
    expected = (1 - a) * (P * (P / M).log()).sum(-1) + a * (Q * (Q / M).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(P.log(), Q.log(), a), expected, rtol=0, atol=1e-14)


def test_tail_bucket_makes_a_distribution():
    logp = dist(7, 50, seed=5)
    index = logp.topk(10, -1).indices
    with_tail = topk_with_tail(logp, index)
    torch.testing.assert_close(with_tail.exp().sum(-1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(with_tail[:, :10], logp.gather(-1, index))
    renorm = topk_with_tail(logp, index, add_tail=False)
    torch.testing.assert_close(renorm.exp().sum(-1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)


def test_distillation_gradient_is_dense_only_where_teacher_and_student_differ():
    """5-token failed response: teacher = student at positions 0-3, different at 4 -> gradient w.r.t. the logits
    is 0 at 0-3 and non-zero at 4 (spec §13 (e)(3); GRPO would push all 5 positions equally)."""
    logits = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64).requires_grad_(True)
    teacher_logits = logits.detach().clone()
    teacher_logits[0, 4] = torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    index = torch.arange(8).expand(1, 5, 8)  # K = V: the tail is empty
    student = topk_with_tail(torch.log_softmax(logits, -1), index, add_tail=False)
    teacher = topk_with_tail(torch.log_softmax(teacher_logits, -1), index, add_tail=False)
    mask = torch.ones(1, 5, dtype=torch.bool)
    lp = torch.zeros(1, 5, dtype=torch.float64)
    d = Distillation(student=student, teacher=teacher, teacher_entropy=torch.zeros(1, 5, dtype=torch.float64),
                     has_teacher=torch.tensor([True]))
    SDPOLoss(top_k=8)(lp, lp, torch.zeros(1), mask, distill=d).loss.backward()
    per_position = logits.grad.abs().sum(-1)[0]  # (5,)
    assert per_position[:4].max() < 1e-15 and per_position[4] > 1e-3


def test_ema_update_rule():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.05)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t.detach(), 0.95 * b + 0.05 * s.detach())


def test_sdpo_loss_is_a_token_mean_over_teacher_rows_and_zero_without_teacher():
    # rows 0 (2 tokens) and 2 (1 token) have a teacher; D at their tokens (hand): row 0 → d00, d01; row 2 → d20
    # loss = (d00 + d01 + d20) / 3 (rows without a teacher are neither in the sum nor in the count)
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    S, Q = dist(3, 2, 4, seed=8), dist(3, 2, 4, seed=9)
    D = generalized_jsd(S, Q, 0.5)
    lp = torch.zeros(3, 2, dtype=torch.float64)
    d = Distillation(student=S, teacher=Q, teacher_entropy=torch.zeros(3, 2, dtype=torch.float64),
                     has_teacher=torch.tensor([True, False, True]))
    out = SDPOLoss(top_k=3)(lp, lp, torch.zeros(3), mask, distill=d)
    torch.testing.assert_close(out.loss, (D[0, 0] + D[0, 1] + D[2, 0]) / 3)
    none = Distillation(student=S, teacher=Q, teacher_entropy=d.teacher_entropy, has_teacher=torch.zeros(3, dtype=torch.bool))
    out = SDPOLoss(top_k=3)(lp, lp, torch.zeros(3), mask, distill=none)
    assert out.loss.item() == 0 and out.metrics["empty_target_batch"].item() == 1


def test_is_weight_is_capped_and_detached():
    lp = torch.log(torch.tensor([[1.0, 3.0, 0.5]])).requires_grad_(True)
    w = is_weight(lp, torch.zeros(1, 3), 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.5]]))
    assert not w.requires_grad


def batch_of(mask, group_ids, correct, rewards=None):
    B, T = mask.shape
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, group_ids=group_ids,
                        correct=correct, rewards=rewards)


def test_srpo_routing_table():
    # (correct, teacher) -> GRPO; (correct, none) -> GRPO; (wrong, teacher) -> SDPO; (wrong, none) -> GRPO
    routes = srpo_routes(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]))
    assert routes.tolist() == [False, False, True, False]


def test_entropy_weights_have_mean_one_on_omega_and_beta_zero_is_one():
    H = torch.rand(4, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 3
    omega = torch.tensor([[True, True, False], [False, False, False], [True, False, False], [True, True, True]])
    for beta in (0.0, 0.5, 1.0, 4.0):
        w = entropy_weights(H, omega, beta)
        torch.testing.assert_close(w[omega].mean(), torch.tensor(1.0, dtype=torch.float64))
        assert w[~omega].abs().max() == 0
    assert torch.equal(entropy_weights(H, omega, 0.0)[omega], torch.ones(6, dtype=torch.float64))
    assert entropy_weights(H, torch.zeros_like(omega), 1.0).abs().max() == 0  # Ω empty: no 0/0


def test_all_correct_batch_equals_token_mean_grpo_exactly():
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    lp = (torch.randn(3, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64) - 2).requires_grad_(True)
    old = lp.detach() + 0.1
    adv = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    S, Q = dist(3, 3, 4, seed=12), dist(3, 3, 4, seed=13)
    d = Distillation(student=S, teacher=Q, teacher_entropy=torch.ones(3, 3, dtype=torch.float64),
                     has_teacher=torch.tensor([True, True, False]))
    batch = batch_of(mask, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    srpo = SRPOLoss(eps_low=0.2, eps_high=0.28)(lp, old, adv, mask, batch=batch, distill=d).loss
    grpo = ClippedPolicyLoss(eps_low=0.2, eps_high=0.28, aggregation="token_mean")(lp, old, adv, mask).loss
    torch.testing.assert_close(srpo, grpo, rtol=0, atol=0)


def test_ambiguity_sdpo_lowers_a_correct_answer_srpo_raises_it():
    """Spec §14 (e)(4): one-step policy over {a, b, c}, a and b correct. Rollout a is correct; the teacher, shown
    sibling b, puts most mass on b: q = (0.1, 0.8, 0.1). Group: a (correct, A > 0) and c (wrong, A < 0).
    SDPO's gradient on a lowers log π(a); SRPO routes a to GRPO and raises it."""
    z = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)  # π uniform
    logp = torch.log_softmax(z, -1)  # (1, 1, 3)
    q = torch.log(torch.tensor([[[0.1, 0.8, 0.1]]], dtype=torch.float64))
    lp_a = logp[..., 0]  # (1, 1) log π(a), the sampled token
    mask = torch.ones(1, 1, dtype=torch.bool)
    d = Distillation(student=logp, teacher=q, teacher_entropy=torch.zeros(1, 1, dtype=torch.float64),
                     has_teacher=torch.tensor([True]))
    sdpo = SDPOLoss(top_k=3)(lp_a, lp_a.detach(), torch.tensor([1.0]), mask, distill=d).loss
    (g_sdpo,) = torch.autograd.grad(sdpo, z, retain_graph=True)
    srpo = SRPOLoss(top_k=3)(lp_a, lp_a.detach(), torch.tensor([1.0]), mask, batch=batch_of(
        mask, torch.zeros(1, dtype=torch.long), torch.tensor([True])), distill=d).loss
    (g_srpo,) = torch.autograd.grad(srpo, z)
    # a gradient step z ← z − η g changes log π(a) by −η ∇_z log π(a) · g, with ∇_z log π(a) = e_a − π
    grad_log_a = torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    assert float(-(grad_log_a * g_sdpo.flatten()).sum()) < 0  # SDPO: log π(a) goes down
    assert float(-(grad_log_a * g_srpo.flatten()).sum()) > 0  # SRPO: log π(a) goes up


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="alpha must be in"):
        SDPOLoss(alpha=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SDPOLoss(top_k=0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        SRPOLoss(beta=-1)
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 4))
    mask = torch.ones(2, 2, dtype=torch.bool)
    lp = torch.zeros(2, 2)
    bad = Distillation(student=torch.zeros(2, 3, 4), teacher=torch.zeros(2, 3, 4), teacher_entropy=torch.zeros(2, 2),
                       has_teacher=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="distill.student"):
        SDPOLoss()(lp, lp, torch.zeros(2), mask, distill=bad)
    good = Distillation(student=torch.zeros(2, 2, 4), teacher=torch.zeros(2, 2, 4), teacher_entropy=torch.zeros(2, 2),
                        has_teacher=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch.correct"):
        SRPOLoss()(lp, lp, torch.zeros(2), mask, distill=good)
    with pytest.raises(ValueError, match="SDPOLoss needs distill="):  # no teacher distributions: never a silent 0
        SDPOLoss()(lp, lp, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="SRPOLoss needs distill="):
        SRPOLoss()(lp, lp, torch.zeros(2), mask,
                   batch=batch_of(mask, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)))
