"""A small bidirectional transformer with a MASK token: the masked-diffusion LM (LLaDA family) of the dllm domain.

The network is a transformers LLaMA stack built from a config whose attention is *not causal*: every position
attends to every non-padding position. transformers' own switch (``config.is_causal = False``) is not enough on
its own: when the bidirectional mask has no padding the mask builder returns None and SDPA then falls back to the
attention module's ``is_causal = True``. So :class:`BidirectionalLM` always passes a full 4-D additive mask
(B, 1, L, L) — what transformers returns as-is — and also sets the config and module flags; a test checks that
an early position's output changes when a later token changes.

LLaDA (Nie et al. 2025, arXiv 2502.09992) predicts x_i at position i (``shift=False``); a model adapted from an
autoregressive checkpoint (Dream, Ye et al. 2025, arXiv 2508.15487) predicts x_i at position i − 1 (``shift=True``):
``logits[:, i] := logits[:, i − 1]``.

Masked-diffusion SFT (LLaDA SFT, domains.md §0.5): t = (1 − 10⁻³)·u + 10⁻³, u ~ U(0, 1) per sequence; each response
token is masked independently with probability t (the prompt never); loss Σ_{masked i} CE_i / t divided by the
number of response tokens in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.models import PolicySource, char_tokenizer

MASK_TOKEN = "<mask>"


def dllm_tokenizer(alphabet: str):
    """``common.models.char_tokenizer`` over ``alphabet`` plus a ``<mask>`` special token (its id is
    ``tokenizer.mask_token_id``, the last id)."""
    tok = char_tokenizer(alphabet)
    tok.add_special_tokens({"mask_token": MASK_TOKEN})
    return tok


def bidirectional_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive 4-D mask letting every query attend to every valid key. Shapes: (B, L) bool -> (B, 1, L, L)."""
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    full = keys.expand(-1, 1, attention_mask.shape[1], -1)  # (B, 1, L, L)
    return torch.zeros(full.shape, dtype=dtype, device=attention_mask.device).masked_fill(~full, torch.finfo(dtype).min)


