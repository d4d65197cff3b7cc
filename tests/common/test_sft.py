"""The SFT module (common/sft.py): loss on response tokens only (against a plain per-example loop over full
logits), packing changes nothing (loss and gradients), the prompt text is the RL policy's, data sources and their
errors, and `advlab fit` on the SFT recipe in a real subprocess (the loss falls, a checkpoint and TensorBoard events
are written, it resumes, the exported model loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.models import TinyLlama
from common.sft import NextTokenCE, Records, SFTData, SFTModule, collate, encode_examples

ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = [
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is 5."},
    {"prompt": "What is 41 + 17?", "response": "58"},
    {"prompt": "Name a colour of the sky at noon on a clear day.", "response": "Blue, mostly; a pale blue near the horizon."},
    {"prompt": "Hi", "response": "Hello! How can I help you today?"},
    {"prompt": "What is 7 * 6?", "response": "42"},
]


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return SFTModule(policy=TinyLlama(hidden_size=32, num_layers=2, num_heads=4, seed=0), system_prompt="Be brief.",
                     instruction=" Answer briefly.")


def test_collate_layout_by_hand():
    b = collate([[1, 2], [3], [4, 5, 6]], [[7, 8], [9, 10, 11], [12]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 7, 8], [3, 9, 10, 11], [4, 5, 6, 12]]
    assert b.target_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3]] * 3 and not b.packed
    # packing: lengths 4, 4, 4 into rows of 8 -> first fit decreasing: (0, 1) and (2)
    p = collate([[1, 2], [3], [4, 5, 6]], [[7, 8], [9, 10, 11], [12]], pad_id=0, pack_length=8)
    assert p.input_ids.tolist() == [[1, 2, 7, 8, 3, 9, 10, 11], [4, 5, 6, 12, 0, 0, 0, 0]]
    assert p.example_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert p.target_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0, 0]]
    m = p.block_mask(True, torch.float32)[0, 0] == 0  # (8, 8) allowed
    assert m[5].tolist() == [False] * 4 + [True, True, False, False]  # example 1's 2nd token sees only its own past
    # max_length cuts the response's end; an empty prompt is refused, naming the example
    assert collate([[1, 2]], [[3, 4, 5]], 0, max_length=3).input_ids.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="example 1 has an empty prompt"):
        collate([[1], []], [[2], [3]], 0)
    with pytest.raises(ValueError, match="pack_length"):
        collate([[1]], [[2]], 0, pack_length=1)


def test_prompt_text_is_the_rl_policys_and_labels_cover_the_response_only(module):
    policy, tok = module.policy, module.policy.tokenizer
    batch = encode_examples(policy, module.objective, EXAMPLES)
    for e, ex in enumerate(EXAMPLES):
        row = batch.example_ids == e
        ids = batch.input_ids[row].tolist()
        prompt = policy.prompt_texts([ex])[0]  # the text CausalLMPolicy.rollout samples from
        assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<|im_start|>assistant\n")
        assert tok.decode(ids, skip_special_tokens=False) == prompt + ex["response"] + tok.eos_token
        targets = batch.input_ids[row & batch.target_mask].tolist()
        assert targets == tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def plain_loss(model, tok, policy, examples):
    """Independent reference: each example on its own, full logits of the HF model, CE summed over the response
    tokens (+ EOS), divided by the number of response tokens of the batch."""
    total, count = torch.zeros(()), 0
    for ex in examples:
        p = tok(policy.prompt_texts([ex])[0], add_special_tokens=False)["input_ids"]
        r = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float()  # (L, V)
        total = total + F.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(r), reduction="sum")
        count += len(r)
    return total / count


def test_next_token_ce_equals_a_plain_loop_over_response_tokens(module):
    model, tok, policy = module.policy.model, module.policy.tokenizer, module.policy
    model.eval()
    batch = encode_examples(policy, module.objective, EXAMPLES)
    total, count = NextTokenCE()(policy, batch)
    with torch.no_grad():
        ref = plain_loss(model, tok, policy, EXAMPLES)
    assert int(count) == int(batch.target_mask.sum()) == sum(
        len(tok(e["response"], add_special_tokens=False)["input_ids"]) + 1 for e in EXAMPLES)
    # float32: ~1e-7 relative per log-prob (the logsumexp over 49k logits of size ~1 adds a few ulp), summed over
    # ~60 tokens and divided by their number: 1e-5 relative leaves two orders of magnitude of room.
    torch.testing.assert_close(total / count, ref, rtol=1e-5, atol=1e-6)
    # padding never counts: the same examples with a much longer neighbour give the same per-example sums
    longer = EXAMPLES + [{"prompt": "x " * 40, "response": "y " * 40}]
    b2 = encode_examples(policy, module.objective, longer)
    t2, c2 = NextTokenCE()(policy, b2)
    last = b2.rows(torch.tensor([int((b2.example_ids == 5).any(1).nonzero())]))
    t_last, c_last = NextTokenCE()(policy, last)
    torch.testing.assert_close(t2 - t_last, total, rtol=1e-5, atol=1e-4)
    assert int(c2 - c_last) == int(count)


def test_packed_loss_and_gradient_equal_unpacked(module):
    policy = module.policy
    policy.model.eval()
    plain = encode_examples(policy, module.objective, EXAMPLES)
    packed = encode_examples(policy, module.objective, EXAMPLES, pack_length=96)
    assert packed.packed and packed.input_ids.shape[0] < plain.input_ids.shape[0]  # really packed
    grads = []
    for b in (plain, packed):
        policy.model.zero_grad(set_to_none=True)
        total, count = NextTokenCE()(policy, b)
        (total / count).backward()
        grads.append((float(total / count), [p.grad.clone() for p in policy.model.parameters()]))
    (l0, g0), (l1, g1) = grads
    # each example is computed as on its own row (same positions, same keys); only the reduction order of the
    # attention matmuls over a longer (masked) row differs: float32 rounding, ~1e-7 relative per op
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    for a, b in zip(g0, g1):  # float32 sums of ~100 token terms: 1e-5 of the tensor's largest entry
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    policy.model.zero_grad(set_to_none=True)


def test_micro_batches_and_degenerate_steps(module):
    """sft_update's normaliser is the step's: micro-batches give the same gradient; no response token -> loss 0,
    no NaN, no change."""
    from common.loop import Stepper
    from common.sft import sft_update

    policy = module.policy
    batch = encode_examples(policy, module.objective, EXAMPLES)
    params = [p for p in policy.model.parameters()]

    def grad_after(micro):
        opt = torch.optim.SGD(params, lr=0.0)
        captured = {}
        stepper = Stepper(opt, params, max_grad_norm=0.0)
        step = stepper.step
        stepper.step = lambda loss: (captured.update(g=[p.grad.clone() for p in params]), step(loss))[1]
        loss, count, _ = sft_update(policy, NextTokenCE(), batch, stepper, micro_batch_size=micro)
        return loss, captured["g"]

    l1, g1 = grad_after(None)
    l2, g2 = grad_after(2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):  # two partial sums instead of one: float32 rounding, scaled by the tensor's size
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    cut = encode_examples(policy, module.objective, EXAMPLES, max_length=4)  # only prompt tokens remain
    assert not cut.target_mask.any()
    before = [p.detach().clone() for p in params]
    loss, count, _ = sft_update(policy, NextTokenCE(), cut, Stepper(torch.optim.AdamW(params, lr=1e-2), params))
    assert float(loss) == 0.0 and int(count) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_records_column_mapping_and_bad_files(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1), "extra": i} for i in range(6)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    got = Records(str(jl), prompt_column="q", response_column="a").make(None, 0)
    assert [(g["prompt"], g["response"], g["extra"]) for g in got] == [(r["q"], r["a"], r["extra"]) for r in rows]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert len(Records(str(tmp_path / "d.parquet"), "q", "a").make(4, 0)) == 4
    with pytest.raises(ValueError, match=r"response_column='answer' not in .*columns: \['q', 'a', 'extra'\]"):
        Records(str(jl), "q", "answer").make(None, 0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="path .*empty.jsonl' is empty"):
        Records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="path .*nope.jsonl' is not a file"):
        Records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl' is not readable as json"):
        Records(str(tmp_path / "bad.jsonl")).make(None, 0)
    # the data module: held-out prompts never in training, sizes respected
    data = SFTData([Records(str(jl), "q", "a")], val_size=2, batch_size=2)
    data.setup()
    assert len(data.val_set) == 2 and len(data.train_set) == 4
    assert not {s["prompt"] for s in data.val_set} & {s["prompt"] for s in data.train_set}


def test_task_traces_are_correct_and_skip_the_rl_held_out_problems():
    from text_reasoning.data import Arithmetic, Countdown, KnightsKnaves, ReasoningData
    from text_reasoning.rewards import TaskReward
    from text_reasoning.traces import TaskTraces

    tasks = [Arithmetic(digits=2, ops="+-*"), Countdown(num_numbers=3), KnightsKnaves(num_people=2)]
    traces = TaskTraces(tasks, held_out=30).make(60, 0)
    assert len(traces) == 60 and traces[0]["response"].endswith(f"The answer is {traces[0]['answer']}.")
    assert TaskReward()([t["response"] for t in traces], traces).tolist() == [1.0] * 60
    rl = ReasoningData(tasks, train_size=60, val_size=30, seed=0)
    rl.setup()
    assert not {t["prompt"] for t in traces} & {s["prompt"] for s in rl.val_set}


# ---------------------------------------------------------------------------------------------------------- CLI
TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "32",
        "--model.init_args.policy.init_args.alphabet", " +.0123456789?TWaehinrstw",  # a character tokenizer
        "--model.init_args.lr_schedule", "constant",
        "--model.init_args.sampling.max_new_tokens", "8", "--data.init_args.train_size", "64",
        "--data.init_args.val_size", "8", "--model.init_args.lr", "1e-2", "--model.init_args.warmup_steps", "0",
        "--model.init_args.pack_length", "128"]


def advlab(*args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_advlab_fit_sft_recipe_lowers_the_loss_checkpoints_resumes_and_exports(tmp_path):
    config = str(ROOT / "configs/text_reasoning/sft.yaml")
    out = advlab("fit", "--config", config, *TINY, "--trainer.max_steps", "10", "--evaluate", "true",
                 "--model.init_args.output_dir", "runs/export", cwd=tmp_path)
    assert "held-out accuracy: before" in out.stdout and "(8 problems)" in out.stdout
    run = tmp_path / "runs/lightning_logs/version_0"
    loss = scalars(run, "train/loss")
    assert len(loss) == 10 and sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3, loss
    val = scalars(run, "val/loss")
    assert len(val) == 2 and val[1] < 0.85 * val[0], val
    assert scalars(run, "train/pad_frac")[0] < 0.5  # packed rows
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 10 and state["SFTData"]["batches_served"] == 10
    # resume: the optimiser continues (AdamW's step 10 -> 12) and the data position is restored
    advlab("fit", "--config", config, *TINY, "--trainer.max_steps", "12", "--ckpt_path", str(run / "checkpoints/last.ckpt"),
           "--model.init_args.output_dir", "null", cwd=tmp_path)
    resumed = torch.load(tmp_path / "runs/lightning_logs/version_1/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 12 and resumed["optimizer_states"][0]["state"][0]["step"] == 12
    assert resumed["SFTData"]["batches_served"] == 12
    # the exported folder is a transformers model with the trained weights
    from common.models import Pretrained

    exported, _ = Pretrained(str(tmp_path / "runs/export")).load()
    key = "model.embed_tokens.weight"
    trained = state["state_dict"]["policy.model." + key]
    torch.testing.assert_close(exported.state_dict()[key], trained)


def test_advlab_sft_bad_data_path_fails_fast_naming_it(tmp_path):
    """A missing data file fails at start-up naming the argument and the path. Bounded by the CPU seconds the failing
    process used (user + sys, from the kernel's accounting), which a loaded shared machine does not inflate as it
    does wall time: importing torch, transformers and Lightning is ~6 s of it, a hub retry loop would be ~50 s."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = advlab("fit", "--config", str(ROOT / "configs/text_reasoning/sft.yaml"), "--model.init_args.policy",
                  "common.models.TinyLlama", "--model.init_args.policy.init_args.alphabet", "0123456789",
                  "--model.init_args.policy.init_args.hidden_size", "16", "--data.init_args.sources",
                  '[{"class_path": "common.sft.Records", "init_args": {"path": "missing/train.jsonl"}}]', cwd=tmp_path,
                  check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode != 0
    assert "Records: path 'missing/train.jsonl' is not a file" in proc.stderr  # the argument and the path
    assert cpu < 10, f"the failing run used {cpu:.1f} s of CPU"
    assert not list(tmp_path.glob("runs/lightning_logs/version_*"))


def test_gradient_checkpointing_and_chat_template_options_reach_the_policy():
    """The CausalLMPolicy options pass through: the same loss and gradient with activation checkpointing, and the
    template kwargs / override change the prompt text exactly as they do for the RL policy."""
    examples = EXAMPLES[:3]
    grads = []
    for ckpt in (False, True):
        m = SFTModule(policy=TinyLlama(hidden_size=32, num_layers=2, seed=0), gradient_checkpointing=ckpt)
        b = encode_examples(m.policy, m.objective, examples)
        total, count = m.objective(m.policy, b)
        (total / count).backward()
        grads.append((total.detach(), [p.grad.clone() for p in m.policy.model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):  # recomputation repeats the same float32 ops
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    m = SFTModule(policy=TinyLlama(hidden_size=32, num_layers=1, seed=0), chat_template=template)
    b = encode_examples(m.policy, m.objective, examples[:1])
    text = m.policy.tokenizer.decode(b.input_ids[0][~b.target_mask[0]].tolist())
    assert text == "[What is 2 + 3?]>" and m.policy.prompt_texts(examples[:1]) == [text]
    with pytest.raises(ValueError, match="chat_template belong to the policy's own arguments"):
        SFTModule(policy=m.policy, chat_template=template)
