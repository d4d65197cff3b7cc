"""A group-relative estimator with G = 1 is an error at start-up naming ``group_size`` (every advantage would be 0:
GRPO's A_i = (r_i − mean_g r) / std_g is exactly 0 in a group of one), not a silent run that never learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.advantages.adora import ADORA
from common.advantages.gae import EGAE
from common.advantages.group import GRPO, MCGRPO, NGRPO, RLOO, DrGRPO, ReinforcePP, grpo
from common.advantages.tracker import SPOTracker
from common.batch import RolloutBatch
from common.loop import Loop
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.policies.toy import CategoricalPolicy
from startup import advlab_failure

ROOT = Path(__file__).resolve().parents[3]


def score(batch: RolloutBatch) -> RolloutBatch:
    return batch.replace(rewards=torch.zeros(batch.batch_size))


def test_group_of_one_really_gives_zero_advantages():
    """The premise, by hand: four prompts, one sample each, distinct rewards -> all four advantages are 0."""
    assert torch.equal(grpo(torch.tensor([0.0, 1.0, 0.3, 2.0]), torch.arange(4)), torch.zeros(4))


@pytest.mark.parametrize("estimator", [GRPO(), DrGRPO(), RLOO(), ReinforcePP(), ADORA(), NGRPO(num_virtual=0)],
                         ids=lambda e: type(e).__name__)
def test_group_relative_estimators_refuse_group_size_one(estimator):
    with pytest.raises(ValueError, match=r"group_size must be >= 2 .*got 1"):
        Loop(CategoricalPolicy(), score, estimator, ClippedPolicyLoss(), group_size=1)
    Loop(CategoricalPolicy(), score, estimator, ClippedPolicyLoss(), group_size=2)  # fine


def test_mc_grpo_needs_three_and_group_free_estimators_accept_one():
    with pytest.raises(ValueError, match=r"group_size must be >= 3 for MCGRPO"):
        Loop(CategoricalPolicy(), score, MCGRPO(), ClippedPolicyLoss(), group_size=2)
    for estimator in (SPOTracker(num_prompts=4), NGRPO(num_virtual=1), EGAE()):
        assert estimator.min_group_size == 1
    assert SPOTracker.min_group_size == 1  # declared on the class: SPO's tracker works with G = 1


def test_a_method_that_replaces_the_rollout_makes_its_own_groups():
    class OwnGroups(Method):
        def rollout(self, loop, prompts, n):
            return None

    Loop(CategoricalPolicy(), score, GRPO(), ClippedPolicyLoss(), methods=[OwnGroups()], group_size=1)  # no error


def test_advlab_with_group_size_one_fails_in_seconds_naming_group_size(tmp_path):
    proc, beyond_import = advlab_failure("fit", "--config", str(ROOT / "configs/toy/bandit_grpo.yaml"),
                                         "--model.init_args.group_size", "1", "--trainer.logger", "false", cwd=tmp_path)
    assert "group_size must be >= 2 for GRPO, got 1" in proc.stderr
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"
