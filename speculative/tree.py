"""The EAGLE-2/3 dynamic draft tree as data: growth, re-ranking, tree attention mask, positions, retrieve paths.

EAGLE-2 (Li et al. 2024, arXiv 2406.16858, §4) / EAGLE-3 (Li et al. 2025, arXiv 2503.01840): from the root take
the draft's top-k tokens; ``depth`` times feed the k frontier nodes in one batched draft forward, give each its
top-k children with the cumulative score (the "global acceptance score")

    s(child) = s(parent) + log q(child | path)                                    (EAGLE-2 eq. in §4.1)

record all k² children and keep the top-k of them as the next frontier. Finally re-rank every recorded node by
score and keep the best ``total_tokens``. Scores never increase along a path and ties keep creation order (a
parent is created before its children), so the kept set is ancestor-closed.

Node 0 is the root (the last accepted token, not drafted); nodes 1..N are drafted, in creation order, so a
parent always has a smaller index than its children. Every tensor has a leading batch of trees ``Bt`` (one per
request at decoding, one per prefix in GTO training): ``N`` = total_tokens, ``D`` = longest path (depth + 1).
Only the loops over depth (at most ``depth + 1`` iterations) are in Python; no loop runs over nodes or trees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DraftTree", "grow_tree", "rerank", "tree_buffers", "longest_accepted", "greedy_path_kept"]


@dataclass
class DraftTree:
    """A batch of draft trees (node 0 = root; drafted nodes 1..N in creation order).

    tokens (Bt, N+1) long: node tokens (root's is the caller's pending token, -1 if unknown);
    parents (Bt, N+1) long: parent node index (the root points to itself);
    scores (Bt, N+1) float: cumulative draft log-prob (root 0);
    depth (Bt, N+1) long: 0 for the root — the position offset of each node;
    attention (Bt, N+1, N+1) bool: node i may attend node j iff j is i or an ancestor of i;
    paths (Bt, N+1, D+1) long: paths[b, i, d] = the depth-d node on the root->i path, -1 beyond depth[b, i];
    leaves (Bt, N+1) bool: nodes with no child; ``paths[leaves]`` are EAGLE's "retrieve indices";
    greedy (Bt, N+1) long: the draft's argmax token at each node (-1 where the node was never expanded), for the
    misalignment diagnostics (is the draft's greedy path still in the re-ranked tree?).
    """

    tokens: Tensor
    parents: Tensor
    scores: Tensor
    depth: Tensor
    attention: Tensor
    paths: Tensor
    leaves: Tensor
    greedy: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


def tree_buffers(parents: Tensor, max_depth: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention mask, depths, root-to-node paths and leaf flags from parent pointers.

    Shapes: parents (Bt, N+1) long with parents[:, 0] = 0 and parents[:, i] < i -> attention (Bt, N+1, N+1) bool,
    depth (Bt, N+1) long, paths (Bt, N+1, max_depth+1) long (-1 padded), leaves (Bt, N+1) bool.
    """
    if parents.dim() != 2 or parents.dtype != torch.long:
        raise ValueError(f"parents must be a (Bt, N+1) long tensor, got {parents.dtype} of shape {tuple(parents.shape)}")
    Bt, n = parents.shape
    idx = torch.arange(n, device=parents.device).expand(Bt, n)  # (Bt, N+1)
    if bool((parents[:, 1:] >= idx[:, 1:]).any()) or bool((parents < 0).any()):
        raise ValueError("parents must point to an earlier node (0 <= parents[:, i] < i for i >= 1)")
    attention = torch.eye(n, dtype=torch.bool, device=parents.device).expand(Bt, n, n).clone()  # (Bt, N+1, N+1)
    cur = idx
    for _ in range(max_depth):  # walk every node up one level at a time: a loop over depth, not nodes
        cur = parents.gather(1, cur)  # (Bt, N+1)
        attention.scatter_(2, cur[..., None], True)
    depth = attention.sum(-1) - 1  # (Bt, N+1) ancestors excluding the node itself (the root counts once)
    if bool((depth > max_depth).any()):
        raise ValueError(f"a node is deeper than max_depth={max_depth}")
    paths = torch.full((Bt, n, max_depth + 1), -1, dtype=torch.long, device=parents.device)  # (Bt, N+1, D+1)
    b, i, j = attention.nonzero(as_tuple=True)  # j is on the path to i
    paths[b, i, depth[b, j]] = j
    has_child = torch.zeros(Bt, n, dtype=torch.bool, device=parents.device)
    has_child.scatter_(1, parents[:, 1:], True)
    return attention, depth, paths, ~has_child


def rerank(tokens: Tensor, scores: Tensor, parents: Tensor, total_tokens: int, max_depth: int,
           greedy: Tensor | None = None, root_greedy: Tensor | None = None) -> DraftTree:
    """Keep the ``total_tokens`` best recorded nodes (EAGLE-2's re-ranking) and build the tree buffers.

    Shapes: tokens, scores, parents (Bt, M) for the M recorded nodes in creation order; ``parents`` index the
    recorded nodes, -1 = the root; optional greedy (Bt, M), root_greedy (Bt,): the draft's argmax per node.
    Returns a DraftTree with N = min(total_tokens, M) drafted nodes.
    """
    Bt, M = scores.shape
    N = min(total_tokens, M)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :N]  # (Bt, N) ties: creation order
    keep = order.sort(dim=1).values  # (Bt, N) creation order: parents before children
    new_index = torch.full((Bt, M + 1), -1, dtype=torch.long, device=scores.device)  # recorded (+1) -> tree index
    new_index[:, 0] = 0  # the root
    new_index.scatter_(1, keep + 1, torch.arange(1, N + 1, device=scores.device).expand(Bt, N))
    kept_parents = new_index.gather(1, parents.gather(1, keep) + 1)  # (Bt, N)
    if bool((kept_parents < 0).any()):
        raise ValueError("re-ranked set is not ancestor-closed: scores must not increase from parent to child")
    zero = torch.zeros(Bt, 1, dtype=torch.long, device=scores.device)
    tree_parents = torch.cat([zero, kept_parents], 1)  # (Bt, N+1)
    attention, depth, paths, leaves = tree_buffers(tree_parents, max_depth)
    return DraftTree(
        tokens=torch.cat([zero - 1, tokens.gather(1, keep)], 1),
        parents=tree_parents,
        scores=torch.cat([zero.to(scores.dtype), scores.gather(1, keep)], 1),
        depth=depth, attention=attention, paths=paths, leaves=leaves,
        greedy=None if greedy is None else torch.cat([root_greedy[:, None], greedy.gather(1, keep)], 1),
    )


