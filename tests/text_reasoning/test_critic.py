"""T-PPO's critic method on a tiny real model with real generation: EGAE advantages from the value head, the value
loss on complete responses only, successive batching of unfinished responses, both parameter groups trained, and
an exact kill-and-resume (critic, optimiser and in-flight responses)."""

from __future__ import annotations

import pytest
import torch

from common.advantages.gae import EGAE, egae
from common.losses.aggregate import Normaliser
from common.methods.tppo import TruncatedPPO
from common.models import TinyLlama
from common.rewards.length import LengthReward
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from resume import TINY, assert_sigkill_resume_exact, cli
from text_reasoning.module import TextReasoningModule


def make_module(advantage=None, **method_kwargs) -> TextReasoningModule:
    sampling = method_kwargs.pop("sampling", Sampling(max_new_tokens=5))
    return TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                               rewards=[LengthReward(target=3)], sampling=sampling, group_size=8,
                               advantage=advantage if advantage is not None else EGAE(gamma=1.0, lam=0.9),
                               methods=[TruncatedPPO(**method_kwargs)], log_samples_every=0)


def rollouts_with_both_kinds(module):
    torch.manual_seed(0)
    rollouts = module.score(module.loop.rollout(digit_prompts(4)))
    assert bool(rollouts.truncated.any()) and bool((~rollouts.truncated).any())  # both kinds in the batch
    return rollouts


def test_advantages_are_egae_of_the_value_heads_predictions():
    module = make_module()
    tppo = module.methods[0]
    torch.nn.init.normal_(tppo.critic.net[-1].weight, std=1.0)  # a non-zero critic
    rollouts = tppo.after_score(module.loop, rollouts_with_both_kinds(module))
    adv = module.advantage(rollouts)
    with torch.no_grad():
        values = tppo.critic(module.policy(rollouts, hidden=True).hidden).masked_fill(~rollouts.completion_mask, 0)
    torch.testing.assert_close(rollouts.values, values)
    torch.testing.assert_close(adv, egae(rollouts.rewards, values, rollouts.completion_mask, rollouts.truncated,
                                         gamma=1.0, lam=0.9))
    # a truncated response's reward is unknown to EGAE: changing it changes nothing
    other = rollouts.replace(rewards=torch.where(rollouts.truncated, rollouts.rewards + 5.0, rollouts.rewards))
    torch.testing.assert_close(module.advantage(other), adv)


def test_value_loss_ignores_truncated_responses_and_trains_only_the_head():
    module = make_module()
    tppo = module.methods[0]
    rollouts = rollouts_with_both_kinds(module)
    norm = Normaliser.of(rollouts.completion_mask)

    def head_grad(batch):
        module.zero_grad(set_to_none=True)
        out = tppo.extra_loss(module.loop, batch, module.policy(batch, hidden=True), norm)  # the update's forward
        out.loss.backward()
        return out, tppo.critic.net[-1].weight.grad.clone()

    out, grad = head_grad(rollouts)
    _, grad_other = head_grad(rollouts.replace(rewards=torch.where(rollouts.truncated, rollouts.rewards - 7.0, rollouts.rewards)))
    torch.testing.assert_close(grad, grad_other)  # truncated rows' rewards never reach the value loss
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in module.policy.parameters())  # detached: the backbone gets nothing
    # at V = 0 the loss is ½ Σ_complete-tokens G² / N with G = R on every token of a complete row (γ = 1)
    complete = ~rollouts.truncated
    expected = 0.5 * float((rollouts.rewards[complete] ** 2 * rollouts.lengths[complete]).sum()) / float(norm.num_tokens)
    assert float(out.metrics["value_loss"]) == pytest.approx(expected, rel=1e-6)


def test_successive_batching_continues_unfinished_responses_for_another_window():
    module = make_module(sampling=Sampling(max_new_tokens=3), max_windows=2)
    in_flight = module.methods[0].in_flight
    torch.manual_seed(0)
    first = module.loop.rollout(digit_prompts(4))  # training rollouts: Loop.rollout -> after_rollout
    carried = [dict(r) for r in in_flight.rows]
    assert bool(first.truncated.any()) and len(carried) == int(first.truncated.sum())  # every unfinished one waits
    assert bool((first.window == 1).all())
    second = module.loop.rollout(digit_prompts(4, seed=1))
    assert second.batch_size == 32 + len(carried)
    for j, r in enumerate(carried):
        i = 32 + j
        prompt = second.prompt_ids[i][second.prompt_mask[i]].tolist()
        assert prompt == r["context"]  # the new window continues from the problem + everything generated
        assert second.completions[i].startswith(r["text"]) and int(second.window[i]) == 2
        assert second.samples[i]["prompt"] == r["sample"]["prompt"]
    assert not bool(second.truncated[32:].any())  # window 2 of 2: final, whether or not it ended
    assert all(r["window"] == 1 for r in in_flight.rows)  # only fresh responses wait now
    greedy = module.policy.rollout(digit_prompts(2), 1, greedy=True)  # validation never touches the in-flight rows
    assert greedy.batch_size == 2 and len(in_flight.rows) == int(second.truncated.sum())


def test_the_critic_needs_egae():
    from common.advantages.group import GRPO

    with pytest.raises(ValueError, match="advantage must be"):
        make_module(advantage=GRPO())
    with pytest.raises(ValueError, match="EGAE requires RolloutBatch.values"):  # EGAE without the critic: at start-up
        TextReasoningModule(policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                            advantage=EGAE())


def test_sigkill_resume_is_exact_and_the_critic_learns(tmp_path):
    method = '[{"class_path": "common.methods.tppo.TruncatedPPO", "init_args": {"value_lr": 1.0e-3, "max_windows": 2}}]'
    run = cli("configs/text_reasoning/tppo.yaml", *TINY, "--model.init_args.policy.init_args.alphabet", DIGITS,
              "--model.init_args.rewards", '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 3}}]',
              "--model.init_args.micro_batch_size", "8", "--model.init_args.methods", method)
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6, tags=("train/reward", "train/loss", "train/value_loss"))
    head = ckpt["state_dict"]["methods.0.critic.net.0.weight"]
    assert float(head.abs().sum()) > 0  # started at zero: the value head was trained
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3  # the head's own parameter group (value_lr)
    rows = ckpt["state_dict"]["methods.0.in_flight._extra_state"]["rows"]
    assert rows and all(r["window"] == 1 for r in rows)  # responses in flight at the end were compared exactly
