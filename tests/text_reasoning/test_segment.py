"""SPO-chain and SPO-tree as method parts (common/methods/segment_po.py) of the text-reasoning module on a tiny real
policy with real generation: prefixes are kept in the scored text, continuations stay within the budget, Monte-Carlo values
match an independent recount, tree values are means of their children's rewards recomputed from the texts."""

from __future__ import annotations

import pytest
import torch

from common.advantages.segment import SPOChain, SPOTree, cut_starts
from common.methods.segment_po import SegmentChain, SegmentTree, left_pack, right_pack
from common.models import TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling
from helpers import DIGITS, digit_prompts
from text_reasoning.module import TextReasoningModule

T = 6


class FirstDigitAndLength(RewardFunction):
    """first digit / 10, plus 100 if the completion is longer than the budget T (which must never happen)."""

    name = "first_digit"

    def __call__(self, completions, samples):
        return torch.tensor([(int(c[0]) / 10 if c[:1].isdigit() else 0.0) + 100.0 * (len(c) > T) for c in completions])


def policy():
    return TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet=DIGITS, seed=0)


def test_left_and_right_pack_keep_token_order() -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[True, False, True, False]])
    assert [t.tolist() for t in left_pack(ids, mask, 0)] == [[[0, 0, 5, 7]], [[False, False, True, True]]]
    assert [t.tolist() for t in right_pack(ids, mask, 0)] == [[[5, 7, 0, 0]], [[True, True, False, False]]]


def test_prefix_values_keep_the_prefix_and_the_budget() -> None:
    torch.manual_seed(0)
    reward = FirstDigitAndLength()
    chain = SegmentChain()
    module = TextReasoningModule(policy=policy(), rewards=[reward], verifier=reward, sampling=Sampling(max_new_tokens=T),
                                 group_size=4, log_samples_every=0, advantage=SPOChain(interval=2, num_samples=3),
                                 methods=[chain])
    batch = module.score(module.loop.rollout(digit_prompts(2)))
    starts = cut_starts(module.loop.logprobs(batch).exp(), batch.completion_mask, interval=2)
    assert starts.any() and starts[:, 1:].any()
    values = chain.prefix_values(module.loop, batch, starts, 3)
    assert (values < 100).all()  # no scored text is longer than the budget T (prefix + continuation)
    assert (values[~starts] == 0).all()
    # a cut after token 0 keeps y_0, so the first-digit reward of every continuation is the sampled one's
    for i, s in starts[:, 1:].nonzero().tolist():
        first = batch.completions[i][:1]
        assert float(values[i, s + 1]) == pytest.approx(int(first) / 10 if first.isdigit() else 0.0)


def test_spo_chain_advantages_live_on_the_probability_mask_only() -> None:
    torch.manual_seed(1)
    reward = FirstDigitAndLength()
    chain = SegmentChain()
    module = TextReasoningModule(policy=policy(), rewards=[reward], verifier=reward, sampling=Sampling(max_new_tokens=T),
                                 group_size=4, log_samples_every=0,
                                 advantage=SPOChain(threshold=0.07, interval=1, num_samples=2), methods=[chain])
    batch = chain.after_score(module.loop, module.score(module.loop.rollout(digit_prompts(2))))
    assert batch.segment_starts.equal(module.advantage.starts(batch.old_logprobs, batch.completion_mask))
    assert (batch.prefix_values[~batch.segment_starts] == 0).all()
    A = module.advantage(batch)  # a pure function of the batch's declared fields
    keep = batch.completion_mask & (module.loop.logprobs(batch).exp() < 0.07)
    assert A.shape == batch.completion_mask.shape and torch.isfinite(A).all()
    assert (A[~keep] == 0).all() and (A[keep] != 0).any()


