"""ADHint's CGM weights and loss (common/losses/adhint.py, the spec's proposal): hand values, rows without a
continuation, the loss equal to the clipped loss with hint-token advantages scaled by w, and bad inputs."""

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.adhint import ADHintLoss, consistency_weights
from common.losses.ppo_clip import ClippedPolicyLoss


def test_hand_weights():
    # row 0: hint tokens H = 0.5, 2.0; continuation H = 1.0, 1.0 -> H̄ = 1 -> w = exp(−|log 0.5|) = 0.5,
    #        exp(−|log 2|) = 0.5; continuation 1.  row 1: all hint, no continuation -> 1.  row 2: no hint -> 1
    H = torch.tensor([[0.5, 2.0, 1.0, 1.0], [0.3, 3.0, 1.0, 1.0], [0.1, 9.0, 1.0, 1.0]])
    hint = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    mask = torch.ones(3, 4, dtype=torch.bool)
    w = consistency_weights(H, hint, mask)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 1.0, 1.0], [1.0] * 4, [1.0] * 4]))


def test_loss_is_the_clipped_loss_with_scaled_hint_advantages():
    B, T = 2, 4
    mask = torch.ones(B, T, dtype=torch.bool)
    batch = RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.zeros(B, dtype=torch.long), hint_len=torch.tensor([2, 0]))
    H = torch.tensor([[0.5, 4.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])  # row 0: H̄ = 2 -> w = 0.25, 0.5 on the hint
    lp = torch.full((B, T), -1.0, requires_grad=True)
    A = torch.tensor([1.0, -1.0])
    ours = ADHintLoss()(lp, lp.detach() + 0.05, A, mask, entropy=H, batch=batch)
    scaled = torch.tensor([[0.25, 0.5, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = ClippedPolicyLoss()(lp, lp.detach() + 0.05, scaled, mask, entropy=H)
    torch.testing.assert_close(ours.loss, ref.loss)
    torch.testing.assert_close(ours.metrics["hint_weight"], torch.tensor(0.375))
    with pytest.raises(ValueError, match=r"ADHintLoss needs RolloutBatch fields \['hint_len'\]"):
        ADHintLoss()(lp, lp.detach(), A, mask, entropy=H, batch=batch.replace(hint_len=None))


def test_bad_inputs():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs entropy"):
        ADHintLoss()(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), mask)
    with pytest.raises(ValueError, match="must all be"):
        consistency_weights(torch.ones(1, 2), torch.ones(1, 3, dtype=torch.bool), mask)
