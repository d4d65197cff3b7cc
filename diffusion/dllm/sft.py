"""Masked-diffusion SFT on the shared SFT module (``common/sft.py``): the objective and the chain-sum traces.

:class:`MaskedDiffusionCE` is LLaDA's supervised fine-tuning loss (Nie et al. 2025, "Large Language Diffusion Models",
arXiv 2502.09992, eq. (5); Dream, Ye et al. 2025, arXiv 2508.15487, adapts an autoregressive checkpoint with it):
for a prompt p_0 and response r_0 of L' tokens,

    L(θ) = − E_{t ~ U(0, 1), r_t ~ q(r_t | r_0, t)} [ (1 / t) Σ_{i : r_t^i = MASK} log p_θ(r_0^i | p_0, r_t) ] / L'

where each response token is replaced by MASK independently with probability t and the prompt is never masked.
As in LLaDA's code, t = (1 − ε) u + ε with u ~ U(0, 1) (ε = 10⁻³ keeps 1/t bounded), one t per example, and
the batch's loss is Σ_examples Σ_masked CE / t divided by the batch's number of response tokens (EOS padding
included: LLaDA pads responses with EOS to the generation length and trains on it, so the model learns to end).

Randomness is drawn per example and per position *inside the example* (:meth:`MaskedDiffusionCE.draw`), so the
same generator gives the same masks whether the examples are packed or not; packed rows attend only within their
example (a block-diagonal bidirectional mask).

    advlab fit --config configs/diffusion/sft.yaml      # then d1.yaml / igpo.yaml with policy.checkpoint
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from common.losses.logprobs import token_logprobs
from common.sft import SFTBatch, SFTObjective, SFTSource
from diffusion.dllm.data import ChainSumData


class MaskedDiffusionCE(SFTObjective):
    """LLaDA's masked-diffusion SFT loss (module docstring); the policy is a ``MaskedDiffusionPolicy`` (its
    ``model`` a ``BidirectionalLM``, its tokenizer with a mask token).

    Args:
        eps: ε of t = (1 − ε) u + ε.
        pad_to: EOS-pad every response (+ its EOS) to this many tokens: the policy's ``gen_length`` (LLaDA trains on
            the EOS padding). None = the response and one EOS.
        chunk_size: rows per chunk of the log-softmax.
    """

    def __init__(self, eps: float = 1e-3, pad_to: int | None = None, chunk_size: int = 1024):
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"MaskedDiffusionCE: eps must be in (0, 1), got {eps}")
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"MaskedDiffusionCE: pad_to must be >= 1 or None, got {pad_to}")
        self.eps, self.pad_to, self.chunk_size = eps, pad_to, chunk_size

    def response_ids(self, ids: list[int], eos_id: int) -> list[int]:
        r = list(ids) + [eos_id]
        return r + [eos_id] * max(0, (self.pad_to or 0) - len(r))

    def draw(self, batch: SFTBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """t of every token's example and the masked response tokens. Shapes: -> (R, L) float32, (R, L) bool."""
        dev = batch.input_ids.device
        span = int(batch.position_ids.max()) + 1  # the longest example (the same packed or not)
        u = torch.rand(batch.examples, generator=generator, device=dev)  # (E,)
        t = (1 - self.eps) * u + self.eps  # (E,)
        uniforms = torch.rand(batch.examples, span, generator=generator, device=dev)  # (E, span)
        ex = batch.example_ids.clamp(min=0)  # (R, L)
        t_tok = t[ex]  # (R, L)
        masked = (uniforms[ex, batch.position_ids] < t_tok) & batch.target_mask  # (R, L): never a prompt token
        return t_tok, masked

    def forward(self, policy: Any, batch: SFTBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.loss(policy, batch, *self.draw(batch, generator))

    def loss(self, policy: Any, batch: SFTBatch, t_tok: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """Σ_{masked} CE / t and the number of response tokens, for given draws."""
        model, mask_id = policy.model, policy.tokenizer.mask_token_id
        if mask_id is None:
            raise ValueError("MaskedDiffusionCE: the policy's tokenizer has no mask token")
        noisy = batch.input_ids.masked_fill(masked, mask_id)  # (R, L)
        if batch.packed:  # attention confined to each example, positions restart per example
            h = model.model.get_decoder()(input_ids=noisy, attention_mask=batch.block_mask(False, model.head.weight.dtype),
                                          position_ids=batch.position_ids, use_cache=False).last_hidden_state  # (R, L, H)
            if model.shift:  # Dream's shift; an example's first token (a prompt token) is never a target
                h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        else:
            h = model.hidden(noisy, batch.attention_mask)  # (R, L, H); right padding: positions 0.. per row
        head = model.head
        lp, _ = token_logprobs(h[masked], head.weight, batch.input_ids[masked], bias=head.bias,
                               chunk_size=self.chunk_size)  # (N,)
        return -(lp / t_tok[masked]).sum(), batch.target_mask.sum()


class ChainSumTraces(SFTSource):
    """Chain-sum problems with their concise or verbose trace as the response, drawn as the RL recipes'
    ``ChainSumData`` draws its training set with the same arguments and seed: the ``held_out`` validation problems of
    that data module are never trained on.

    Args:
        ks: k values of the problems (``ChainSumData.train_ks``).
        weights: their mixing weights (default uniform).
        val_ks: k values of the RL recipe's held-out problems.
        held_out: the RL recipe's ``val_size``.
        trace: "concise" (running sums, ``#``, the answer) or "verbose" (``a+s=s';`` steps: the SFT ablation).
        truncate: cut the trace to this many characters (the verbose trace at T, domains.md §1(e)); None = whole.
        size: problems made when the data module asks for all.
    """

    def __init__(self, ks: list[int] = (3, 4, 5, 6), weights: list[float] | None = None, val_ks: list[int] = (5, 6),
                 held_out: int = 200, trace: Literal["concise", "verbose"] = "concise", truncate: int | None = None,
                 size: int = 4096):
        if trace not in ("concise", "verbose"):
            raise ValueError(f"ChainSumTraces: trace must be 'concise' or 'verbose', got {trace!r}")
        self.ks, self.weights, self.val_ks, self.held_out = list(ks), weights, list(val_ks), held_out
        self.trace, self.truncate, self.size = trace, truncate, size

    def make(self, n: int | None, seed: int) -> list[dict]:
        data = ChainSumData(self.ks, self.weights, self.val_ks, train_size=self.size if n is None else n,
                            val_size=self.held_out, seed=seed)
        data.setup()
        key = "trace" if self.trace == "concise" else "verbose"
        return [dict(s, response=s[key][: self.truncate]) for s in data.train_set]


__all__ = ["ChainSumTraces", "MaskedDiffusionCE"]
