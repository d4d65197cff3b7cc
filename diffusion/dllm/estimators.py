"""Exact sequence probabilities of the LLaDA sampler by enumeration, and the log-prob estimators set against them.

No public dLLM-RL code tests its log-prob estimator; here a tiny model (vocabulary ≤ 5, ≤ 4 completion positions,
a fixed prompt) makes everything finite:

* ``exact_sequence_probs``: the sampler's probability of every completion o, a finite sum over unmasking orders and
  choices. At a step, each still-masked candidate position proposes v with probability softmax(l / τ)_v
  independently (Gumbel-max), the ``k`` most confident proposals (softmax(l)_v) are committed (``sampler.py``); so
  the step's transition is a sum over the joint proposals of the candidates (V'^c terms, V' = V − 1 without MASK),
  and π(o) sums the paths of the resulting Markov chain.

* d1's one-step estimator (arXiv 2504.12216 §3.2): X(m) = Σ_t log f(o_t | q̃_m, MASK^T) with the prompt mask
  m ~ Bernoulli(p_mask)^P. Its exact mean and variance are sums over the 2^P masks; its bias is
  E_m X − log π(o). It is a mean-field estimate, biased for any p_mask.

* The partial-mask estimator and its coupled complementary pair (DiffuCoder's Coupled-GRPO, Gong et al. 2025,
  arXiv 2506.20639 §4 [mem]; the Horvitz–Thompson weighting below is ours): draw t ~ U(0, 1), mask each completion
  position with probability t (mask M, so P(M) = |M|!(T − |M|)!/(T + 1)! and P(t ∈ M) = ½), reveal the others:

      single   S(M) = Σ_{t ∈ M} log f(o_t | q, o_{M̄}) / P(t ∈ M)                       (one forward pass)
      coupled  C(M) = Σ_{t ∈ M} log f(o_t | q, o_{M̄}) + Σ_{t ∈ M̄} log f(o_t | q, o_M) = (S(M) + S(M̄)) / 2
                                                                                       (two forward passes)
  Every token is scored exactly once by C. Provable relations, asserted by the tests:
      E[C] = E[S]     (M̄ has the law of M, since t and 1 − t have the same law),
      Var C ≤ Var S   (Var((X + Y)/2) ≤ (Var X + Var Y)/2 = Var X for X, Y of the same law).
  *Not* provable: Var C ≤ Var of the mean of two independent single masks (Var S / 2, the same two forward passes).
  That holds iff Cov(S(M), S(M̄)) ≤ 0, true when f ignores the revealed context (then C is constant) but not in
  general: with T = 2 and log f(o_t | ·) = h(|M|) (h(2) = 0, h(1) = h ≠ 0), Cov = 8h²/9 > 0. So it is measured and
  reported (``estimator_report``), not asserted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.dllm.sampler import most_confident, num_transfer_tokens, without_mask_token

Model = Callable[[Tensor, Tensor], Tensor]  # (ids (N, L), attention mask (N, L)) -> logits (N, L, V)


def _logits(model: Model, ids: Tensor, mask_id: int) -> Tensor:  # (N, L) -> (N, L, V) float64, MASK removed
    return without_mask_token(model(ids, torch.ones_like(ids, dtype=torch.bool)).double(), mask_id)


@torch.no_grad()
def exact_sequence_probs(model: Model, prompt_ids: Tensor, *, gen_length: int, block_length: int, steps: int,
                         temperature: float, mask_id: int) -> dict[tuple[int, ...], float]:
    """π(o | prompt) of the LLaDA sampler for every completion o with π(o) > 0 (module docstring).
    Shapes: prompt_ids (P,) long, no padding. Enumerates V'^c joint proposals per state: for tiny cases only."""
    if gen_length > 6:
        raise ValueError(f"exact_sequence_probs enumerates V^T terms: gen_length must be <= 6, got {gen_length}")
    P, T = prompt_ids.shape[0], gen_length
    blocks, per_block = gen_length // block_length, steps // (gen_length // block_length)
    states: dict[tuple[int, ...], float] = {(mask_id,) * T: 1.0}
    for blk in range(blocks):
        in_block = [blk * block_length <= i < (blk + 1) * block_length for i in range(T)]
        k_all = num_transfer_tokens(torch.tensor([in_block]), per_block)[0].tolist()  # the block starts all masked
        for s in range(per_block):
            keys = list(states)
            ids = torch.cat([prompt_ids.expand(len(keys), P), torch.tensor(keys, dtype=torch.long)], 1)  # (N, P + T)
            logits = _logits(model, ids, mask_id)[:, P:]  # (N, T, V)
            q = (logits / temperature).softmax(-1) if temperature > 0 else \
                torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()  # proposal law (N, T, V)
            p = logits.softmax(-1)  # confidence (N, T, V)
            tokens = [v for v in range(logits.shape[-1]) if v != mask_id]
            nxt: dict[tuple[int, ...], float] = {}
            for i, key in enumerate(keys):
                cand = [t for t in range(T) if key[t] == mask_id and in_block[t]]
                combos = torch.tensor(list(itertools.product(tokens, repeat=len(cand))), dtype=torch.long)  # (K, c)
                pos = torch.tensor(cand)
                prob = q[i, pos[None, :], combos].prod(1) * states[key]  # (K,)
                conf = p[i, pos[None, :], combos]  # (K, c)
                commit = most_confident(conf, torch.ones_like(conf, dtype=torch.bool),
                                        torch.full((len(combos),), k_all[s], dtype=torch.long))  # (K, c)
                new = torch.tensor(key).repeat(len(combos), 1)  # (K, T)
                new[:, pos] = torch.where(commit, combos, new[:, pos])
                uniq, inverse = torch.unique(new, dim=0, return_inverse=True)  # (U, T), (K,)
                mass = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, prob)  # (U,)
                for state, w in zip(map(tuple, uniq.tolist()), mass.tolist()):
                    if w > 0:
                        nxt[state] = nxt.get(state, 0.0) + w
            states = nxt
    return states


