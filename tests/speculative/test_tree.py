"""Draft tree buffers against hand-built trees; dynamic growth against a plain-loop EAGLE-2 reference."""

from __future__ import annotations

import pytest
import torch

from speculative.tree import DraftTree, grow_tree, longest_accepted, rerank, tree_buffers

# Hand-built tree:          0 (root)
#                         /    \
#                        1      2
#                       / \
#                      3   4
#                      |
#                      5
PARENTS = torch.tensor([[0, 0, 0, 1, 1, 3]])


def hand_tree(tokens: list[int]) -> DraftTree:
    attention, depth, paths, leaves = tree_buffers(PARENTS, max_depth=3)
    return DraftTree(torch.tensor([tokens]), PARENTS, torch.zeros(1, 6), depth, attention, paths, leaves)


def test_mask_positions_and_retrieve_indices_of_a_hand_built_tree():
    attention, depth, paths, leaves = tree_buffers(PARENTS, max_depth=3)
    expected_mask = torch.tensor([  # row i: the root, i's ancestors and i itself
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(attention[0], expected_mask)
    assert depth[0].tolist() == [0, 1, 1, 2, 2, 3]  # position ids = prefix length + depth
    assert leaves[0].tolist() == [False, False, True, False, True, True]
    retrieve = paths[0][leaves[0]]  # EAGLE's retrieve indices: one row per leaf, root first, -1 padded
    assert retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]


def test_parents_must_point_backwards():
    with pytest.raises(ValueError, match="parents must point to an earlier node"):
        tree_buffers(torch.tensor([[0, 2, 0]]), max_depth=2)
    with pytest.raises(ValueError, match="parents must be a"):
        tree_buffers(torch.tensor([0, 0, 1]), max_depth=2)


def test_longest_accepted_follows_the_target_choice():
    tree = hand_tree([-1, 7, 8, 9, 4, 5])
    # target's token at each node: root -> 7 (node 1 accepted), node 1 -> 9 (node 3 accepted, node 4 not),
    # node 3 -> 1 (node 5's token 5 rejected): 2 drafted tokens accepted along 0 -> 1 -> 3, bonus = 1
    choice = torch.tensor([[7, 9, 0, 1, 0, 0]])
    accepted, path = longest_accepted(tree, choice)
    assert accepted.tolist() == [2] and path[0, :3].tolist() == [0, 1, 3]
    # nothing matches at the root: 0 accepted, the bonus is the root's choice
    accepted, path = longest_accepted(tree, torch.tensor([[3, 9, 0, 1, 0, 0]]))
    assert accepted.tolist() == [0] and path[0, 0] == 0


def test_rerank_keeps_ancestors_on_ties_and_renumbers_parents():
    # recorded (creation order): a = root child (-0.1), b = root child (-0.5), c = child of a with log q = 0 (-0.1,
    # a tie with its parent), d = child of b (-2.0). Keeping 3: a, c (tie: a first by creation), b.
    tokens = torch.tensor([[10, 11, 12, 13]])
    scores = torch.tensor([[-0.1, -0.5, -0.1, -2.0]])
    parents = torch.tensor([[-1, -1, 0, 1]])
    tree = rerank(tokens, scores, parents, total_tokens=3, max_depth=2)
    assert tree.tokens[0, 1:].tolist() == [10, 11, 12]  # creation order
    assert tree.parents[0].tolist() == [0, 0, 0, 1]  # c's parent a is tree node 1
    assert tree.depth[0].tolist() == [0, 1, 1, 2]


def reference_topk_generate(logq_table: torch.Tensor, root_logq: torch.Tensor, k: int, depth: int, total: int):
    """EAGLE-2's topK_genrate as a plain loop over nodes (the independent reference): node log q depends only on
    the node's token here (logq_table[token]). Returns the set of kept paths (tuples of tokens)."""
    recorded = []  # (score, path)
    frontier = []
    for tok in sorted(range(len(root_logq)), key=lambda t: -float(root_logq[t]))[:k]:
        s = float(root_logq[tok])
        recorded.append((s, (tok,)))
        frontier.append((s, (tok,)))
    for _ in range(depth):
        children = []
        for s, path in frontier:
            row = logq_table[path[-1]]
            for tok in sorted(range(len(row)), key=lambda t: -float(row[t]))[:k]:
                children.append((s + float(row[tok]), path + (tok,)))
        recorded.extend(children)
        frontier = sorted(children, key=lambda c: -c[0])[:k]
    kept = sorted(recorded, key=lambda c: -c[0])[:total]
    return {p for _, p in kept}


@pytest.mark.parametrize("k,depth,total", [(1, 0, 1), (2, 2, 5), (3, 3, 12), (4, 2, 30)])
def test_grow_tree_matches_a_plain_loop_reference(k, depth, total):
    g = torch.Generator().manual_seed(k * 10 + depth)
    V = 7
    logq_table = torch.randn(V, V, generator=g).mul(2).log_softmax(-1)  # distinct values: no ties
    root_logq = torch.randn(1, V, generator=g).mul(2).log_softmax(-1)

    def step(tokens, features, d, ancestors):  # log q of a node's children depends only on its token
        assert ancestors.shape[:2] == tokens.shape and ancestors.shape[-1] == k * d
        assert bool(ancestors[..., -k:].diagonal(dim1=-2, dim2=-1).all())  # each frontier node sees itself
        return features, logq_table[tokens]

    tree = grow_tree(step, root_logq, torch.zeros(1, 3), top_k=k, depth=depth, total_tokens=total)
    kept = set()
    for i in range(1, tree.num_nodes):
        path = tree.paths[0, i]
        kept.add(tuple(int(tree.tokens[0, j]) for j in path[1:] if j >= 0))
    assert kept == reference_topk_generate(logq_table, root_logq[0], k, depth, total)
    assert tree.num_nodes == 1 + min(total, k + depth * k * k)
    # ancestor-closed and scores never increase along a path
    assert bool((tree.scores[0, 1:] <= tree.scores[0, tree.parents[0, 1:]] + 1e-6).all())


def test_grow_tree_rejects_bad_sizes():
    with pytest.raises(ValueError, match="top_k >= 1"):
        grow_tree(lambda *a: None, torch.zeros(1, 4), torch.zeros(1, 2), top_k=0, depth=1, total_tokens=4)