# step(tokens (Bt, k), features (Bt, k, h), depth d, ancestors (Bt, k, F) bool over the F nodes fed so far + these k)
#   -> (hidden (Bt, k, h), logq (Bt, k, V)): one batched draft forward over the frontier.
DraftStep = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]


def grow_tree(step: DraftStep, root_logq: Tensor, root_hidden: Tensor, *, top_k: int, depth: int,
              total_tokens: int) -> DraftTree:
    """EAGLE-2/3 ``topK_genrate``: grow ``depth`` levels below the root's top-k, then re-rank.

    Shapes: root_logq (Bt, V) the draft's log-probs at the root, root_hidden (Bt, h) its output hidden state
    (the feature input of the root's children). Records k + depth·k² nodes; keeps ``total_tokens``; the longest
    path has depth + 1 drafted tokens.
    """
    if top_k < 1 or depth < 0 or total_tokens < 1:
        raise ValueError(f"top_k >= 1, depth >= 0 and total_tokens >= 1 expected, got {top_k}, {depth}, {total_tokens}")
    Bt, V = root_logq.shape
    k = min(top_k, V)
    ar = torch.arange(Bt, device=root_logq.device)[:, None]  # (Bt, 1)
    scores, tokens = root_logq.clamp(max=0).topk(k, dim=-1)  # (Bt, k) each
    rec_tokens, rec_scores = [tokens], [scores]
    rec_parents = [torch.full((Bt, k), -1, dtype=torch.long, device=root_logq.device)]
    frontier = torch.arange(k, device=root_logq.device).expand(Bt, k)  # (Bt, k) recorded index of the frontier
    features = root_hidden[:, None].expand(Bt, k, root_hidden.shape[-1])  # (Bt, k, h) the parents' hidden states
    ancestors = torch.eye(k, dtype=torch.bool, device=root_logq.device).expand(Bt, k, k)  # (Bt, k, F=k)
    M = k + depth * k * k
    greedy = torch.full((Bt, M), -1, dtype=torch.long, device=root_logq.device)  # (Bt, M) argmax where expanded
    for d in range(depth):
        hidden, logq = step(tokens, features, d + 1, ancestors)  # (Bt, k, h), (Bt, k, V)
        child_scores, child_tokens = logq.clamp(max=0).topk(k, dim=-1)  # (Bt, k, k)
        greedy.scatter_(1, frontier, child_tokens[..., 0])
        child_scores = scores[..., None] + child_scores  # (Bt, k, k) cumulative
        flat_scores = child_scores.reshape(Bt, k * k)
        base = sum(t.shape[1] for t in rec_tokens)  # recorded index of the first child of this level
        rec_tokens.append(child_tokens.reshape(Bt, k * k))
        rec_scores.append(flat_scores)
        rec_parents.append(frontier[..., None].expand(Bt, k, k).reshape(Bt, k * k))
        scores, best = flat_scores.topk(k, dim=-1)  # (Bt, k) next frontier among the k² children
        parent_slot = best // k  # (Bt, k) which frontier node is the parent
        tokens = child_tokens.reshape(Bt, k * k).gather(1, best)
        features = hidden[ar, parent_slot]  # (Bt, k, h)
        frontier = base + best
        fed = ancestors.shape[-1]
        inherited = ancestors[ar, parent_slot]  # (Bt, k, F) the parent's ancestors (the parent included)
        ancestors = torch.cat([inherited, torch.zeros(Bt, k, k, dtype=torch.bool, device=inherited.device)], -1)
        ancestors[:, torch.arange(k), fed + torch.arange(k)] = True  # (Bt, k, F + k) and itself
    return rerank(torch.cat(rec_tokens, 1), torch.cat(rec_scores, 1), torch.cat(rec_parents, 1), total_tokens,
                  depth + 1, greedy, rec_tokens[0][:, 0])


