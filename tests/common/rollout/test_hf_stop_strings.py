"""HFBackend's stop strings: one StopStringCriteria per (tokenizer, stops), reused across generate calls, stopping
where transformers' own ``stop_strings=`` path stops (greedy decoding of the bundled SmolLM2 with its BPE
tokenizer, which StopStringCriteria needs: a character tokenizer without byte-level tokens is not supported)."""

from __future__ import annotations

import torch

from common.models import BundledSmolLM2
from common.rollout.base import Sampling
from common.rollout.hf import HFBackend


def test_cached_stop_criterion_stops_where_transformers_stops():
    model, tok = BundledSmolLM2().load()
    enc = tok(["Count: 1, 2, 3,", "The tool is <tool>calc", "Hello"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    backend = HFBackend(share_prefill=False)
    for stop in (",", " 5", "</tool>"):
        sampling = Sampling(max_new_tokens=12, stop_strings=(stop,))
        ours = [backend.generate(model, tok, ids, mask, 1, sampling, greedy=True) for _ in range(2)]
        assert ours[0].completions == ours[1].completions
        assert len(backend._stop_criteria) >= 1 and backend.stop_criterion(tok, (stop,)) is backend.stop_criterion(tok, (stop,))
        with torch.no_grad():  # the reference: transformers builds its own criterion from stop_strings=
            ref = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                                 stop_strings=[stop], tokenizer=tok, pad_token_id=tok.pad_token_id,
                                 eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id)
        for row, text in enumerate(ours[0].completions):
            full = tok.decode(ref[row, ids.shape[1]:], skip_special_tokens=True)
            cut = full[: full.index(stop) + len(stop)] if stop in full else full
            assert text == cut, (stop, row, text, full)
