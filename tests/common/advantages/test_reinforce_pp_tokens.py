"""REINFORCE++-baseline whitens over tokens (arXiv 2501.03262, eq. 10): the paper normalises A_{q,o_t} over every
valid token of the batch, so each row weighs its length. Checked against the hand example of issue 17, a plain
loop over the expanded token list, and the estimator class reading the batch's loss mask."""

import statistics

import pytest
import torch

from common.advantages.group import ReinforcePP, reinforce_pp
from common.batch import RolloutBatch

EPS = 1e-6


def ref_token_whitened(ids: list[int], rewards: list[float], lengths: list[int]) -> list[float]:
    """Plain loop: group-centre each reward, write it on each of the row's tokens, whiten the token list (ddof 1,
    as verl's masked_whiten), and read each row's value back."""
    groups: dict[int, list[float]] = {}
    for g, r in zip(ids, rewards):
        groups.setdefault(g, []).append(r)
    centred = [r - statistics.fmean(groups[g]) for g, r in zip(ids, rewards)]
    tokens = [c for c, n in zip(centred, lengths) for _ in range(n)]  # one entry per valid token
    if len(tokens) < 2 or len(set(tokens)) == 1:
        return [0.0] * len(rewards)
    m, s = statistics.fmean(tokens), statistics.stdev(tokens)
    return [(c - m) / (s + EPS) for c in centred]


def test_hand_example_from_the_issue() -> None:
    # rewards [1, 0] in one group, lengths [1, 3]: A' = [0.5, -0.5]; tokens [0.5, -0.5, -0.5, -0.5]
    # m = -0.25, s² = (0.75² + 3 · 0.25²) / 3 = 0.25, s = 0.5  ->  A = [0.75 / 0.5, -0.25 / 0.5] = [1.5, -0.5]
    r, g = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0])
    out = reinforce_pp(r, g, torch.tensor([1, 3]), eps=0.0)
    assert out.tolist() == [1.5, -0.5]
    # per sequence (lengths None): A' = ±0.5, s = sqrt(0.5) -> ±1/sqrt(2)
    torch.testing.assert_close(reinforce_pp(r, g, eps=0.0), torch.tensor([2**-0.5, -(2**-0.5)], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
def test_matches_plain_loop_over_tokens(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    B = 12
    g = torch.randint(0, 4, (B,), generator=gen)
    r = torch.randint(0, 3, (B,), generator=gen).double() * 0.5  # ties within groups, some all-equal groups
    lengths = torch.randint(0, 9, (B,), generator=gen)  # includes empty rows
    expected = torch.tensor(ref_token_whitened(g.tolist(), r.tolist(), lengths.tolist()), dtype=torch.float64)
    torch.testing.assert_close(reinforce_pp(r, g, lengths), expected, rtol=0, atol=1e-12)


def test_long_rows_weigh_more_than_short_ones() -> None:
    # Same rewards, lengths swapped: the token mean moves towards the long row's A', so the long row's |A| shrinks.
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    long_wrong = reinforce_pp(r, g, torch.tensor([1, 9]))
    long_right = reinforce_pp(r, g, torch.tensor([9, 1]))
    assert long_wrong[0] > -long_wrong[1] > 0 and -long_right[1] > long_right[0] > 0


def test_degenerate_inputs_give_zeros() -> None:
    g = torch.tensor([0, 0, 1, 1])
    assert reinforce_pp(torch.full((4,), 0.1), g, torch.tensor([1, 3, 2, 5]), eps=0.0).tolist() == [0.0] * 4
    r = torch.tensor([1.0, 0.0, 0.3, 0.3])
    assert reinforce_pp(r, g, torch.zeros(4, dtype=torch.long)).tolist() == [0.0] * 4  # no tokens at all
    assert reinforce_pp(r, g, torch.tensor([1, 0, 0, 0])).tolist() == [0.0] * 4  # one token
    # only group 1 (all equal) has tokens: every counted A' is equal -> zeros, not NaN, even with eps = 0
    assert reinforce_pp(r, g, torch.tensor([0, 0, 2, 3]), eps=0.0).tolist() == [0.0] * 4


@pytest.mark.parametrize("lengths, match", [(torch.tensor([1, 2, 3]), "lengths must have shape"),
                                            (torch.tensor([1, -2]), "lengths must be finite"),
                                            (torch.tensor([1.0, float("nan")]), "lengths must be finite")])
def test_bad_lengths_raise(lengths: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), lengths)


def test_class_weights_rows_by_their_loss_tokens() -> None:
    # completion lengths [1, 3, 2, 2]; the second row's last two tokens were written by a tool (env_mask), so it
    # counts 1 token in the loss and the batch's token weights are [1, 1, 2, 2].
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    env = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    r, g = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    batch = RolloutBatch(completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=mask, group_ids=g, rewards=r,
                         env_mask=env)
    expected = torch.tensor(ref_token_whitened(g.tolist(), r.tolist(), [1, 1, 2, 2]), dtype=torch.float64)
    torch.testing.assert_close(ReinforcePP()(batch), expected, rtol=0, atol=1e-12)
