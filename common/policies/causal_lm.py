"""CausalLMPolicy: a Hugging Face causal LM as a Policy (chat-templated prompts in, token completions out).

Everything the loop needs from a language model lives here: prompt encoding with the chat template (written once
for every LM domain), generation through a backend (HF ``generate`` or vLLM), log-probs and entropies of the
completion tokens by a chunked selective log-softmax (never a float32 ``(B, T, V)`` log-softmax), the shared-prompt
key/value cache in the update, optional activation checkpointing of the decoder layers, LoRA (the reference is the
adapter switched off) and weight sync to the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.logprobs import token_logprobs
from common.models import LoRA, PolicySource
from common.policies.base import Policy, PolicyOutput, mix_weights_
from common.rollout.base import RolloutBackend, Sampling
from common.rollout.hf import HFBackend


# apply_chat_template's own arguments: a template variable of the same name would be taken as one of them
_TEMPLATE_ARGS = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                            "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"})


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict of template variables; keys that are apply_chat_template's own arguments
    are refused (they would not reach the template)."""
    kwargs = dict(kwargs or {})
    bad = sorted(k for k in kwargs if not isinstance(k, str) or k in _TEMPLATE_ARGS)
    if bad:
        raise ValueError(f"chat_template_kwargs: {bad} are apply_chat_template's own arguments, not template variables "
                         "(expected names the template reads, e.g. enable_thinking)")
    return kwargs


def read_template(template: str | None) -> str | None:
    """``chat_template``: a Jinja string (it contains ``{{`` or ``{%``) or the path of a file holding one."""
    if template is None:
        return None
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"chat_template must be a Jinja template string or a file path, got {template!r}")
    if "{{" in template or "{%" in template:
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template: {template!r} is neither a file nor a Jinja template (no '{{{{' or '{{%'); "
                         "expected the path of a template file or the template itself")
    text = path.read_text(encoding="utf-8")
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"chat_template: the file {str(path)!r} holds no Jinja template (no '{{{{' or '{{%')")
    return text


