"""SFT warm start: labels cover only the answer, and a tiny real model learns to write the format."""

import pytest
import torch

from common.models import TinyLlama
from retrieval.rewards import parse
from retrieval.sft import sft_batch, sft_warm_start, teacher_answer
from retrieval.tasks import catalogue, recommendation


@pytest.mark.slow
def test_teacher_answer_and_labels_and_a_tiny_model_learns_the_format():
    sample = recommendation(1, seed=0, cat=catalogue(50, seed=0), pool_size=8, num_hard=2, max_slate=4, rank_k=2)[0]  # a short prompt
    answer = teacher_answer(sample)
    order = sorted(range(8), key=lambda c: -sample["first_stage"][c])  # plain reference: the first stage's order
    top = [c + 1 for c in order[:4]]
    assert answer == f"<slate> {' '.join(map(str, top))} </slate> <rank> {top[0]} {top[1]} </rank>"
    model, tok = TinyLlama(hidden_size=64, num_layers=2, seed=0).load()
    ids, att, lab = sft_batch(tok, [sample["prompt"]], [answer])
    n_answer = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert int((lab != -100).sum()) == n_answer and lab[0, -1] == tok.eos_token_id
    torch.manual_seed(0)
    losses = sft_warm_start(model, tok, [sample], steps=80, batch_size=1, lr=3e-3)
    assert losses[-1] < 0.1 * losses[0]
    prompt = ids[:, : ids.shape[1] - n_answer]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_answer + 2, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert parse(text, 8, 4, 2).ok, text
