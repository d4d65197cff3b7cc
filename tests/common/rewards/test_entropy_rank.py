"""R³'s SERR (common/rewards/entropy_rank.py): the spec's 4-response ranking by hand, peak/global entropy by hand,
a plain-loop reference on random groups, which rows are ranked, degenerate and bad input."""

import pytest
import torch

from common.rewards.entropy_rank import SERR, entropy_structure, serr_rewards


def test_spec_example_dominance_counts_and_rank_rewards() -> None:
    # (E_peak, E_global) = (3,1), (2,2), (1,3), (2.5,0.5): S = (2, 1, 0, 2); stable ranks (0, 2, 3, 1);
    # R = R_max (1 - rank/3) = R_max (1, 1/3, 0, 2/3)
    peak, glob = torch.tensor([3.0, 2.0, 1.0, 2.5]), torch.tensor([1.0, 2.0, 3.0, 0.5])
    r = serr_rewards(peak, glob, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), r_max=0.3)
    torch.testing.assert_close(r, torch.tensor([0.3, 0.1, 0.0, 0.2]))


def test_peak_and_global_entropy_by_hand() -> None:
    H = torch.tensor([[1.0, 4.0, 2.0, 3.0, 9.0], [5.0, 1.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    peak, glob = entropy_structure(H, m, p=0.5)
    # row 0: L = 4, k = 2, top-2 of (1, 4, 2, 3) = (4, 3) -> 3.5; mean 2.5 (the masked 9 never counts)
    # row 1: L = 2, k = 1 -> 5; mean 3.  row 2: empty -> 0, 0
    torch.testing.assert_close(peak, torch.tensor([3.5, 5.0, 0.0]))
    torch.testing.assert_close(glob, torch.tensor([2.5, 3.0, 0.0]))


def test_matches_a_plain_loop_reference_on_random_groups() -> None:
    g = torch.Generator().manual_seed(0)
    B = 23
    peak, glob = torch.rand(B, generator=g).round(decimals=1), torch.rand(B, generator=g).round(decimals=1)
    gids = torch.randint(0, 4, (B,), generator=g)
    ranked = torch.rand(B, generator=g) < 0.7
    got = serr_rewards(peak, glob, gids, ranked, r_max=1.0)
    expected = torch.zeros(B)
    for grp in range(4):
        rows = [i for i in range(B) if gids[i] == grp and ranked[i]]
        S = {i: sum(1 for j in rows if j != i and peak[i] > peak[j] and glob[i] < glob[j]) for i in rows}
        order = sorted(rows, key=lambda i: (-S[i], i))
        for rank, i in enumerate(order):
            expected[i] = 1.0 if len(rows) == 1 else 1.0 - rank / (len(rows) - 1)
    torch.testing.assert_close(got, expected)


def test_only_truncated_rows_of_all_wrong_groups_are_rescored() -> None:
    serr = SERR(p=0.5, r_max=0.2)
    gids = torch.tensor([0, 0, 1, 1, 2])
    correct = torch.tensor([False, False, True, False, False])
    truncated = torch.tensor([True, True, True, True, False])
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    H = torch.tensor([[2.0, 0.1], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    out = serr(rewards, correct, truncated, gids, H, torch.ones(5, 2, dtype=torch.bool))
    # group 0: row 0 (peak 2, global 1.05) dominates row 1 (peak 1, global 1) ? 2 > 1 but 1.05 > 1: no -> S = (0, 0),
    # stable order -> R = (0.2, 0). Group 1 has a correct row; group 2's row finished (not truncated): unchanged.
    torch.testing.assert_close(out, torch.tensor([0.2, 0.0, 1.0, 0.0, 0.0]))
    one = serr(torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long),
               torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert one.tolist() == [pytest.approx(0.2)]  # N = 1 -> R_max, and an empty completion gives no NaN


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        SERR(p=0.0)
    with pytest.raises(ValueError, match="r_max must be >= 0"):
        SERR(r_max=-1.0)
    with pytest.raises(ValueError, match="must have the same shape"):
        entropy_structure(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), p=0.5)
