"""Tree-verified speculative decoding (EAGLE-2/3) with the target's KV cache: one target forward per cycle.

One cycle (batch 1), after a prefill that caches x_{<P} and picks the pending token x_P:
    1. grow the draft tree below the root x_P (speculative/tree.py) from the draft's root hidden state;
    2. one target forward over the N+1 tree tokens: positions P + depth, attention = the cached prefix plus the
       node's ancestors and itself (the tree mask);
    3. at every node pick the target's next token c_j: argmax (T = 0) or a sample from softmax(z_j / T);
    4. accept the branch with the longest run of drafted tokens equal to c at their parent; commit the accepted
       tokens and the bonus token c at the last accepted node; keep the cache rows of the accepted nodes.

T > 0 is lossless: EAGLE's ``evaluate_posterior`` accepts child x with probability p(x), on rejection sets
p(x) = 0 and renormalises before the next sibling, and samples the bonus from the residual. With distinct
children and deterministic proposals (q = 1) child j is accepted with probability
p_j · Π_{i<j}(1 − p_i / (1 − Σ_{l<i} p_l)) = p_j and the bonus is x ~ p restricted to non-children, i.e. the
procedure is exactly "draw c ~ p; descend to the child equal to c, else c is the bonus". Step 3 draws c at
every node at once, so every committed token is a draw from p_T given its prefix (checked by a chi-square test).
Acceptance length τ = accepted drafted tokens + 1 per cycle (EAGLE's definition).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from speculative.draft import Draft, feature_layers, target_features
from speculative.tree import DraftStep, DraftTree, greedy_path_kept, grow_tree, longest_accepted

__all__ = ["SpeculativeDecoder", "DecodeStats", "greedy_decode", "draft_step", "draft_tree", "choose"]


def choose(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """The target's token at every row: argmax (T = 0) or a sample from softmax(z / T). (..., V) -> (...)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def draft_step(draft: Draft, ctx: tuple[Tensor, Tensor], ctx_mask: Tensor, root_pos: Tensor) -> DraftStep:
    """The draft forward over a frontier for :func:`grow_tree`: frontier nodes attend the allowed context keys
    (ctx (Bt, H, C, d), ctx_mask (Bt, C) bool) and their tree ancestors; node positions root_pos (Bt,) + depth.
    Tokens are draft-vocabulary indices (``draft.d2t`` maps them to the target's); log-probs are over the draft
    vocabulary (the same values as over the target's, where the rest is -inf, at Vd/V of the cost)."""
    store: list[tuple[Tensor, Tensor]] = []

    def step(tokens: Tensor, features: Tensor, depth: int, ancestors: Tensor) -> tuple[Tensor, Tensor]:
        Bt, k = tokens.shape
        past_k = torch.cat([ctx[0]] + [s[0] for s in store], 2)
        past_v = torch.cat([ctx[1]] + [s[1] for s in store], 2)
        mask = torch.cat([ctx_mask[:, None].expand(Bt, k, ctx_mask.shape[1]), ancestors], -1)  # (Bt, k, C + F)
        g, kk, vv = draft.layer(draft.d2t[tokens], features, (root_pos[:, None] + depth).expand(Bt, k),
                                (past_k, past_v), mask)
        store.append((kk, vv))
        return g, draft.draft_logits(g).float().log_softmax(-1)

    return step


def draft_tree(draft: Draft, ctx: tuple[Tensor, Tensor], ctx_mask: Tensor, root_pos: Tensor, root_hidden: Tensor,
               *, top_k: int, depth: int, total_tokens: int) -> DraftTree:
    """The draft's dynamic tree below roots at ``root_pos`` (Bt,) with output hidden states root_hidden (Bt, h):
    grown over the draft vocabulary, returned with target token ids (root token -1: the caller's)."""
    step = draft_step(draft, ctx, ctx_mask, root_pos)
    root_logq = draft.draft_logits(root_hidden).float().log_softmax(-1)  # (Bt, Vd)
    tree = grow_tree(step, root_logq, root_hidden, top_k=top_k, depth=depth, total_tokens=total_tokens)
    tree.tokens[:, 1:] = draft.d2t[tree.tokens[:, 1:]]
    tree.greedy = torch.where(tree.greedy >= 0, draft.d2t[tree.greedy.clamp(min=0)], tree.greedy)
    return tree


def _keep_rows(cache, prefix: int, rows: Tensor) -> None:
    """Target KV cache: keep the prefix and the given tree rows (absolute index prefix + node), in order."""
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[:, :, :prefix], layer.keys[:, :, prefix + rows]], 2)
        layer.values = torch.cat([layer.values[:, :, :prefix], layer.values[:, :, prefix + rows]], 2)


@dataclass
class DecodeStats:
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted per cycle
    target_calls: int = 0  # target forwards (prefill included)
    greedy_kept: list[bool] = field(default_factory=list)  # draft's greedy path survived re-ranking, per cycle
    accepted_on_greedy: list[bool] = field(default_factory=list)  # accepted nodes all on the greedy path (a >= 1)

    @property
    def tau(self) -> float:
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)


