"""Group Tree Optimization (GTO): the Draft Tree Reward and group-based draft policy training.

Bridging Draft Policy Misalignment: Group Tree Optimization for Speculative Decoding (Hu et al. 2025,
arXiv 2509.22134), §3-4, Algorithm 1. For a prefix x_{1:i} let T_i = G(M, x_{1:i}) be the decoding-time draft
tree of the current draft M and T̄_i that of the frozen reference M0 (Phase I's EAGLE-3 draft):

    L_{i,n} = Σ_{j=1}^{l_n} Π_{k=1}^{j} p_T(x̄_k | x_{1:i}, x̄_{<k})     expected accepted length of branch n
    r_i     = R(T_i; η) = (1/η) log Σ_n exp(η L_{i,n})                 Draft Tree Reward (smooth max)
    R_i     = r_i − r̄_i                                               debiased by the reference tree
    A_i     = (R_i − mean_{G^(k)} R) / (std_{G^(k)} R + δ)             groups G^(k) = m adjacent positions
    s_i     = exp((log M(Ŝ_i) − log M0(Ŝ_i)) / max(l_i, 1))            Ŝ_i the longest accepted branch of T_i
    L_GTO   = −(1/m) Σ_{i∈G^(k)} min(s_i A_i, clip(s_i, 1−ε, 1+ε) A_i)   averaged over groups
    L       = L_token + ω · L_GTO

The ratio's denominator is the frozen M0 for the whole phase (not the previous step's policy).
Bounds: max_n L_{i,n} ≤ r_i ≤ max_n L_{i,n} + (1/η) log N_leaves.
Shapes: Bt trees (one per prefix), N+1 nodes, D+1 = longest path, B sequences, S tokens, h hidden.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from common.advantages.base import AdvantageEstimator
from common.advantages.group import grpo
from common.losses.aggregate import Normaliser, aggregate
from common.losses.base import LossOutput, PolicyLoss
from common.losses.ppo_clip import clipped_surrogate
from speculative.decode import draft_tree
from speculative.draft import Draft
from speculative.tree import DraftTree, longest_accepted

__all__ = ["branch_lengths", "tree_reward", "gto_advantages", "gto_surrogate", "group_roots", "prefix_trees",
           "verify_prefix_trees", "path_logprob", "accepted_branch", "GTOAdvantage", "GTOLoss"]


def branch_lengths(node_probs: Tensor, tree: DraftTree) -> Tensor:
    """L per node: the expected accepted length of the root->node branch, Σ_j Π_{k≤j} p_k.

    Shapes: node_probs (Bt, N+1) = p_T(token of node | its path) (the root's is ignored) -> (Bt, N+1)."""
    below_root = tree.paths[..., 1:]  # (Bt, N+1, D)
    p = node_probs.gather(1, below_root.clamp(min=0).flatten(1)).view_as(below_root)
    p = torch.where(below_root >= 0, p, torch.zeros_like(p))  # past the end of the branch: contributes 0
    return p.cumprod(-1).sum(-1)  # (Bt, N+1)


def tree_reward(node_probs: Tensor, tree: DraftTree, eta: float = 1.0,
                reduce: Literal["lse", "max", "mean"] = "lse") -> Tensor:
    """Draft Tree Reward r = (1/η) logsumexp_n(η L_n) over root-to-leaf branches (GTO eq. 6); "max" and "mean"
    are the paper's ablations. Shapes: node_probs (Bt, N+1) -> (Bt,). A tree of only the root gets 0."""
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    L = branch_lengths(node_probs, tree)  # (Bt, N+1)
    leaves = tree.leaves
    if reduce == "lse":
        return torch.logsumexp(torch.where(leaves, eta * L, torch.full_like(L, float("-inf"))), -1) / eta
    if reduce == "max":
        return torch.where(leaves, L, torch.full_like(L, float("-inf"))).amax(-1)
    if reduce == "mean":
        return (L * leaves).sum(-1) / leaves.sum(-1)
    raise ValueError(f"reduce must be 'lse', 'max' or 'mean', got {reduce!r}")


def gto_advantages(rewards: Tensor, ref_rewards: Tensor | None, group_ids: Tensor, *, eps: float = 1e-6,
                   standardise: bool = True) -> Tensor:
    """A = group-standardised (r − r̄) (GTO eq. 9-10). ``ref_rewards=None`` drops the debiasing (ablation);
    ``standardise=False`` returns R itself (our reading of the paper's m = 1 arm, where the formula gives 0).
    Shapes: rewards, ref_rewards, group_ids (Bt,) -> (Bt,)."""
    R = rewards if ref_rewards is None else rewards - ref_rewards  # (Bt,)
    return grpo(R, group_ids, eps=eps) if standardise else R


def gto_surrogate(logp: Tensor, ref_logp: Tensor, length: Tensor, advantages: Tensor, group_ids: Tensor,
                  *, clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """L_GTO: per-token geometric-mean ratio to the frozen reference along Ŝ_i, PPO clip, mean over groups of
    the group mean. Shapes: logp, ref_logp (Bt,) summed log-probs of Ŝ_i; length (Bt,) l_i; advantages,
    group_ids (Bt,) -> loss (), clip fraction ()."""
    n = length.clamp(min=1).to(logp.dtype)
    has_branch = length > 0  # (Bt,) l_i = 0: s_i = 1 with zero gradient, the term is −A_i
    per_row, _, clipped = clipped_surrogate(logp / n, ref_logp / n, advantages, has_branch, eps_low=clip_eps,
                                            eps_high=clip_eps)  # (Bt,) each: one geometric-mean ratio per row
    per_row = torch.where(has_branch, per_row, -advantages.to(per_row.dtype))
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    per_group = torch.zeros(len(groups), dtype=per_row.dtype, device=per_row.device).index_add_(0, inverse, per_row)
    count = torch.zeros(len(groups), dtype=per_row.dtype, device=per_row.device).index_add_(
        0, inverse, torch.ones_like(per_row))
    return (per_group / count).mean(), clipped.float().mean()


class GTOAdvantage(AdvantageEstimator):
    """A_i of GTO eq. 10 from the rollout's debiased rewards R_i = r_i − r̄_i (``speculative.policy.DraftPolicy``):
    GRPO's group standardisation (``grpo``, unbiased std, + δ) over the m adjacent roots of a group;
    ``standardise=False`` returns R itself (the m = 1 arm, :func:`gto_advantages`).

    Args:
        std_eps: δ of the standardisation (1e-6).
        standardise: standardise within groups (m > 1) or use R (m = 1).
    """

    def __init__(self, std_eps: float = 1e-6, standardise: bool = True):
        if std_eps < 0:
            raise ValueError(f"std_eps must be >= 0, got {std_eps}")
        self.std_eps, self.standardise = std_eps, standardise

    def __call__(self, batch) -> Tensor:  # (Bt,)
        return gto_advantages(batch.rewards, None, batch.group_ids, eps=self.std_eps, standardise=self.standardise)


class GTOLoss(PolicyLoss):
    """ω·L_GTO as the loop's policy loss (GTO eq. 11, Algorithm 1): one action per row, the log of the per-token
    geometric mean of the branch's probability (``DraftPolicy.forward``, (Bt, 1)); the ratio's denominator is the
    frozen reference M0 (``ref_logprobs``), not π_old, so s_i = exp(logprobs − ref_logprobs); PPO's clip
    (``clipped_surrogate``), mean over the rows: with groups of equal size m, the mean over groups of the group
    means of :func:`gto_surrogate`. ``omega = 0`` is Phase I (the token loss alone): no term, no reference.

    Args:
        omega: ω, the weight of L_GTO (0.5).
        clip_eps: ε of the clipped ratio (not stated in the paper; 0.2).
    """

    def __init__(self, omega: float = 0.5, clip_eps: float = 0.2):
        if omega < 0:
            raise ValueError(f"omega must be >= 0, got {omega}")
        if not 0 <= clip_eps < 1:
            raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
        self.omega, self.clip_eps = omega, clip_eps

    @property
    def needs_reference(self) -> bool:
        return self.omega > 0

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                 normaliser: Normaliser | None = None, batch=None) -> LossOutput:
        """Shapes: logprobs, ref_logprobs, mask (Bt, 1); advantages (Bt,)."""
        if self.omega == 0:
            return LossOutput(torch.zeros((), device=logprobs.device))
        if ref_logprobs is None:
            raise ValueError("GTOLoss needs ref_logprobs (the frozen reference M0's log-probs of the branches)")
        per_row, _, clipped = clipped_surrogate(logprobs, ref_logprobs, advantages, mask, eps_low=self.clip_eps,
                                                eps_high=self.clip_eps)  # (Bt, 1) each
        loss_gto = aggregate(per_row, mask, "seq_mean_token_mean", normaliser)
        clip_frac = aggregate(clipped.to(per_row.dtype), mask, "seq_mean_token_mean", normaliser)
        metrics = {"loss_gto": loss_gto.detach(), "clip_frac": clip_frac}
        if batch is not None and "length" in batch.inputs:  # accepted tokens + the bonus token, per root
            metrics["accepted_len"] = aggregate((batch.inputs["length"][:, None] + 1).to(per_row.dtype), mask,
                                                "seq_mean_token_mean", normaliser)
        return LossOutput(self.omega * loss_gto, metrics)


def group_roots(valid: Tensor, groups: int, group_size: int, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """K non-overlapping groups of m adjacent prefix positions per sequence (GTO §4.2), one group per equal
    segment at a random offset. A root r is the pair (h_r, x_{r+1}): the prefix ends at x_{r+1}.
    Shapes: valid (B, S) bool -> seq index (B·K·m,), root r (B·K·m,), group ids (B·K·m,)."""
    B = valid.shape[0]
    pairs = valid.sum(1) - 1  # (B,) roots 0..pairs-1
    seg = pairs // groups  # (B,)
    if bool((seg < group_size).any()):
        raise ValueError(f"sequences of {int(pairs.min()) + 1} tokens are too short for {groups} groups of "
                         f"{group_size} adjacent positions; use shorter groups or longer sequences")
    u = torch.rand(B, groups, generator=generator, device=valid.device)
    start = torch.arange(groups, device=valid.device) * seg[:, None] + (u * (seg[:, None] - group_size + 1)).long()
    roots = (start[..., None] + torch.arange(group_size, device=valid.device)).reshape(-1)  # (B·K·m,)
    seq = torch.arange(B, device=valid.device).repeat_interleave(groups * group_size)
    gid = torch.arange(B * groups, device=valid.device).repeat_interleave(group_size)
    return seq, roots, gid


@torch.no_grad()
def prefix_trees(draft: Draft, ctx: tuple[Tensor, Tensor], g0: Tensor, input_ids: Tensor, seq: Tensor,
                 roots: Tensor, *, top_k: int, depth: int, total_tokens: int) -> DraftTree:
    """Decoding-time trees of ``draft`` for many prefixes of the same sequences at once.

    Shapes: ctx keys/values (B, H, S-1, d) and g0 (B, S-1, h) from ``draft.context`` over the sequence; input_ids
    (B, S); seq, roots (Bt,) -> a DraftTree with Bt trees whose root token is x_{r+1}."""
    keys, values = ctx[0][seq], ctx[1][seq]  # (Bt, H, S-1, d)
    ctx_mask = torch.arange(keys.shape[2], device=roots.device)[None] <= roots[:, None]  # (Bt, S-1)
    root_hidden = g0[seq, roots]  # (Bt, h)
    tree = draft_tree(draft, (keys, values), ctx_mask, roots, root_hidden, top_k=top_k, depth=depth,
                      total_tokens=total_tokens)
    tree.tokens[:, 0] = input_ids[seq, roots + 1]
    return tree


@torch.no_grad()
def verify_prefix_trees(target: nn.Module, cache, target_logits: Tensor, seq: Tensor, roots: Tensor,
                        tree: DraftTree) -> tuple[Tensor, Tensor]:
    """The target over every prefix tree in one forward (prefix from the sequence's KV cache, tree mask).

    Shapes: cache of the (B, S) sequence forward; target_logits (B, S, V); seq, roots (Bt,) -> node_probs
    (Bt, N+1) = p_T(node token | path) (root 1), choice (Bt, N+1) the target argmax at every node."""
    from transformers import DynamicCache

    Bt, n = tree.tokens.shape
    S = cache.layers[0].keys.shape[2]
    sub = DynamicCache(config=target.config)
    for i, layer in enumerate(cache.layers):
        sub.update(layer.keys[seq], layer.values[seq], i)
    prefix = torch.arange(S, device=roots.device)[None, None] <= (roots + 1)[:, None, None]  # (Bt, 1, S)
    mask = torch.cat([prefix.expand(Bt, n - 1, S), tree.attention[:, 1:, 1:]], -1)  # (Bt, N, S + N)
    out = target(input_ids=tree.tokens[:, 1:], past_key_values=sub, attention_mask=mask[:, None],
                 position_ids=roots[:, None] + 1 + tree.depth[:, 1:], use_cache=True)
    logits = torch.cat([target_logits[seq, roots + 1][:, None], out.logits], 1).float()  # (Bt, N+1, V)
    logp = logits.log_softmax(-1)
    parent_logp = logp.gather(1, tree.parents[..., None].expand_as(logp))  # (Bt, N+1, V) at each node's parent
    node_probs = parent_logp.gather(2, tree.tokens.clamp(min=0)[..., None])[..., 0].exp()  # (Bt, N+1)
    return node_probs, logits.argmax(-1)


def path_logprob(draft: Draft, ctx: tuple[Tensor, Tensor], g0: Tensor, seq: Tensor, roots: Tensor,
                 tokens: Tensor, length: Tensor) -> Tensor:
    """log M(Ŝ | x_{1:i}): the draft's log-probs along a branch, run as at decoding (each step fed its own
    previous hidden state, attending the prefix and the branch so far). Differentiable.

    Shapes: ctx (B, H, S-1, d), g0 (B, S-1, h); seq, roots (Bt,); tokens (Bt, D) the branch (any value past
    ``length``); length (Bt,) -> (Bt,)."""
    Bt, D = tokens.shape
    keys, values = ctx[0][seq], ctx[1][seq]  # (Bt, H, S-1, d)
    C = keys.shape[2]
    hidden = g0[seq, roots][:, None]  # (Bt, 1, h)
    ctx_mask = torch.arange(C, device=roots.device)[None] <= roots[:, None]  # (Bt, C)
    total = torch.zeros(Bt, dtype=torch.float32, device=tokens.device)
    for j in range(D):
        logq = draft.logits(hidden[:, 0]).float().log_softmax(-1)  # (Bt, V)
        total = total + torch.where(j < length, logq.gather(1, tokens[:, j : j + 1])[:, 0], torch.zeros_like(total))
        if j + 1 == D:
            break
        mask = torch.cat([ctx_mask, torch.ones(Bt, j + 1, dtype=torch.bool, device=roots.device)], 1)[:, None]
        hidden, k, v = draft.layer(tokens[:, j : j + 1], hidden, (roots + j + 1)[:, None], (keys, values), mask)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
    return total


def accepted_branch(tree: DraftTree, choice: Tensor) -> tuple[Tensor, Tensor]:
    """Ŝ_i: tokens of the longest accepted branch (T = 0 rule), truncated to its accepted part.
    Shapes: choice (Bt, N+1) -> tokens (Bt, D) (0 past the accepted length), length (Bt,)."""
    accepted, path = longest_accepted(tree, choice)  # (Bt,), (Bt, D+1)
    below = path[:, 1:]  # (Bt, D)
    tokens = tree.tokens.gather(1, below.clamp(min=0))
    keep = torch.arange(below.shape[1], device=below.device)[None] < accepted[:, None]
    return torch.where(keep, tokens, torch.zeros_like(tokens)), accepted