@torch.no_grad()
def one_step_values(model: Model, prompt_ids: Tensor, completion: Tensor, prompt_masks: Tensor, mask_id: int) -> Tensor:
    """d1's X(m) = Σ_t log f(o_t | q̃_m, MASK^T) for each prompt mask m. Shapes: prompt (P,), completion (T,),
    prompt_masks (M, P) bool -> (M,) float64."""
    T = completion.shape[0]
    q = prompt_ids.expand(prompt_masks.shape[0], -1).masked_fill(prompt_masks, mask_id)  # (M, P)
    ids = torch.cat([q, torch.full((q.shape[0], T), mask_id, dtype=torch.long)], 1)  # (M, P + T)
    logp = _logits(model, ids, mask_id)[:, -T:].log_softmax(-1)  # (M, T, V)
    return logp.gather(-1, completion.expand(q.shape[0], T)[..., None]).squeeze(-1).sum(1)


@torch.no_grad()
def partial_mask_logprobs(model: Model, prompt_ids: Tensor, completion: Tensor, masks: Tensor, mask_id: int) -> Tensor:
    """log f(o_t | q, o revealed off M, MASK on M) at every position. Shapes: completion (T,) or (M, T), masks (M, T)
    bool -> (M, T) float64 (meaningful where the mask is set)."""
    P, (M, T) = prompt_ids.shape[0], masks.shape
    completion = completion.expand(M, T)  # (M, T): one completion for every mask, or one per mask
    ids = torch.cat([prompt_ids.expand(M, P), completion.masked_fill(masks, mask_id)], 1)  # (M, P + T)
    logp = _logits(model, ids, mask_id)[:, P:].log_softmax(-1)  # (M, T, V)
    return logp.gather(-1, completion[..., None]).squeeze(-1)


def all_masks(n: int) -> Tensor:  # (2^n, n) bool, every subset
    return torch.tensor(list(itertools.product([False, True], repeat=n)), dtype=torch.bool).reshape(-1, n)


@dataclass
class Moments:
    mean: float
    var: float


def moments(values: Tensor, weights: Tensor) -> Moments:
    """Exact mean and variance of a discrete law (values (M,), weights (M,) summing to 1)."""
    mean = float((weights * values).sum())
    return Moments(mean, float((weights * (values - mean) ** 2).sum()))


def one_step_moments(model: Model, prompt_ids: Tensor, completion: Tensor, p_mask: float, mask_id: int) -> Moments:
    """Exact mean and variance of d1's X(m) over m ~ Bernoulli(p_mask)^P (2^P masks)."""
    masks = all_masks(prompt_ids.shape[0])  # (M, P)
    k = masks.sum(1).double()
    w = p_mask ** k * (1 - p_mask) ** (masks.shape[1] - k)  # (M,)
    return moments(one_step_values(model, prompt_ids, completion, masks, mask_id), w)