def test_tree_edges_values_are_means_of_their_leaves() -> None:
    """Branching (2, 3), 2-token inner segments: every level-1 group has 3 children whose prompt is the original
    prompt plus one level-0 edge's segment; V(leaf) = reward of the full text and V(inner) = mean of its children,
    recomputed here from the decoded texts with the reward function itself."""
    torch.manual_seed(2)
    reward = FirstDigitAndLength()
    module = TextReasoningModule(policy=policy(), rewards=[reward], verifier=reward, sampling=Sampling(max_new_tokens=T),
                                 log_samples_every=0, advantage=SPOTree(),
                                 methods=[SegmentTree(branching=(2, 3), segment_tokens=2)])
    edges = module.loop.rollout(digit_prompts(2))
    torch.testing.assert_close(edges.old_logprobs, module.loop.logprobs(edges), rtol=0, atol=0)

    def tokens(ids, mask):
        return ids[mask].tolist()

    assert (edges.completion_mask[:4].sum(1) <= 2).all()  # level 0: 2 prompts x 2 children of <= 2 tokens
    children: dict[int, list[int]] = {}
    for g in edges.group_ids[4:].unique().tolist():
        kids = (edges.group_ids == g).nonzero()[:, 0].tolist()
        assert len(kids) == 3
        prompt = tokens(edges.prompt_ids[kids[0]], edges.prompt_mask[kids[0]])
        parent = [e for e in range(4) if tokens(edges.prompt_ids[e], edges.prompt_mask[e])
                  + tokens(edges.completion_ids[e], edges.completion_mask[e]) == prompt]
        assert len(parent) == 1
        children[parent[0]] = kids
    assert children, "no level-0 segment was expanded"
    for e in range(4):
        if e in children:  # inner: mean over its 3 leaves of the reward of the full text
            leaf = [float(reward([edges.completions[e] + edges.completions[k]], [{}])[0]) for k in children[e]]
            assert edges.rewards[children[e]].tolist() == pytest.approx(leaf)
            assert float(edges.rewards[e]) == pytest.approx(sum(leaf) / 3)
        else:  # ended within its segment: a leaf
            assert float(edges.rewards[e]) == pytest.approx(float(reward([edges.completions[e]], [{}])[0]))
    A, keep = module.advantage(edges)
    assert torch.isfinite(A).all() and (A[~keep] == 0).all()
    raw = edges.rewards - torch.zeros(edges.batch_size).index_add_(0, edges.group_ids, edges.rewards)[edges.group_ids] / \
        torch.zeros(edges.batch_size).index_add_(0, edges.group_ids, torch.ones(edges.batch_size))[edges.group_ids]
    assert keep.tolist() == (raw.abs() > 1e-6).tolist()  # kept edges are those with V(child) ≠ V(parent)


def test_tree_and_chain_reject_bad_settings() -> None:
    reward = FirstDigitAndLength()
    with pytest.raises(ValueError, match="must exceed"):
        TextReasoningModule(policy=policy(), rewards=[reward], sampling=Sampling(max_new_tokens=4), advantage=SPOTree(),
                            methods=[SegmentTree(branching=(2, 2), segment_tokens=4)])
    with pytest.raises(ValueError, match="branching must be"):
        TextReasoningModule(policy=policy(), rewards=[reward], sampling=Sampling(max_new_tokens=8), advantage=SPOTree(),
                            methods=[SegmentTree(branching=(2, 0), segment_tokens=2)])
    with pytest.raises(ValueError, match="advantage must be"):
        TextReasoningModule(policy=policy(), rewards=[reward], sampling=Sampling(max_new_tokens=8),
                            methods=[SegmentTree(branching=(2,), segment_tokens=2)])
    with pytest.raises(ValueError, match="SegmentChain needs advantage"):
        TextReasoningModule(policy=policy(), rewards=[reward], methods=[SegmentChain()])
    # the estimators declare the fields the methods fill: without the method the run stops at start-up
    with pytest.raises(ValueError, match="SPOChain requires RolloutBatch.segment_starts"):
        TextReasoningModule(policy=policy(), rewards=[reward], advantage=SPOChain())
    with pytest.raises(ValueError, match="SPOTree requires RolloutBatch.old_logprobs"):
        TextReasoningModule(policy=policy(), rewards=[reward], advantage=SPOTree())


def test_prefix_values_when_every_completion_ended_early() -> None:
    """A batch whose completions all stopped before max_new_tokens is narrower (T' < T) than a continuation from an
    early cut (T - s): the budget mask spans the continuation's width, not the batch's (a shape error before)."""
    torch.manual_seed(0)
    reward = FirstDigitAndLength()
    chain = SegmentChain()
    module = TextReasoningModule(policy=policy(), rewards=[reward], verifier=reward, sampling=Sampling(max_new_tokens=T),
                                 group_size=2, log_samples_every=0, advantage=SPOChain(interval=2, num_samples=2),
                                 methods=[chain])
    batch = module.loop.rollout(digit_prompts(1))
    narrow = batch.replace(completion_ids=batch.completion_ids[:, :2], completion_mask=torch.ones_like(batch.completion_ids[:, :2], dtype=torch.bool))
    starts = torch.zeros(narrow.completion_ids.shape, dtype=torch.bool)
    starts[:, 1] = True  # cut after y_0: continuations of up to T - 1 = 5 tokens, wider than T' = 2
    values = chain.prefix_values(module.loop, narrow, starts, 2)
    assert (values[:, 1] < 100).all() and (values[:, 0] == 0).all()