def longest_accepted(tree: DraftTree, choice: Tensor) -> tuple[Tensor, Tensor]:
    """The branch with the longest accepted prefix when the target's token at every node is ``choice``.

    A drafted node is accepted iff its token equals the target's choice at its parent and its parent is accepted
    (argmax: EAGLE's greedy rule; a sample from p_T: lossless speculative sampling, see decode.py).
    Shapes: choice (Bt, N+1) -> accepted (Bt,) long (drafted tokens accepted, 0..D), path (Bt, D+1) long (the
    best leaf's path; entries 0..accepted are the accepted nodes, root first).
    """
    Bt, n = tree.tokens.shape
    match = tree.tokens == choice.gather(1, tree.parents)  # (Bt, N+1) token matches the target at the parent
    match[:, 0] = True
    on_path = tree.paths >= 0  # (Bt, N+1, D+1)
    path_match = match.gather(1, tree.paths.clamp(min=0).flatten(1)).view_as(tree.paths) & on_path
    run = path_match[..., 1:].long().cumprod(-1).sum(-1)  # (Bt, N+1) leading matches below the root
    run = torch.where(tree.leaves, run, torch.full_like(run, -1))
    accepted, leaf = run.max(dim=1)  # (Bt,), (Bt,) first maximum
    path = tree.paths[torch.arange(Bt, device=choice.device), leaf]  # (Bt, D+1)
    return accepted, path


def greedy_path_kept(tree: DraftTree, full_depth: int) -> tuple[Tensor, Tensor]:
    """Misalignment diagnostics (GTO §1): is the draft's greedy path (top-1 child at every step, ``full_depth``
    tokens) entirely in the tree, and is each node on that path? Shapes -> kept (Bt,) bool, on_greedy (Bt, N+1)."""
    is_greedy = tree.tokens == tree.greedy.gather(1, tree.parents)  # (Bt, N+1) the parent's argmax child
    is_greedy[:, 0] = True
    on_path = tree.paths >= 0
    g = is_greedy.gather(1, tree.paths.clamp(min=0).flatten(1)).view_as(tree.paths) | ~on_path  # (Bt, N+1, D+1)
    on_greedy = g.all(-1)  # (Bt, N+1) every node on the root->i path is its parent's argmax
    kept = (on_greedy & (tree.depth >= full_depth)).any(1)
    return kept, on_greedy
