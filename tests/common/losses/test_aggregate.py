"""Loss aggregation (common/losses/aggregate.py): the four modes by hand and by a plain loop, empty
completions, and micro-batch invariance of value and gradient under a global Normaliser."""

import pytest
import torch

from common.losses.aggregate import AGGREGATIONS, Normaliser, aggregate

# ---------------------------------------------------------------------------------------------- helpers

SPLITS = {"ones": [1] * 6, "twos": [2, 2, 2], "uneven": [1, 3, 2], "whole": [6]}  # micro-batch sizes, B = 6


def loop_aggregate(per_token: list[list[float]], mask: list[list[bool]], mode: str, max_len: int) -> float:
    """Plain-Python reference of the module docstring's four formulas."""
    lengths = [sum(row) for row in mask]
    sums = [sum(v for v, m in zip(vals, row) if m) for vals, row in zip(per_token, mask)]
    if mode == "token_mean":
        return sum(sums) / max(sum(lengths), 1)
    per_seq = []
    for s, n in zip(sums, lengths):
        if n == 0:
            continue  # an empty completion is not a sequence of the mean
        per_seq.append(
            {"seq_mean_token_mean": s / n, "seq_mean_token_sum": s, "seq_mean_token_sum_norm": s / max_len}[mode]
        )
    return sum(per_seq) / max(len(per_seq), 1)


def random_case(seed: int, B: int = 6, T: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token (B, T) float64 and a right-padded mask with unequal lengths, one of them 0."""
    generator = torch.Generator().manual_seed(seed)
    per_token = torch.randn(B, T, dtype=torch.float64, generator=generator)
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    lengths[seed % B] = 0  # an empty completion somewhere
    lengths[(seed + 1) % B] = T  # and a full one
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return per_token, mask


def micro_slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


# ------------------------------------------------------------------------------------------ hand cases

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[True, True, False], [True, True, True]])  # L = [2, 3]


@pytest.mark.parametrize(
    "mode, max_len, expected",
    [
        ("token_mean", None, 18 / 5),  # (1 + 2 + 4 + 5 + 6) / 5 = 3.6
        ("seq_mean_token_mean", None, 3.25),  # (3/2 + 15/3) / 2 = (1.5 + 5) / 2
        ("seq_mean_token_sum", None, 9.0),  # (3 + 15) / 2
        ("seq_mean_token_sum_norm", None, 3.0),  # T_max defaults to T = 3: (3/3 + 15/3) / 2 = (1 + 5) / 2
        ("seq_mean_token_sum_norm", 4, 2.25),  # T_max = 4: (3/4 + 15/4) / 2 = 18/8
    ],
)
def test_hand_computed(mode: str, max_len, expected: float) -> None:
    out = aggregate(PER_TOKEN, MASK, mode, Normaliser.of(MASK, max_len))
    assert out.shape == ()
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_default_normaliser_is_the_batch_itself(mode: str) -> None:
    torch.testing.assert_close(aggregate(PER_TOKEN, MASK, mode), aggregate(PER_TOKEN, MASK, mode, Normaliser.of(MASK)))


@pytest.mark.parametrize(
    "mode, expected",
    [("token_mean", 3.6), ("seq_mean_token_mean", 3.25), ("seq_mean_token_sum", 9.0), ("seq_mean_token_sum_norm", 3.0)],
)
def test_empty_completion_is_excluded(mode: str, expected: float) -> None:
    # A third row with L = 0 and garbage (even NaN) values: same results as the hand case above (B' stays 2).
    per_token = torch.cat([PER_TOKEN, torch.tensor([[100.0, float("nan"), -7.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    out = aggregate(per_token, mask, mode)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_all_empty_mask_gives_zero_not_nan(mode: str) -> None:
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert aggregate(PER_TOKEN, mask, mode).item() == 0.0


def test_normaliser_counts() -> None:
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    norm = Normaliser.of(mask, max_len=8)
    assert norm.num_tokens.item() == 5.0  # 2 + 0 + 3
    assert norm.num_sequences.item() == 2.0  # the empty row does not count
    assert norm.max_len == 8
    assert Normaliser.of(mask).max_len == 3  # defaults to T


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("seed", range(4))
def test_equals_plain_loop(mode: str, seed: int) -> None:
    per_token, mask = random_case(seed)
    got = aggregate(per_token, mask, mode, Normaliser.of(mask, max_len=7))
    expected = loop_aggregate(per_token.tolist(), mask.tolist(), mode, max_len=7)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------- micro-batch invariance


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("seed", range(2))
def test_micro_batches_sum_to_full_batch_value_and_gradient(mode: str, split: str, seed: int) -> None:
    per_token, mask = random_case(seed)
    norm = Normaliser.of(mask, max_len=7)  # computed once on the whole optimiser batch

    full_leaf = per_token.clone().requires_grad_(True)
    full = aggregate(full_leaf, mask, mode, norm)
    full.backward()

    micro_leaf = per_token.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for rows in micro_slices(SPLITS[split]):
        micro = aggregate(micro_leaf[rows], mask[rows], mode, norm)
        micro.backward()  # gradient accumulation, as Lightning does it
        total = total + micro.detach()

    torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_leaf.grad, full_leaf.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum"])
def test_per_micro_batch_normaliser_would_differ(mode: str) -> None:
    # Control: the invariance above is not trivially true; a local normaliser per micro-batch changes the sum.
    per_token, mask = random_case(0)
    full = aggregate(per_token, mask, mode)
    local = sum(aggregate(per_token[rows], mask[rows], mode) for rows in micro_slices(SPLITS["uneven"]))
    assert abs(float(local) - float(full)) > 1e-3


def test_gradient_of_token_mean_is_mask_over_token_count() -> None:
    leaf = PER_TOKEN.clone().requires_grad_(True)
    aggregate(leaf, MASK, "token_mean").backward()
    torch.testing.assert_close(leaf.grad, MASK.float() / 5, rtol=0, atol=1e-7)  # d/dℓ_it = m_it / Σm


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_mode_raises_listing_choices() -> None:
    with pytest.raises(ValueError, match=r"aggregation must be one of .*token_mean.*got 'mean'"):
        aggregate(PER_TOKEN, MASK, "mean")


def test_shape_mismatch_raises_naming_both() -> None:
    with pytest.raises(ValueError, match=r"per_token \(2, 3\) and mask \(2, 2\)"):
        aggregate(PER_TOKEN, MASK[:, :2], "token_mean")


def test_normaliser_requires_2d_mask() -> None:
    with pytest.raises(ValueError, match=r"mask must be \(B, T\)"):
        Normaliser.of(torch.ones(3, dtype=torch.bool))
