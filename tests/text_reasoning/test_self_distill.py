"""SDPO / SRPO (the SelfDistillation method part) through the text-reasoning module on tiny real models with real
generation: teacher contexts, the teacher's distribution against a plain forward on the re-prompted text, the EMA
rule after a real step, and the EMA teacher surviving a SIGKILL and resume exactly."""

from __future__ import annotations

import re
import time

import lightning as L
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
from torch.utils.data import DataLoader

from common.losses.aggregate import Normaliser
from common.losses.self_distill import SDPOLoss
from common.losses.srpo import SRPOLoss
from common.models import TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from resume import TINY, assert_sigkill_resume_exact, cli
from text_reasoning.module import TextReasoningModule
from text_reasoning.self_distill import MAX_DEMONSTRATION_CHARS, SelfDistillation, strip_thinking, teacher_contexts


class SevensReward(RewardFunction):
    """1 if the completion contains a "7", else 0: about half the tiny policy's samples succeed."""

    name = "sevens"

    def __call__(self, completions, samples):
        return torch.tensor([float("7" in c) for c in completions])


TEMPLATES = dict(reprompt_template="{prompt}{solution}", solution_template="+{solution}")


def make_module(ema_rate: float = 0.05, **overrides) -> TextReasoningModule:
    kwargs = dict(
        policy=TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS + "<>/think", seed=0),
        rewards=[SevensReward()], verifier=SevensReward(), sampling=Sampling(max_new_tokens=6),
        group_size=4, lr=3e-3, log_samples_every=0, loss=SDPOLoss(top_k=5),
        methods=[SelfDistillation(ema_rate=ema_rate, **TEMPLATES)],
    )
    kwargs.update(overrides)
    return TextReasoningModule(**kwargs)


def test_teacher_contexts_pick_the_first_successful_sibling():
    prompts = ["p", "p", "p", "p", "q", "q"]
    completions = ["w0", "<think>x</think>s1", "w2", "s3", "w4", "w5"]
    success = [False, True, False, True, False, False]
    groups = [0, 0, 0, 0, 1, 1]
    got = teacher_contexts(prompts, completions, success, groups, reprompt_template="{prompt}|{solution}",
                           solution_template="<{solution}>")
    # rows 0, 2 use row 1 (thinking stripped); row 1 may not use itself -> row 3; row 3 -> row 1; group 1: none
    assert got == ["p|<s1>", "p|<s3>", "p|<s1>", "p|<s1>", None, None]
    own = teacher_contexts(prompts, completions, success, groups, dont_reprompt_on_self_success=False,
                           remove_thinking=False, reprompt_template="{prompt}|{solution}", solution_template="{solution}")
    assert own[1] == "p|<think>x</think>s1"
    with pytest.raises(ValueError, match="one entry per row"):
        teacher_contexts(prompts, completions[:2], success, groups)


_LAZY_THINKING = re.compile(r"<think>.*?</think>", flags=re.DOTALL)  # the reference (quadratic on unclosed tags)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "a", "b\n", "<", "think>", "</", "<think"]), max_size=12))
def test_strip_thinking_equals_the_lazy_regex(parts):
    text = "".join(parts)
    assert strip_thinking(text) == _LAZY_THINKING.sub("", text)