class SpeculativeDecoder:
    """EAGLE-3-style speculative decoding at batch 1.

    Args:
        target: a HF causal LM (Llama-style; custom 4-D attention masks are used for the tree).
        draft: the draft head (speculative.draft.Draft) for this target.
        top_k, depth, total_tokens: the dynamic tree (EAGLE-3 defaults 10, 7, 60; smaller on a CPU).
        temperature: 0 = greedy acceptance; > 0 = lossless speculative sampling.
        layers: target hidden-state indices for the low/mid/high features (default :func:`feature_layers`).
    """

    def __init__(self, target: nn.Module, draft: Draft, top_k: int = 10, depth: int = 7, total_tokens: int = 60,
                 temperature: float = 0.0, layers: tuple[int, int, int] | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.target, self.draft = target, draft
        self.top_k, self.depth, self.total_tokens, self.temperature = top_k, depth, total_tokens, temperature
        self.layers = layers or feature_layers(target.config.num_hidden_layers)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, stats: DecodeStats | None = None) -> Tensor:
        """input_ids (1, P) -> new tokens (1, n <= max_new_tokens); fills ``stats`` if given."""
        from transformers import DynamicCache

        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (1, P) with P >= 1 (batch 1), got {tuple(input_ids.shape)}")
        stats = stats if stats is not None else DecodeStats()
        dev, P = input_ids.device, input_ids.shape[1]
        cache = DynamicCache(config=self.target.config)
        feats, logits, _ = target_features(self.target, input_ids, self.layers, past_key_values=cache, use_cache=True)
        stats.target_calls += 1
        pending = choose(logits[:, -1], self.temperature, generator)  # (1,) x_P
        out = [pending]
        next_tokens = torch.cat([input_ids[:, 1:], pending[:, None]], 1)  # (1, P) x_{t+1} for pairs t < P
        g, ctx = self.draft.context(feats, next_tokens, torch.arange(P, device=dev)[None])
        root_hidden, root_pos = g[:, -1], torch.tensor([P - 1], device=dev)
        n_out = 1
        while n_out < max_new_tokens and not (eos_token_id is not None and bool((out[-1] == eos_token_id).any())):
            tree = draft_tree(self.draft, ctx, torch.ones(1, ctx[0].shape[2], dtype=torch.bool, device=dev), root_pos,
                              root_hidden, top_k=self.top_k, depth=self.depth, total_tokens=self.total_tokens)
            tree.tokens[:, 0] = pending
            feats, logits = self.verify(tree, cache, P)
            stats.target_calls += 1
            c = choose(logits, self.temperature, generator)  # (1, N+1)
            a, path = longest_accepted(tree, c)
            a = int(a)
            nodes = path[0, : a + 1]  # (a+1,) root first
            new = torch.cat([tree.tokens[0, nodes[1:]], c[0, nodes[-1:]]])  # (a+1,) accepted + bonus
            self._diagnostics(tree, nodes, a, stats)
            _keep_rows(cache, P, nodes)
            g, ctx = self.draft.context(feats[:, nodes], new[None], (P + torch.arange(a + 1, device=dev))[None], ctx)
            root_hidden, root_pos = g[:, -1], torch.tensor([P + a], device=dev)
            P += a + 1
            pending = new[-1:]
            out.append(new)
            n_out += a + 1
        tokens = torch.cat(out)[:max_new_tokens]
        if eos_token_id is not None:
            hits = (tokens == eos_token_id).nonzero()
            if len(hits):
                tokens = tokens[: int(hits[0, 0]) + 1]
        return tokens[None]

    def verify(self, tree: DraftTree, cache, prefix: int) -> tuple[Tensor, Tensor]:
        """One target forward over the tree tokens with the tree mask. -> features (1, N+1, 3h), logits (1, N+1, V)."""
        n = tree.num_nodes
        mask = torch.cat([torch.ones(1, n, prefix, dtype=torch.bool, device=tree.tokens.device), tree.attention], -1)
        feats, logits, _ = target_features(self.target, tree.tokens, self.layers, past_key_values=cache,
                                           use_cache=True, attention_mask=mask[:, None], position_ids=prefix + tree.depth)
        return feats, logits

    def _diagnostics(self, tree: DraftTree, nodes: Tensor, a: int, stats: DecodeStats) -> None:
        kept, on_greedy = greedy_path_kept(tree, self.depth + 1)
        stats.accepted.append(a)
        stats.greedy_kept.append(bool(kept[0]))
        if a >= 1:
            stats.accepted_on_greedy.append(bool(on_greedy[0, nodes[-1]]))


@torch.no_grad()
def greedy_decode(target: nn.Module, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
    """Plain greedy decoding with a KV cache (the speedup baseline): one target forward per token.
    input_ids (1, P) -> (1, n)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    logits = target(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
    out = []
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(nxt)
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        logits = target(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    return torch.cat(out, 1)
