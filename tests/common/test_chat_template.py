"""Chat-template options of CausalLMPolicy (common/policies/causal_lm.py) with the bundled SmolLM2 tokenizer:
template variables reach the template, an override (string or file) replaces the tokenizer's own."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest

from common.models import PolicySource, TinyLlama, load_tokenizer
from common.policies.causal_lm import CausalLMPolicy
from helpers import DIGITS

ROOT = Path(__file__).resolve().parents[2]

# reads a custom variable `persona` and the Qwen3-style `enable_thinking`, which SmolLM2's own template ignores
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if persona is defined %} [{{ persona }}]"
            "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")


@functools.lru_cache(maxsize=None)
def _loaded(path):
    return TinyLlama(hidden_size=16, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0).load()[0], load_tokenizer(path)


class SmolTokenizer(PolicySource):
    """A tiny model with the bundled SmolLM2 tokenizer (only the prompt side is exercised here); each load is a
    fresh copy of one loaded pair, as a real load would be."""

    def __init__(self, path):
        self.path = path

    def load(self):
        return copy.deepcopy(_loaded(self.path))


def test_default_is_the_tokenizers_own_template(bundled_path):
    tok = load_tokenizer(bundled_path)
    pol = CausalLMPolicy(SmolTokenizer(bundled_path), instruction=" Answer.")
    expected = tok.apply_chat_template([{"role": "user", "content": "2 + 3? Answer."}], tokenize=False,
                                       add_generation_prompt=True)
    assert pol.prompt_texts([{"prompt": "2 + 3?"}]) == [expected]
    assert "<|im_start|>assistant" in expected  # SmolLM2's ChatML


def test_override_replaces_the_template_and_kwargs_reach_it(bundled_path, tmp_path):
    pol = CausalLMPolicy(SmolTokenizer(bundled_path), chat_template=TEMPLATE,
                         chat_template_kwargs={"persona": "terse", "enable_thinking": False})
    assert pol.prompt_texts([{"prompt": "2 + 3?"}]) == ["<|user|>2 + 3? [terse]\n<|assistant|><think></think>"]
    ids, mask = pol.encode([{"prompt": "2 + 3?"}])
    assert pol.tokenizer.decode(ids[0][mask[0]]) == "<|user|>2 + 3? [terse]\n<|assistant|><think></think>"
    # from a file, with the system prompt, without variables: the template's defaults
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    pol = CausalLMPolicy(SmolTokenizer(bundled_path), chat_template=str(path), system_prompt="Be brief.")
    assert pol.prompt_texts([{"prompt": "hi"}]) == ["<|system|>Be brief.\n<|user|>hi\n<|assistant|>"]
    # the policy's own tokenizer carries the override (an export or SFT of this policy uses it); a fresh load does not
    assert pol.tokenizer.chat_template == TEMPLATE
    assert "<|im_start|>" in load_tokenizer(bundled_path).chat_template


def test_a_tokenizer_only_caller_still_gets_the_stock_template(bundled_path):
    """retrieval/sft.py borrows prompt_texts with an object holding only tokenizer, system_prompt and instruction."""
    from types import SimpleNamespace

    tok = load_tokenizer(bundled_path)
    duck = SimpleNamespace(tokenizer=tok, system_prompt=None, instruction="")
    expected = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert CausalLMPolicy.prompt_texts(duck, [{"prompt": "hi"}]) == [expected]


def test_kwargs_reach_the_tokenizers_own_template(bundled_path):
    """Variables also reach the stock template (a tokenizer whose template reads one): enable_thinking as Qwen3."""
    class Thinking(SmolTokenizer):
        def load(self):
            model, tok = super().load()
            tok.chat_template = TEMPLATE
            return model, tok

    on = CausalLMPolicy(Thinking(bundled_path), chat_template_kwargs={"enable_thinking": True})
    off = CausalLMPolicy(Thinking(bundled_path), chat_template_kwargs={"enable_thinking": False})
    assert on.prompt_texts([{"prompt": "x"}]) == ["<|user|>x\n<|assistant|>"]
    assert off.prompt_texts([{"prompt": "x"}]) == ["<|user|>x\n<|assistant|><think></think>"]


def test_bad_options_name_the_argument(bundled_path, tmp_path):
    with pytest.raises(ValueError, match="chat_template: 'no/such/template.jinja' is neither a file nor a Jinja"):
        CausalLMPolicy(SmolTokenizer(bundled_path), chat_template="no/such/template.jinja")
    with pytest.raises(ValueError, match="chat_template / chat_template_kwargs: the chat template does not render"):
        CausalLMPolicy(SmolTokenizer(bundled_path), chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match="chat_template_kwargs: \\['tokenize'\\] are apply_chat_template's own"):
        CausalLMPolicy(SmolTokenizer(bundled_path), chat_template_kwargs={"tokenize": True})
    empty = tmp_path / "empty.jinja"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no Jinja template"):
        CausalLMPolicy(SmolTokenizer(bundled_path), chat_template=str(empty))