HOSTILE = {  # 1 MB model outputs
    "unclosed": "<think>" * (2**20 // 7),
    "nested": "<think>" * (2**19 // 7) + "x" + "</think>" * (2**19 // 8),
    "long_closed": "<think>" + "y" * 2**20 + "</think>answer",
    "many_pairs": "<think>z</think>" * (2**20 // 16),
    "unclosed_after_text": "7" * 2**19 + "<think>" + "<" * 2**19,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_demonstrations_are_bounded_and_linear(name):
    """1 MB completions (the lazy regex took 5.8 s on 112 kB of unclosed ``<think>`` and did not finish on 1 MB):
    the demonstration is cut to MAX_DEMONSTRATION_CHARS, then stripped in one pass; a 1 MB strip alone is linear."""
    text = HOSTILE[name]
    start = time.perf_counter()
    got = teacher_contexts(["p", "p"], ["w", text], [False, True], [0, 0], reprompt_template="{prompt}|{solution}",
                           solution_template="{solution}")
    stripped = strip_thinking(text)  # unbounded input: still linear
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"
    assert got[0] is not None and len(got[0]) <= len("p|") + MAX_DEMONSTRATION_CHARS
    assert got[0] == "p|" + _LAZY_THINKING.sub("", text[:MAX_DEMONSTRATION_CHARS]).strip()  # 10 kB: the regex is fast enough
    assert len(stripped) <= len(text)


def test_teacher_distribution_equals_a_plain_forward_on_the_reprompted_text():
    module = make_module()
    method, loop, tokenizer = module.methods[0], module.loop, module.policy.tokenizer
    with torch.no_grad():  # a teacher that differs from the student, so the check can tell them apart
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    batch = method.after_score(loop, module.score(loop.rollout(digit_prompts(2))))
    contexts = teacher_contexts([s["prompt"] for s in batch.samples], batch.completions,
                                (batch.rewards >= 0.5).tolist(), batch.group_ids.tolist(), **TEMPLATES)
    assert any(contexts) and batch.has_teacher.tolist() == [c is not None for c in contexts]
    out = module.policy(batch, hidden=True)
    inputs = method.loss_inputs(loop, batch, out, {})
    distill, tokens = inputs["distill"], inputs["logprobs"]
    torch.testing.assert_close(tokens, out.logprobs, rtol=0, atol=1e-5)  # the same forward, two read-outs
    torch.testing.assert_close(inputs["old_logprobs"], tokens.detach(), rtol=0, atol=0)  # π_old = π at one step
    m = batch.completion_mask
    for i, s in enumerate(batch.samples):  # plain reference: teacher(chat(x̃) + y) for each row on its own
        text = contexts[i] or s["prompt"]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        assert batch.teacher_prompt_ids[i][batch.teacher_prompt_mask[i]].tolist() == ids.tolist()
        y = batch.completion_ids[i][m[i]]
        with torch.no_grad():
            logits = method.teacher(input_ids=torch.cat([ids, y])[None]).logits[0, len(ids) - 1 : -1]  # (L, V)
        logp = torch.log_softmax(logits.float(), -1)
        expected_entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(distill.teacher_entropy[i, m[i]], expected_entropy, rtol=0, atol=1e-5)
        top = distill.teacher[i, m[i], :5]  # teacher log-probs at the student's top-5 indices
        student_logp = distill.student[i, m[i], :5]
        # the student's top-5 indices, from a plain full forward of the student (left padding, explicit positions)
        attn = batch.attention_mask[i : i + 1].long()
        with torch.no_grad():
            full_student = torch.log_softmax(module.policy.model(input_ids=batch.input_ids[i : i + 1], attention_mask=attn,
                                                           position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[0].float(), -1)
        P = batch.prompt_ids.shape[1]
        idx = full_student[P - 1 : -1][m[i]].topk(5, -1).indices  # (L, 5)
        torch.testing.assert_close(student_logp, full_student[P - 1 : -1][m[i]].gather(-1, idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(top, logp.gather(-1, idx), rtol=0, atol=1e-5)


def test_one_training_step_moves_the_teacher_by_the_ema_rule():
    module = make_module(ema_rate=0.05)
    teacher = module.methods[0].teacher
    teacher0 = [p.detach().clone() for p in teacher.parameters()]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(digit_prompts(8), batch_size=4, collate_fn=list))
    moved = False
    for t, t0, p in zip(teacher.parameters(), teacher0, module.policy.model.parameters()):
        torch.testing.assert_close(t.detach(), 0.95 * t0 + 0.05 * p.detach(), rtol=1e-6, atol=1e-7)  # float32 lerp
        moved |= not torch.equal(t0, p.detach())
    assert moved, "the policy did not move in one step: the check would be vacuous"


def test_srpo_module_runs_a_step_and_logs_both_branches():
    module = make_module(loss=SRPOLoss(top_k=5))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(digit_prompts(8), batch_size=4, collate_fn=list))
    logged = trainer.logged_metrics
    assert {"train/grpo_loss", "train/distill_loss", "train/sdpo_frac"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])


def test_bad_loss_is_rejected():
    from common.losses.ppo_clip import ClippedPolicyLoss

    with pytest.raises(ValueError, match="loss must be a common.losses.self_distill.SDPOLoss"):
        make_module(loss=ClippedPolicyLoss())
    with pytest.raises(ValueError, match="ema_rate"):
        make_module(ema_rate=0.0)
    plain = make_module(methods=[])  # the loss without the method: one clear error at the loss call
    batch = plain.loop.rollout(digit_prompts(1))
    with pytest.raises(ValueError, match="SDPOLoss needs distill="):
        plain.loop.micro_loss(batch, Normaliser.of(batch.completion_mask), 0)


@pytest.mark.parametrize("recipe", ["sdpo", "srpo"])
def test_ema_teacher_survives_sigkill_and_resume_exactly(tmp_path, recipe):
    # every row counts as a success (threshold −100), so every row has a sibling teacher and the loss is non-zero
    run = cli(f"configs/text_reasoning/{recipe}.yaml", *TINY, "--model.init_args.rewards",
              '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 12}}]',
              "--model.init_args.methods",
              '[{"class_path": "text_reasoning.self_distill.SelfDistillation", '
              '"init_args": {"success_threshold": -100, "ema_rate": 0.5}}]',
              "--model.init_args.loss.init_args.top_k", "8")
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6)
    state = ckpt["state_dict"]
    teacher = {k[len("methods.0.teacher."):]: v for k, v in state.items() if k.startswith("methods.0.teacher.")}
    policy = {k[len("policy.model."):]: v for k, v in state.items() if k.startswith("policy.model.")}
    assert teacher and teacher.keys() == policy.keys()
    assert any(not torch.equal(teacher[k], policy[k]) for k in teacher), "EMA teacher equals the student"
    initial = dict(TinyLlama().load()[0].named_parameters())
    assert any(not torch.equal(teacher[k], initial[k].detach()) for k in initial), "the teacher never moved"