class BidirectionalLM(nn.Module):
    """A LLaMA stack with full (non-causal) attention: ``forward(ids, mask) -> logits``.

    Args:
        model: a ``LlamaForCausalLM`` (or any HF decoder LM whose attention takes a 4-D additive mask).
        shift: Dream's shift (module docstring): position i's logits predict token i + 1.
    """

    def __init__(self, model: nn.Module, shift: bool = False):
        super().__init__()
        self.model, self.shift = model, shift
        model.config.is_causal = False
        for m in model.modules():
            if hasattr(m, "is_causal"):
                m.is_causal = False

    @property
    def config(self):
        return self.model.config

    @property
    def head(self) -> nn.Module:  # the output projection (H -> V)
        return self.model.get_output_embeddings()

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Last-layer hidden states that predict each position's token (after Dream's shift if set).
        ``causal`` restricts attention to earlier keys (a check against the autoregressive model adapted from).
        Shapes: ids (B, L) long, mask (B, L) bool (left padding) -> (B, L, H)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        emb = self.model.get_input_embeddings()
        mask4 = bidirectional_mask(attention_mask, emb.weight.dtype)  # (B, 1, L, L)
        if causal:
            L_ = input_ids.shape[1]
            later = torch.ones(L_, L_, dtype=torch.bool, device=input_ids.device).triu(1)  # (L, L): key after query
            mask4 = mask4.masked_fill(later, torch.finfo(mask4.dtype).min)
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L): 0 at the first real token
        h = self.model.get_decoder()(input_ids=input_ids, attention_mask=mask4, position_ids=position_ids,
                                     use_cache=False).last_hidden_state  # (B, L, H)
        if self.shift:  # Dream: token i is predicted at position i − 1 (position 0 keeps its own state)
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        return h

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Logits of every position. Shapes: ids (B, L) long, mask (B, L) bool (left padding) -> (B, L, V)."""
        return self.head(self.hidden(input_ids, attention_mask, causal))


class TinyDiffusionLM(PolicySource):
    """A randomly initialised bidirectional LLaMA with a char-level tokenizer and a MASK token (tests and CPU
    reproductions; domains.md §1(e): 4 layers, d = 128, 4 heads). ``load() -> (BidirectionalLM, tokenizer)``.

    Args:
        alphabet: the characters of the task (``dllm_tokenizer``).
        hidden_size, num_layers, num_heads: the stack's size.
        shift: Dream's shift (module docstring).
        checkpoint: optional safetensors file of a trained ``BidirectionalLM`` state dict (e.g. after SFT).
        seed: initialisation seed.
    """

    def __init__(self, alphabet: str = "0123456789=#", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 shift: bool = False, checkpoint: str | None = None, seed: int = 0):
        if hidden_size % num_heads or hidden_size < 1 or num_layers < 1:
            raise ValueError(f"TinyDiffusionLM needs num_layers >= 1 and hidden_size divisible by num_heads, got "
                             f"hidden_size={hidden_size}, num_layers={num_layers}, num_heads={num_heads}")
        self.alphabet, self.hidden_size, self.num_layers, self.num_heads = alphabet, hidden_size, num_layers, num_heads
        self.shift, self.checkpoint, self.seed = shift, checkpoint, seed

    def load(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = dllm_tokenizer(self.alphabet)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            max_position_embeddings=512, tie_word_embeddings=True, attn_implementation="sdpa",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = BidirectionalLM(LlamaForCausalLM(cfg), shift=self.shift)
        if self.checkpoint:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(self.checkpoint))
        return model, tok


SMOLLM2_DLLM_TEMPLATE = (  # SmolLM2's ChatML without the default system prompt; the policy prepends BOS = <|im_start|>
    "{% for m in messages %}{% if not loop.first %}{{ '<|im_start|>' }}{% endif %}"
    "{{ m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def add_mask_token(model: nn.Module, tokenizer) -> int:
    """Add ``<mask>`` to ``tokenizer`` and one embedding row for it to ``model`` (a HF causal LM), initialised to the
    mean of the existing input embeddings; a tied output head grows with it (its MASK row is the same vector, and
    the sampler and estimator remove the MASK logit anyway). Every other weight is unchanged. Returns the MASK id."""
    if tokenizer.mask_token_id is not None:
        raise ValueError(f"add_mask_token: the tokenizer already has a mask token {tokenizer.mask_token!r}")
    old = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_id = int(tokenizer.mask_token_id)
    if mask_id != old or len(tokenizer) != old + 1:
        raise ValueError(f"add_mask_token: expected the mask token to be the new id {old}, got {mask_id} "
                         f"(tokenizer length {len(tokenizer)}, embedding rows {old})")
    with torch.no_grad():
        mean = model.get_input_embeddings().weight.mean(0)  # (H,)
        model.resize_token_embeddings(old + 1, mean_resizing=False)
        model.get_input_embeddings().weight[mask_id] = mean
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.weight[mask_id] = mean  # an untied head: the same sensible row
    return mask_id


class SmolLM2DiffusionLM(PolicySource):
    """The bundled SmolLM2-135M-Instruct adapted into a masked-diffusion LM, as Dream (Ye et al. 2025, arXiv
    2508.15487) adapts an autoregressive checkpoint: the same LLaMA weights with bidirectional attention, a new MASK
    token (``add_mask_token``: one embedding row, the mean embedding; the tied head grows with it) and Dream's shift
    (token i predicted at position i − 1, so position i − 1's autoregressive head is reused as is). Masked-diffusion
    SFT (``configs/diffusion/sft_smollm2.yaml``) then trains it; ``checkpoint`` loads the result.

    ``load() -> (BidirectionalLM, tokenizer)``; the tokenizer is SmolLM2's plus ``<mask>`` (id 49152), with SmolLM2's
    ChatML template minus its default system prompt (``SMOLLM2_DLLM_TEMPLATE``: the policy prepends BOS =
    ``<|im_start|>``), EOS ``<|im_end|>``.

    Args:
        checkpoint: a ``model.safetensors`` of an adapted ``BidirectionalLM``'s state dict (what ``SFTModule``'s
            ``output_dir`` holds), or the folder holding it; None = the adapted weights before any training.
        shift: Dream's shift (True for a model adapted from an autoregressive checkpoint).
        dtype: "float32" or "bfloat16".
    """

    def __init__(self, checkpoint: str | None = None, shift: bool = True, dtype: str = "float32"):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"SmolLM2DiffusionLM: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if checkpoint is not None:
            from pathlib import Path

            path = Path(checkpoint)
            path = path / "model.safetensors" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"SmolLM2DiffusionLM: checkpoint {checkpoint!r} is not a model.safetensors "
                                        f"file or a folder holding one (resolved: {path.resolve()})")
            checkpoint = str(path)
        self.checkpoint, self.shift, self.dtype = checkpoint, shift, dtype

    def load(self):
        from transformers import AutoModelForCausalLM

        from common.models import bundled_smollm2_path, load_tokenizer

        path = bundled_smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = load_tokenizer(path)
        add_mask_token(model, tok)
        tok.chat_template = SMOLLM2_DLLM_TEMPLATE
        lm = BidirectionalLM(model, shift=self.shift)
        if self.checkpoint:
            from safetensors.torch import load_file

            lm.load_state_dict(load_file(self.checkpoint))
        return lm.to(getattr(torch, self.dtype)), tok


def masked_diffusion_sft_loss(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                              response_mask: Tensor, mask_id: int, generator: torch.Generator | None = None) -> Tensor:
    """LLaDA's SFT loss (module docstring). Shapes: prompt (B, P) left-padded, response (B, T) with ``response_mask``
    (B, T) marking the response tokens (EOS padding counts, as in LLaDA) -> () scalar."""
    if response_mask.sum() == 0:
        raise ValueError("masked_diffusion_sft_loss: response_mask has no response token")
    B, T = response_ids.shape
    u = torch.rand(B, 1, generator=generator, device=response_ids.device)  # (B, 1)
    t = (1 - 1e-3) * u + 1e-3  # (B, 1)
    masked = (torch.rand(B, T, generator=generator, device=response_ids.device) < t) & response_mask.bool()  # (B, T)
    noisy = response_ids.masked_fill(masked, mask_id)  # (B, T)
    logits = model(torch.cat([prompt_ids, noisy], 1), torch.cat([prompt_mask, torch.ones_like(response_mask, dtype=torch.bool)], 1))
    logits = logits[:, prompt_ids.shape[1]:].float()  # (B, T, V)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), response_ids, reduction="none")  # (B, T)
    return (ce * masked / t).sum() / response_mask.sum()


__all__ = ["BidirectionalLM", "SMOLLM2_DLLM_TEMPLATE", "SmolLM2DiffusionLM", "TinyDiffusionLM", "add_mask_token",
           "bidirectional_mask", "dllm_tokenizer", "masked_diffusion_sft_loss",
           "MASK_TOKEN"]