def partial_mask_moments(model: Model, prompt_ids: Tensor, completion: Tensor, mask_id: int) -> tuple[Moments, Moments]:
    """Exact (mean, variance) of the single partial-mask estimator S and the coupled pair C (module docstring),
    over the 2^T completion masks with P(M) = |M|!(T − |M|)!/(T + 1)!."""
    T = completion.shape[0]
    masks = all_masks(T)  # (M, T); row M̄ of row i is row 2^T − 1 − i
    k = masks.sum(1).tolist()
    w = torch.tensor([math.factorial(a) * math.factorial(T - a) / math.factorial(T + 1) for a in k], dtype=torch.float64)
    lp = partial_mask_logprobs(model, prompt_ids, completion, masks, mask_id)  # (M, T)
    single = 2.0 * (lp * masks).sum(1)  # (M,) S(M) = Σ_{t∈M} log f / P(t ∈ M), P(t ∈ M) = 1/2
    coupled = 0.5 * (single + single.flip(0))  # (M,) (S(M) + S(M̄)) / 2
    return moments(single, w), moments(coupled, w)


@torch.no_grad()
def estimator_report(model: Model, prompt_ids: Tensor, *, gen_length: int, block_length: int, steps: int,
                     temperature: float, mask_id: int, p_mask: float = 0.15) -> dict[str, float]:
    """π-weighted bias and variance of each estimator against the exact log π(o) (sums over every o):
    ``d1_bias``, ``d1_abs_bias``, ``d1_var`` (one forward pass), ``single_bias``, ``single_var`` (one pass),
    ``coupled_bias``, ``coupled_var`` (two passes), ``two_singles_var`` = single_var / 2 (two independent passes),
    ``sequences`` (completions with π > 0) and ``total_prob`` (Σ π, 1 up to rounding)."""
    probs = exact_sequence_probs(model, prompt_ids, gen_length=gen_length, block_length=block_length, steps=steps,
                                 temperature=temperature, mask_id=mask_id)
    seqs = torch.tensor(list(probs), dtype=torch.long)  # (N, T)
    pi = torch.tensor(list(probs.values()), dtype=torch.float64)  # (N,)
    exact = pi.log()
    N, T = seqs.shape
    # d1: the completion is all MASK, so one forward per prompt mask serves every o
    pm = all_masks(prompt_ids.shape[0])  # (M, P)
    k = pm.sum(1).double()
    w_d1 = p_mask ** k * (1 - p_mask) ** (pm.shape[1] - k)  # (M,)
    q = prompt_ids.expand(len(pm), -1).masked_fill(pm, mask_id)
    logp = _logits(model, torch.cat([q, torch.full((len(pm), T), mask_id)], 1), mask_id)[:, -T:].log_softmax(-1)  # (M, T, V)
    d1 = logp[:, torch.arange(T)[None, :], seqs].sum(-1)  # (M, N) X(m) for every o
    # partial masks: every (o, M) pair in one forward
    cm = all_masks(T)  # (C, T)
    a = cm.sum(1).tolist()
    w_c = torch.tensor([math.factorial(x) * math.factorial(T - x) / math.factorial(T + 1) for x in a], dtype=torch.float64)
    rows = seqs.repeat_interleave(len(cm), 0)  # (N·C, T)
    lp = partial_mask_logprobs(model, prompt_ids, rows, cm.repeat(N, 1), mask_id).view(N, len(cm), T)
    single = 2.0 * (lp * cm).sum(-1)  # (N, C)
    coupled = 0.5 * (single + single.flip(1))  # (N, C): row 2^T − 1 − i is the complement of row i

    def stats(values: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:  # values (N, M) -> mean (N,), var (N,)
        mean = values @ w
        return mean, ((values - mean[:, None]) ** 2) @ w

    out = {}
    for name, values, w in (("d1", d1.T, w_d1), ("single", single, w_c), ("coupled", coupled, w_c)):
        mean, var = stats(values, w)
        out[f"{name}_bias"] = float(pi @ (mean - exact))
        out[f"{name}_var"] = float(pi @ var)
        if name == "d1":
            out["d1_abs_bias"] = float(pi @ (mean - exact).abs())
    out["two_singles_var"] = out["single_var"] / 2
    out["sequences"], out["total_prob"] = float(N), float(pi.sum())
    return out


def tiny_model(vocab_size: int = 5, hidden_size: int = 16, init_range: float = 0.5, seed: int = 0):
    """A one-layer bidirectional LLaMA over ``vocab_size`` tokens, the last being MASK (no tokenizer): the
    enumeration's model. A wide ``init_range`` makes its distributions far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffusion.dllm.model import BidirectionalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, initializer_range=init_range,
                      attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BidirectionalLM(LlamaForCausalLM(cfg)).double().eval()


if __name__ == "__main__":  # python -m diffusion.dllm.estimators: the report of the exact-enumeration test's case
    model = tiny_model()
    prompt = torch.tensor([0, 1, 2])
    for T, steps in ((3, 3), (4, 4), (4, 2)):
        r = estimator_report(model, prompt, gen_length=T, block_length=T, steps=steps, temperature=1.0, mask_id=4)
        print(f"T={T} steps={steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()))