class CausalLMPolicy(Policy):
    """A causal LM with its tokenizer, sampled through ``backend``.

    Args:
        source: where the weights come from (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``).
        sampling: sampling options of training rollouts; log-probs are computed at ``sampling.temperature``.
        backend: generation backend (default HF ``generate``).
        lora: LoRA adapters (None = full fine-tuning).
        system_prompt: optional system message placed before every prompt.
        instruction: text appended to every prompt (e.g. "Put the final answer in \\boxed{}.").
        share_prompt: in the update, run each group's prompt once and expand its key/value cache to the group's
            rows (exact; about G times fewer prompt tokens). False = one plain forward per row.
        logprob_chunk_size: rows per chunk of the chunked log-softmax.
        chat_template_kwargs: extra variables for the chat template, passed to ``apply_chat_template`` (e.g.
            ``{enable_thinking: false}`` for Qwen3-style templates); the template reads them by name.
        chat_template: a Jinja chat template (a string containing ``{{`` or ``{%``) or the path of a file holding one,
            used instead of the tokenizer's own (None = the tokenizer's).
        gradient_checkpointing: in a forward that builds a graph, keep only each decoder layer's inputs and
            recompute the layer in the backward (Chen et al. 2016, arXiv 1604.06174): activation memory of about
            one layer instead of all of them, for about one more forward. Exact, with the shared-prompt cache too
            (see :func:`checkpointed_layers`).
        pack: run each forward padding-free: the micro-batch's prompts (each group's once under ``share_prompt``)
            and completions concatenated into one packed row with position ids restarting per sequence and a
            block-diagonal causal mask (:meth:`packed_hidden`; verl's remove-padding). Exact against the padded
            path; pays where rows are many and lengths mixed. Its attention is N² over the packed row, so bound N
            with the loop's ``micro_batch_tokens``. Batches it cannot reproduce exactly take the padded path.
    """

    provides = ("prompt_ids", "prompt_mask", "truncated", "behaviour_logprobs")

    def __init__(self, source: PolicySource, sampling: Sampling | None = None, backend: RolloutBackend | None = None,
                 lora: LoRA | None = None, system_prompt: str | None = None, instruction: str = "",
                 share_prompt: bool = True, logprob_chunk_size: int = 1024, gradient_checkpointing: bool = False,
                 *, chat_template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None, pack: bool = False):
        super().__init__()
        self.source, self.lora = source, lora
        self.sampling = sampling if sampling is not None else Sampling()
        self.backend = backend if backend is not None else HFBackend()
        self.system_prompt, self.instruction = system_prompt, instruction
        self.share_prompt, self.logprob_chunk_size = share_prompt, logprob_chunk_size
        self.gradient_checkpointing, self.pack = gradient_checkpointing, pack
        self.model, self.tokenizer = source.load()
        self.chat_template_kwargs, self.chat_template = check_template_kwargs(chat_template_kwargs), read_template(chat_template)
        if self.chat_template is not None:  # this policy's own tokenizer: an export or an SFT of it uses the override too
            self.tokenizer.chat_template = self.chat_template
        if self.chat_template is not None or self.chat_template_kwargs:
            try:  # a template that does not render fails here, naming the option, not at the first step
                self.prompt_texts([{"prompt": "1 + 1"}])
            except Exception as err:  # jinja2's TemplateError, or what the template raises itself
                raise ValueError(f"chat_template / chat_template_kwargs: the chat template does not render a user "
                                 f"message: {type(err).__name__}: {str(err)[:300]}") from None
        # Dropout stays off (eval mode) throughout: the ratio π/π_old must be exactly 1 on the first pass, and
        # sampling, old and reference log-probs must see the same function.
        self.model.eval()
        if lora is not None:
            self.model = lora.apply(self.model)
        self.reference: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def horizon(self) -> int:  # T_max, the generation budget (Dr. GRPO's constant normaliser)
        return self.sampling.max_new_tokens

    # ------------------------------------------------------------------ rollout
    def encode(self, samples: Sequence[dict], key: str = "prompt") -> tuple[Tensor, Tensor]:
        """Chat-template and left-pad ``sample[key]`` (+ the instruction). Shapes: -> ids (P, L) long, mask (P, L) bool."""
        enc = self.tokenizer(self.prompt_texts(samples, key), return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def prompt_texts(self, samples: Sequence[dict], key: str = "prompt") -> list[str]:
        """The chat-templated text of every sample's prompt, ending with the assistant's generation prompt."""
        # getattr: callers that borrow this method with a tokenizer-only ``self`` (retrieval/sft.py) set no options
        template_kwargs = dict(getattr(self, "chat_template_kwargs", None) or {},
                               chat_template=getattr(self, "chat_template", None))
        texts = []
        for s in samples:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": s[key] + self.instruction})
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                            **template_kwargs))
        return texts

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, n: int, *, greedy: bool = False,
                 max_new_tokens: int | None = None) -> RolloutBatch:
        """``n`` completions of every (left-padded) token prompt, through the backend."""
        sampling = self.sampling if max_new_tokens is None else dataclasses.replace(self.sampling, max_new_tokens=max_new_tokens)
        return self.backend.generate(self.model, self.tokenizer, prompt_ids, prompt_mask, n, sampling, greedy=greedy)

    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        ids, mask = self.encode(prompts)
        batch = self.generate(ids, mask, n, greedy=greedy)
        return batch.replace(samples=[dict(s) for s in prompts for _ in range(n)])

    def decode(self, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
        return self.tokenizer.batch_decode(completion_ids.masked_fill(~completion_mask, self.tokenizer.pad_token_id),
                                           skip_special_tokens=True)

    # ------------------------------------------------------------------ log-probs
    def enable_reference(self) -> None:
        if self.lora is None and self.reference is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def refresh_reference(self, alpha: float = 1.0, *, dry_run: bool = False) -> None:
        """ref <- alpha·θ + (1 − alpha)·ref (see :meth:`Policy.refresh_reference`). Under LoRA the reference is the
        base model with the adapter off, which cannot move without merging the adapter: refused (as TRL refuses
        ``sync_ref_model`` with PEFT)."""
        if self.lora is not None:
            raise ValueError("a reference refresh needs a separate reference model, but with `lora` set the reference is "
                             "the base model with the adapter switched off; train without lora (full fine-tuning) or "
                             "remove the refresh from `methods` (TRL refuses sync_ref_model with PEFT too)")
        if self.reference is None:
            raise RuntimeError("CausalLMPolicy: refresh_reference() called before enable_reference()")
        if not dry_run:
            mix_weights_(self.reference, self.model, alpha)

    def weights(self, reference: bool = False):
        """(model, context): the network to run, and the context it runs in (the adapter off for a LoRA reference)."""
        if not reference:
            return self.model, nullcontext()
        if self.lora is not None:
            return self.model, self.model.disable_adapter()
        if self.reference is None:
            raise RuntimeError("CausalLMPolicy: reference log-probs asked for before enable_reference()")
        return self.reference, nullcontext()

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """Log-probs and entropies of the completion tokens at the sampling temperature, with logits only at
        completion positions. Shapes: -> (B, T), (B, T) float32, 0 off the mask; hidden (B, T, H) if asked for."""
        model, context = self.weights(reference)
        checkpointing = checkpointed_layers(model) if self.gradient_checkpointing and torch.is_grad_enabled() else nullcontext()
        with context, checkpointing:
            h = self.completion_hidden(model, batch)  # (B, T, H): hidden states that predict the completion tokens
            m = batch.completion_mask  # (B, T)
            head = model.get_output_embeddings()
            lp, ent = token_logprobs(h[m], head.weight, batch.completion_ids[m], bias=head.bias,
                                     temperature=self.sampling.temperature, chunk_size=self.logprob_chunk_size)  # (N,), (N,)
        logprobs = torch.zeros(m.shape, device=lp.device, dtype=lp.dtype).masked_scatter(m, lp)
        entropy = torch.zeros(m.shape, device=ent.device, dtype=ent.dtype).masked_scatter(m, ent)
        return PolicyOutput(logprobs, entropy, h if hidden else None)

    def full_logprobs(self, hidden: Tensor, reference: bool = False, teacher: nn.Module | None = None) -> Tensor:
        """log π over the whole vocabulary from hidden states (N, H) -> (N, V) float32 (distillation losses)."""
        model = teacher if teacher is not None else self.weights(reference)[0]
        head = model.get_output_embeddings()
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float() / self.sampling.temperature
        return torch.log_softmax(logits, dim=-1)

    def completion_hidden(self, model: nn.Module, batch: RolloutBatch) -> Tensor:
        """Last-layer hidden states at the positions that predict the completion tokens. Shapes: -> (B, T, H).

        The G rows of a group share one prompt, so the prompt is run once per group and its key/value cache
        is expanded to the group's rows (gradients flow through the expansion, so this is exact, not an
        approximation); only the completion tokens are run per row. A batch whose group rows differ in their
        prompts takes the plain path: one forward over prompt + completion for every row.
        """
        if self.pack and packable(batch):
            return self.packed_hidden(model, batch)
        decoder = model.get_decoder()
        P = batch.prompt_ids.shape[1]
        attn = batch.attention_mask.long()  # (B, P + T)
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # as generate() builds them for left padding
        first, inverse = self.shared_prompts(batch)
        if first is None:
            hidden = decoder(input_ids=batch.input_ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
            return hidden[:, P - 1 : -1]
        from transformers import DynamicCache

        cache = DynamicCache()
        prompt = decoder(input_ids=batch.prompt_ids[first], attention_mask=attn[first, :P],
                         position_ids=position_ids[first, :P], past_key_values=cache, use_cache=True)  # (U, P, H)
        cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...) rows of the shared prompt cache
        completion = decoder(input_ids=batch.completion_ids, attention_mask=attn, position_ids=position_ids[:, P:],
                             past_key_values=cache, use_cache=True).last_hidden_state  # (B, T, H)
        last_prompt = prompt.last_hidden_state[inverse, -1:]  # (B, 1, H) predicts the first completion token
        return torch.cat([last_prompt, completion[:, :-1]], dim=1)

    def shared_prompts(self, batch: RolloutBatch) -> tuple[Tensor | None, Tensor]:
        """(first (U,) a row of each group, inverse (B,) each row's group) when ``share_prompt`` is on and the G rows
        of every group carry one prompt; (None, arange(B)) otherwise (every row its own prompt)."""
        groups, inverse = torch.unique(batch.group_ids, return_inverse=True)  # (U,), (B,)
        first = torch.full_like(groups, batch.batch_size).scatter_reduce_(
            0, inverse, torch.arange(batch.batch_size, device=inverse.device), reduce="amin")  # (U,) a row per group
        shared = self.share_prompt and len(groups) < batch.batch_size and bool(
            (batch.prompt_ids == batch.prompt_ids[first][inverse]).all())
        return (first, inverse) if shared else (None, torch.arange(batch.batch_size, device=inverse.device))

    def packed_hidden(self, model: nn.Module, batch: RolloutBatch) -> Tensor:
        """:meth:`completion_hidden` without padding: the micro-batch's tokens in one packed row (``pack=True``).

        The row holds every prompt once (each group's once under ``share_prompt``), then every row's completion,
        padding dropped: N = Σ prompt lengths + Σ completion lengths tokens instead of B x (P + T). Position ids
        restart at every sequence (a completion continues its prompt's), and a block-diagonal causal mask lets a
        token see only the earlier tokens of its own segment and, for a completion, its prompt: the attention of
        the padded path, so the hidden states are the same up to float32 rounding (verl's remove-padding, done with
        an explicit 4D mask that SDPA and eager attention accept on any device). Shapes: -> (B, T, H).
        """
        pm, m = batch.prompt_mask, batch.completion_mask  # (B, P), (B, T)
        (B, P), T = pm.shape, m.shape[1]
        first, owner = self.shared_prompts(batch)  # owner (B,): the prompt segment each row continues
        rows = torch.arange(B, device=m.device) if first is None else first  # (U,) the rows whose prompts are packed
        U, upm = rows.numel(), pm[rows]  # (U, P)
        n_p = int(upm.sum())
        prompt_at = torch.full((U, P), -1, device=m.device).masked_scatter(upm, torch.arange(n_p, device=m.device))
        completion_at = torch.full((B, T), -1, device=m.device).masked_scatter(
            m, torch.arange(n_p, n_p + int(m.sum()), device=m.device))  # (B, T) index in the packed row, −1 = padding
        ids = torch.cat([batch.prompt_ids[rows][upm], batch.completion_ids[m]])  # (N,)
        prompt_pos = upm.long().cumsum(1) - 1  # (U, P) as the padded path's (attention-mask cumsum) for left padding
        completion_pos = upm.long().sum(1)[owner, None] + m.long().cumsum(1) - 1  # (B, T)
        positions = torch.cat([prompt_pos[upm], completion_pos[m]])  # (N,)
        segment = torch.cat([torch.arange(U, device=m.device)[:, None].expand(U, P)[upm],
                             (U + torch.arange(B, device=m.device))[:, None].expand(B, T)[m]])  # (N,)
        sees = torch.cat([torch.arange(U, device=m.device), owner])[segment]  # (N,) the prompt segment a token sees
        k = torch.arange(ids.numel(), device=m.device)  # (N,)
        allowed = (k[None, :] <= k[:, None]) & ((segment[None, :] == segment[:, None]) | (segment[None, :] == sees[:, None]))
        hidden = model.get_decoder()(input_ids=ids[None], position_ids=positions[None],
                                     attention_mask=attention_bias(model, allowed)).last_hidden_state[0]  # (N, H)
        predictor = torch.cat([prompt_at[owner, -1:], completion_at[:, :-1]], dim=1)  # (B, T) the token before each
        return hidden[predictor.clamp(min=0)].masked_fill(~m[..., None], 0.0)  # (B, T, H)

    # ------------------------------------------------------------------ engine
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sync(self) -> None:
        self.backend.sync_weights(self.model)

    def sampler_logprobs(self, batch: RolloutBatch) -> Tensor:
        """The backend's teacher-forced log-probs of the batch (temperature 1: compare with a policy sampling at 1)."""
        return self.backend.score(self.model, self.tokenizer, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                  batch.completion_mask)

    def extra_repr(self) -> str:
        return f"source={type(self.source).__name__}, lora={self.lora is not None}, backend={type(self.backend).__name__}"


def packable(batch: RolloutBatch) -> bool:
    """Packing reproduces the padded path where every hidden state it needs is a kept token's: prompts left-padded
    with their last column real, completions right-padded without holes (what generation leaves)."""
    m = batch.completion_mask  # (B, T)
    return batch.prompt_ids is not None and bool(batch.prompt_mask[:, -1].all()) and not bool((m[:, 1:] & ~m[:, :-1]).any())


def attention_bias(model: nn.Module, allowed: Tensor) -> Tensor:
    """An explicit (1, 1, N, N) attention mask from ``allowed`` (N, N) bool (query, key), as the model's attention
    takes it: bool for SDPA (True = attend), additive 0 / −inf-like for eager attention; transformers passes a 4D
    mask through unchanged."""
    kind = getattr(model.config, "_attn_implementation", "eager")
    if kind == "sdpa":
        return allowed[None, None]
    if kind == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[None, None]
    raise ValueError(f"pack: the model's attention implementation {kind!r} takes no explicit 4D mask here; expected "
                     "'sdpa' or 'eager' (load the model with attn_implementation='sdpa') or pack=False")


def _cache_state(cache) -> tuple[list, list[dict]]:
    """A shallow snapshot of a transformers ``Cache``: its layer objects and each one's attributes (tensor refs)."""
    layers = list(cache.layers)
    return layers, [dict(layer.__dict__) for layer in layers]


def _restore_cache(cache, state: tuple[list, list[dict]]) -> None:
    layers, attrs = state
    cache.layers[:] = layers
    for layer, a in zip(layers, attrs):
        layer.__dict__.clear()
        layer.__dict__.update(a)


def _checkpointed(forward, *args, **kwargs):
    """``forward(*args, **kwargs)`` under non-reentrant activation checkpointing, replay-safe for a KV cache.

    A decoder layer appends its keys/values to ``past_key_values`` as it runs; the backward's recompute runs it
    again, which would append them a second time (and attend over prefix + new + new). The cache is therefore
    put back as this layer's first call found it before every replay, so the recompute sees exactly what the
    first call saw (torch's determinism check would also refuse a replay whose tensors differ in shape).
    """
    cache = kwargs.get("past_key_values")
    before: list = []

    def run(*a, **kw):
        if cache is not None:
            if before:
                _restore_cache(cache, before[0])  # a replay in the backward
            else:
                before.append(_cache_state(cache))
        return forward(*a, **kw)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[None]:
    """Run every decoder layer of ``model`` (transformers' ``GradientCheckpointingLayer``s) under activation
    checkpointing while the context is open.

    transformers' own ``gradient_checkpointing_enable`` is not used: it acts only in training mode (the policy
    stays in eval mode, dropout off, so π/π_old is exactly 1 on the first pass) and it drops the key/value cache,
    which the shared-prompt path needs. Non-reentrant checkpointing also gives LoRA adapters their gradients when
    the frozen embeddings' output does not require grad.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no transformers decoder layers "
                         "(GradientCheckpointingLayer) to checkpoint; expected a transformers causal LM")
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


__all__ = ["CausalLMPolicy", "checkpointed_layers"]
