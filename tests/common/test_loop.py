"""The one loop (common/loop.py) with every policy kind: a conformance test each kind runs, and modality
independence (policies that are not language models train through the unchanged loop, from YAML)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.base import LossOutput, PolicyLoss
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.policies.toy import CategoricalPolicy, GaussianPolicy, TabularPolicy
from common.rollout.base import Sampling
from common.toy_tasks import Bandit, GaussianTarget
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy
from helpers import DIGITS, digit_prompts

ROOT = Path(__file__).resolve().parents[2]


def causal_lm() -> CausalLMPolicy:
    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=5))


def masked_diffusion() -> MaskedDiffusionPolicy:
    return MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=DIGITS, hidden_size=32, num_layers=1, num_heads=2, seed=0),
                                 gen_length=4, block_length=2, steps=2, p_mask=0.5)


def causal_lm_lora() -> CausalLMPolicy:
    from common.models import LoRA

    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=5), lora=LoRA(rank=4, target_modules=["q_proj", "v_proj"]))


GRID = DIGITS + "udlr.AG\n"  # the grid world's characters: a char-level policy that reads its observations


def agent() -> "MultiTurnAgentPolicy":
    """A tiny causal LM acting for up to 3 turns in the grid world: every unfinished turn gets an observation, so
    rows interleave action and environment tokens (layout B)."""
    from common.policies.agent import MultiTurnAgentPolicy
    from common.rollout.env import EpisodeLimits
    from text_reasoning.envs.grid import GridWorld

    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=GRID, seed=0),
                        Sampling(max_new_tokens=3))
    return MultiTurnAgentPolicy(lm, GridWorld(), EpisodeLimits(max_turns=3, max_total_tokens=40))


def grid_tasks(n: int) -> list[dict]:
    from text_reasoning.envs.grid import GridTasks

    return [p.as_sample() for p in GridTasks(3).make(n, 0)]


# Each policy kind: (factory, prompts, reward of a batch). New domains add their policy here.
KINDS = {
    "causal_lm": (causal_lm, lambda n: digit_prompts(n), lambda b: (b.completion_ids == 7).float().mean(1)),
    "causal_lm_lora": (causal_lm_lora, lambda n: digit_prompts(n), lambda b: (b.completion_ids == 7).float().mean(1)),
    "agent": (agent, grid_tasks, lambda b: torch.tensor([s["episode_return"] for s in b.samples])),
    "categorical": (lambda: CategoricalPolicy(context_dim=4, num_actions=5), lambda n: Bandit(4, 5).prompts(n, 0),
                    lambda b: Bandit(4, 5).reward(b)),
    "gaussian": (lambda: GaussianPolicy(dim=3, steps=4), lambda n: GaussianTarget(3).prompts(n, 0),
                 lambda b: GaussianTarget(3).reward(b)),
    "tabular": (lambda: TabularPolicy(num_prompts=4, num_actions=5), lambda n: [{"index": i % 4} for i in range(n)],
                lambda b: (b.completion_ids[:, 0] == b.inputs["prompt"]).float()),
    # log-probs estimated with a random mask per inner epoch (the masked-diffusion LM's estimator)
    "seeded_mask": (lambda: CategoricalPolicy(context_dim=6, num_actions=5, mask_prob=0.5),
                    lambda n: Bandit(6, 5).prompts(n, 0), lambda b: Bandit(6, 5).reward(b)),
    # a masked-diffusion LM (diffusion/dllm): LLaDA sampler, d1's one-step estimator with a prompt mask per epoch
    "masked_diffusion": (masked_diffusion, lambda n: digit_prompts(n), lambda b: (b.completion_ids == 7).float().mean(1)),
}


class RatioProbe(PolicyLoss):
    """A loss that records max |log π − log π_old| of every call (first call = the first inner step) and
    backpropagates −A·log π, so that the weights move between calls."""

    def __init__(self):
        self.gaps: list[float] = []

    def __call__(self, logprobs, old_logprobs, advantages, mask, **_) -> LossOutput:
        self.gaps.append(float(((logprobs - old_logprobs).abs() * mask).max()))
        A = advantages if advantages.dim() == 2 else advantages[:, None]
        return LossOutput(-(A * logprobs * mask).sum() / mask.sum())


def score_with(reward):
    def score(b: RolloutBatch) -> RolloutBatch:
        r = reward(b).to(b.completion_mask.device).double()
        r = r + 1e-3 * torch.arange(b.batch_size, dtype=r.dtype, device=r.device)  # no all-equal group: weights move
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",))
    return score


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("seed", range(4))
def test_ratio_is_one_at_the_first_inner_step_for_any_factorisation(kind, seed, one_thread):
    """float64: π/π_old = 1 (|log ratio| ≤ 1e-12) at the first inner step for random rollout batch x minibatch x
    micro-batch x mu, old log-probs recomputed from what the batch records; later steps move (ratio ≠ 1)."""
    make, prompts, reward = KINDS[kind]
    gen = torch.Generator().manual_seed(seed)
    P, G = (int(v) for v in torch.randint(2, 5, (2,), generator=gen))
    B = P * G
    minibatch = int(torch.randint(1, B + 1, (1,), generator=gen))
    micro = int(torch.randint(1, minibatch + 1, (1,), generator=gen))
    mu = int(torch.randint(1, 4, (1,), generator=gen))
    torch.manual_seed(seed)
    policy = make().double()
    probe = RatioProbe()
    loop = Loop(policy, score_with(reward), GRPO(), probe, group_size=G, mu=mu, minibatch_size=minibatch,
                micro_batch_size=micro)
    batch = loop.collect(prompts(P)).kept
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    loop.update(batch, Stepper(opt, policy.trainable_parameters(), max_grad_norm=1.0))
    first_step_calls = -(-min(minibatch, B) // micro)  # micro-batches of the first minibatch
    assert max(probe.gaps[:first_step_calls]) <= 1e-12, (P, G, minibatch, micro, mu, probe.gaps)
    if len(probe.gaps) > first_step_calls:  # after an optimiser step the policy has moved
        assert max(probe.gaps[first_step_calls:]) > 1e-8


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_after_a_step_the_sampler_scores_with_the_trained_weights(kind, one_thread):
    """The rollout engine's log-probs of a fixed trajectory change after one optimiser step and equal the trainer's
    (the sampler is the trained policy: a sync that binds nothing fails)."""
    make, prompts, reward = KINDS[kind]
    torch.manual_seed(0)
    policy = make().double()
    loop = Loop(policy, score_with(reward), GRPO(), ClippedPolicyLoss(), group_size=4)
    batch = loop.collect(prompts(3)).kept
    fixed = batch.replace(advantages=None)
    before = policy.sampler_logprobs(fixed).detach().clone()
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    loop.update(batch, Stepper(opt, policy.trainable_parameters(), max_grad_norm=1.0))
    with torch.no_grad():
        after, trainer = policy.sampler_logprobs(fixed), policy(fixed).logprobs
    assert (after - before).abs().max() > 1e-6
    torch.testing.assert_close(after, trainer, rtol=0, atol=1e-10)


def test_per_epoch_masks_differ_across_epochs_and_not_across_splits():
    """The seeded estimator: epoch e's log-probs of a row do not depend on the micro-batch it is computed in, and
    differ between epochs (a mask drawn per micro-batch, as some dLLM trainers do, would break the first, and
    a mask drawn once would make mu > 1 see one mask)."""
    torch.manual_seed(0)
    policy = CategoricalPolicy(context_dim=6, num_actions=5, mask_prob=0.5).double()
    batch = policy.rollout(Bandit(6, 5).prompts(6, 0), 4)
    whole = policy(batch, epoch=1).logprobs
    parts = torch.cat([policy(m, epoch=1).logprobs for m in batch.split(5)])
    assert torch.equal(whole, parts)
    assert (policy(batch, epoch=2).logprobs - whole).abs().max() > 1e-3
    loop = Loop(policy, score_with(lambda b: Bandit(6, 5).reward(b)), GRPO(), ClippedPolicyLoss(), group_size=4, mu=3)
    old = loop.old_logprobs(batch)
    assert old.shape == (24, 1, 3) and torch.equal(old[..., 1], whole)


def test_a_missing_field_is_an_error_at_start_up_naming_the_part_and_the_field():
    class NeedsUid(Method):
        requires = ("prompt_uid",)

    with pytest.raises(ValueError, match=r"NeedsUid requires RolloutBatch.prompt_uid"):
        Loop(CategoricalPolicy(), score_with(lambda b: torch.zeros(b.batch_size)), GRPO(), ClippedPolicyLoss(),
             methods=[NeedsUid()])

    class Provides(Method):
        provides = ("prompt_uid",)

    Loop(CategoricalPolicy(), score_with(lambda b: torch.zeros(b.batch_size)), GRPO(), ClippedPolicyLoss(),
         methods=[NeedsUid(), Provides()])  # provided by another part: fine

    class Typo(Method):
        requires = ("prompt_uuid",)

    with pytest.raises(ValueError, match="not a RolloutBatch field"):
        Loop(CategoricalPolicy(), score_with(lambda b: torch.zeros(b.batch_size)), GRPO(), ClippedPolicyLoss(),
             methods=[Typo()])


def test_methods_hooks_run_in_order_and_combine():
    """Two methods: each hook of both runs, in list order, with what the previous one returned."""
    calls = []

    class Tag(Method):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def after_rollout(self, loop, batch):
            calls.append(("after_rollout", self.name))
            return batch

        def after_score(self, loop, batch):
            calls.append(("after_score", self.name))
            return batch.replace(rewards=batch.rewards + 1.0)

        def extra_loss(self, loop, micro, out, normaliser):
            calls.append(("extra_loss", self.name))
            return LossOutput(out.logprobs.sum() * 0.0, {f"extra_{self.name}": torch.ones(())})

        def after_update(self, loop, batch):
            calls.append(("after_update", self.name))
            assert batch.entropy is not None and batch.entropy.shape == batch.completion_mask.shape
            return {f"after_{self.name}": torch.ones(())}

    torch.manual_seed(0)
    policy = CategoricalPolicy()
    loop = Loop(policy, score_with(lambda b: torch.zeros(b.batch_size)), GRPO(), ClippedPolicyLoss(),
                methods=[Tag("a"), Tag("b")], group_size=2)
    got = loop.collect(Bandit().prompts(2, 0))
    torch.testing.assert_close(got.kept.rewards.float(), 2.0 + 1e-3 * torch.arange(4.0))  # both after_score ran
    metrics = loop.update(got.kept, Stepper(torch.optim.SGD(policy.parameters(), lr=0.1), policy.parameters()))
    assert {"extra_a", "extra_b", "after_a", "after_b"} <= set(metrics)
    assert calls == [("after_rollout", "a"), ("after_rollout", "b"), ("after_score", "a"), ("after_score", "b"),
                     ("extra_loss", "a"), ("extra_loss", "b"), ("after_update", "a"), ("after_update", "b")]


def advlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("config, metric, floor", [("bandit_grpo", "train/accuracy", 0.6),
                                                     ("gaussian_grpo", "train/reward", -5.0)])
def test_non_lm_policies_learn_through_the_unchanged_loop_from_yaml(config, metric, floor, tmp_path):
    """A categorical MLP on a bandit and a Gaussian chain policy train from their YAML through the shared module:
    the last 10 steps' mean of ``metric`` beats ``floor`` and the first 10 steps' (bandit: chance is 1/4 accuracy;
    Gaussian: untrained, the reward is about −8, the mean squared distance E‖2x‖² of x ~ N(0, I_2); −5 is 5/8 of it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = advlab("fit", "--config", str(ROOT / f"configs/toy/{config}.yaml"), "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    events = next((tmp_path / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    values = [e.value for e in acc.Scalars(metric)]
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last > floor and last > first, (first, last)


def test_no_domain_module_overrides_the_loop():
    """Every PolicyOptimizationModule subclass in the repository leaves training_step and the loop alone (it builds
    its policy and scores validation); the module file names no model class."""
    import importlib
    import inspect
    import pkgutil

    from common.module import PolicyOptimizationModule

    for package in ("text_reasoning", "retrieval", "speculative", "common", "diffusion", "multimodal"):
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError:
            continue
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            importlib.import_module(info.name)
    subclasses, todo = [], [PolicyOptimizationModule]
    while todo:
        for sub in todo.pop().__subclasses__():
            subclasses.append(sub)
            todo.append(sub)
    assert subclasses, "no domain module found"
    for cls in subclasses:
        if cls.__module__.startswith(("tests.", "test_")) or "test" in cls.__module__.split(".")[-1]:
            continue
        overridden = {"training_step", "collect", "update", "stepper"} & set(vars(cls))
        assert not overridden, f"{cls.__module__}.{cls.__name__} overrides {overridden}"
    source = inspect.getsource(importlib.import_module("common.module"))
    assert len(source.splitlines()) <= 260  # 250 + the canaries / completions-log switches (issue 16)
    for name in ("Llama", "CausalLM", "TinyLlama", "get_decoder", "DynamicCache", "tokenizer"):
        assert name not in source, name
