"""Group and mask primitives (common/ops.py) against plain Python loops over a dict of lists."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ops import (
    group_count,
    group_max,
    group_mean,
    group_median,
    group_min,
    group_std,
    group_sum,
    masked_mean,
    masked_sum,
)

# ---------------------------------------------------------------------------------------------- helpers


def by_group(ids: list[int], values: list[float], num_groups: int) -> dict[int, list[float]]:
    """{k: [values of group k in row order]} for every slot k in [0, num_groups), empty slots included."""
    groups: dict[int, list[float]] = {k: [] for k in range(num_groups)}
    for g, v in zip(ids, values):  # ok: the reference is a plain loop on purpose
        groups[g].append(v)
    return groups


def loop_reference(stat, ids: list[int], values: list[float], num_groups: int) -> torch.Tensor:
    """``stat`` applied to each group's list; 0.0 for an empty slot (the documented fill value)."""
    groups = by_group(ids, values, num_groups)
    return torch.tensor([stat(groups[k]) if groups[k] else 0.0 for k in range(num_groups)], dtype=torch.float64)


def pstdev_or_zero(xs: list[float]) -> float:
    return statistics.pstdev(xs)


def stdev_or_zero(xs: list[float]) -> float:  # ddof=1: a group of one has no spread estimate -> 0
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


REFERENCES = {
    "sum": (lambda x, g, n: group_sum(x, g, n), lambda xs: sum(xs)),
    "count": (lambda x, g, n: group_count(g, n, x.dtype), lambda xs: float(len(xs))),
    "mean": (lambda x, g, n: group_mean(x, g, n), statistics.fmean),
    "std_ddof1": (lambda x, g, n: group_std(x, g, n, ddof=1), stdev_or_zero),
    "std_ddof0": (lambda x, g, n: group_std(x, g, n, ddof=0), pstdev_or_zero),
    "max": (lambda x, g, n: group_max(x, g, n), max),
    "min": (lambda x, g, n: group_min(x, g, n), min),
    "median": (lambda x, g, n: group_median(x, g, n), statistics.median),  # even group: mean of two middles
}


@st.composite
def grouped_values(draw, max_b: int = 24):
    """Random unequal, interleaved groups: ids drawn per row (so members are scattered and some slots are
    empty), plus up to 3 trailing empty slots (num_groups > number of groups)."""
    b = draw(st.integers(1, max_b))
    k = draw(st.integers(1, b))
    ids = draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b))
    values = draw(
        st.lists(st.floats(-100, 100, allow_nan=False, allow_subnormal=False), min_size=b, max_size=b)
    )
    return ids, values, k + draw(st.integers(0, 3))


def shuffled_groups(sizes: list[int], seed: int) -> torch.Tensor:
    """group_ids (B,) with group k of size sizes[k], rows randomly permuted (non-contiguous groups)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(len(ids), generator=generator)]


# ------------------------------------------------------------------------------------ loop references


@pytest.mark.parametrize("name", list(REFERENCES))
@settings(max_examples=50, deadline=None)
@given(case=grouped_values())
def test_group_reduction_equals_plain_loop(name: str, case) -> None:
    ids, values, num_groups = case
    op, stat = REFERENCES[name]
    got = op(torch.tensor(values, dtype=torch.float64), torch.tensor(ids), num_groups)
    torch.testing.assert_close(got, loop_reference(stat, ids, values, num_groups), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("seed", range(3))
def test_group_reduction_on_shuffled_unequal_groups_float32(name: str, seed: int) -> None:
    ids = shuffled_groups([1, 2, 3, 5, 8, 4], seed)  # B = 23, six groups of unequal size, interleaved
    values = torch.randn(len(ids), generator=torch.Generator().manual_seed(100 + seed))
    op, stat = REFERENCES[name]
    got = op(values, ids, None)  # num_groups defaults to B = 23: slots 6..22 are empty
    expected = loop_reference(stat, ids.tolist(), values.double().tolist(), len(ids)).float()
    assert got.shape == (23,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ hand cases


def test_group_std_ddof1_and_ddof0_hand_computed() -> None:
    x = torch.tensor([1.0, 10.0, 0.0, 20.0, 0.0, 0.0])  # group 0 = [1, 0, 0, 0] at rows 0, 2, 4, 5
    g = torch.tensor([0, 1, 0, 1, 0, 0])  # group 1 = [10, 20]
    # group 0: μ = 0.25, Σ(x−μ)² = 0.5625 + 3·0.0625 = 0.75 -> ddof=1: sqrt(0.75/3) = 0.5; ddof=0: sqrt(0.75/4)
    # group 1: μ = 15, Σ(x−μ)² = 50 -> ddof=1: sqrt(50) ; ddof=0: sqrt(25) = 5
    torch.testing.assert_close(group_std(x, g, 2), torch.tensor([0.5, 50**0.5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(group_std(x, g, 2, ddof=0), torch.tensor([0.75**0.5 / 2, 5.0]), rtol=0, atol=1e-6)


def test_groups_of_one() -> None:
    x = torch.tensor([3.0, -2.0, 7.0])
    g = torch.tensor([2, 0, 1])  # three groups of one, not in row order
    torch.testing.assert_close(group_mean(x, g), torch.tensor([-2.0, 7.0, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(group_median(x, g), torch.tensor([-2.0, 7.0, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(group_max(x, g), torch.tensor([-2.0, 7.0, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(group_min(x, g), torch.tensor([-2.0, 7.0, 3.0]), rtol=0, atol=0)
    assert group_std(x, g).tolist() == [0.0, 0.0, 0.0]  # ddof=1 with n=1: no estimate -> 0, not NaN
    assert group_std(x, g, ddof=0).tolist() == [0.0, 0.0, 0.0]  # one value has no spread


def test_empty_slots_hold_zero() -> None:
    x = torch.tensor([-5.0, -1.0, -3.0])  # all negative, so a 0 in max() cannot come from the data
    g = torch.tensor([1, 1, 1])  # slots 0, 2, 3, 4 empty
    for op in (group_sum, group_mean, group_std, group_max, group_min, group_median):
        out = op(x, g, 5)
        assert out.shape == (5,)
        assert out[[0, 2, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0], op.__name__
    assert group_count(g, 5).tolist() == [0.0, 3.0, 0.0, 0.0, 0.0]
    assert group_max(x, g, 5)[1].item() == -1.0 and group_min(x, g, 5)[1].item() == -5.0


def test_group_median_odd_and_even_groups() -> None:
    x = torch.tensor([5.0, 1.0, 3.0, 10.0, 2.0, 7.0, 4.0])
    g = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    # group 0 = [5, 3, 2] -> sorted [2, 3, 5] -> 3
    # group 1 = [1, 10, 7, 4] -> sorted [1, 4, 7, 10] -> (4 + 7) / 2 = 5.5 (torch.median would say 4)
    assert group_median(x, g, 2).tolist() == [3.0, 5.5]


def test_group_median_with_ties_and_negative_values() -> None:
    x = torch.tensor([-1.0, 2.0, -1.0, 2.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0 sorted [-1, -1, 2, 2] -> (-1 + 2) / 2 = 0.5; group 1 = [0, 0] -> 0
    assert group_median(x, g, 2).tolist() == [0.5, 0.0]


@pytest.mark.parametrize("value", [0.1, 1e6 + 0.3, 3e7])
@pytest.mark.parametrize("n", [3, 7])
def test_equal_values_give_std_exactly_zero(value: float, n: int) -> None:
    # The docstring promises "large equal values give exactly 0, not rounding noise". In float32,
    # 7 x 0.1 sums to 0.70000005 and /7 is not 0.1, so centring on that mean leaves ~1e-8 per row.
    x = torch.full((n,), value)  # float32
    g = torch.zeros(n, dtype=torch.long)
    assert group_std(x, g, 1).item() == 0.0
    assert group_std(x, g, 1, ddof=0).item() == 0.0


# --------------------------------------------------------------------------------------------- masked


def test_masked_sum_and_mean_ignore_nan_and_inf_outside_mask() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, -float("inf")]], requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, False]])
    # Σ over mask = 1 + 2 + 4 = 7 ; mean = 7 / 3 ; per row: [3, 4] and [1.5, 4]
    assert masked_sum(x, m).item() == 7.0
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(7 / 3), rtol=0, atol=1e-6)
    assert masked_sum(x, m, dim=1).tolist() == [3.0, 4.0]
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 4.0]
    masked_mean(x, m).backward()
    expected_grad = m.float() / 3  # 1/3 on the three valid tokens, 0 (not NaN) elsewhere
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=1e-7)


def test_masked_sum_and_mean_of_empty_mask_are_zero() -> None:
    x = torch.tensor([[float("nan"), 2.0], [3.0, 4.0]])
    m = torch.zeros(2, 2, dtype=torch.bool)
    assert masked_sum(x, m).item() == 0.0
    assert masked_mean(x, m).item() == 0.0  # 0 / max(0, 1), never NaN
    assert masked_mean(x, torch.tensor([[False, False], [True, True]]), dim=1).tolist() == [0.0, 3.5]


def test_masked_mean_accepts_float_mask() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.tensor([[1.0, 0.0, 1.0]])
    assert masked_mean(x, m).item() == 2.0  # (1 + 3) / 2


def test_masked_sum_shape_mismatch_names_mask() -> None:
    with pytest.raises(ValueError, match="mask"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "group_ids",
    [
        torch.tensor([0.0, 1.0, 0.0]),  # float
        torch.tensor([[0, 1, 0]]),  # 2-D
    ],
    ids=["float", "2d"],
)
def test_malformed_group_ids_raise_naming_group_ids(group_ids) -> None:
    for op in (group_sum, group_mean, group_std, group_max, group_median):
        with pytest.raises(ValueError, match="group_ids must be a 1-D integer tensor"):
            op(torch.zeros(3), group_ids)


@pytest.mark.parametrize("op", [group_sum, group_mean, group_std, group_median])
def test_group_ids_as_python_list_raises_value_error(op) -> None:
    # check_groups handles a non-tensor group_ids, so every op should reach it before touching .shape
    with pytest.raises(ValueError, match="group_ids"):
        op(torch.zeros(3), [0, 1, 0])


def test_length_mismatch_raises_naming_both_arguments() -> None:
    with pytest.raises(ValueError, match=r"x must have the same leading size B as group_ids"):
        group_sum(torch.zeros(4), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("ids", [[0, 1, 2], [0, -1, 1]], ids=["too_large", "negative"])
def test_out_of_range_group_ids_raise(ids: list[int]) -> None:
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, 2\)"):
        group_mean(torch.zeros(3), torch.tensor(ids), 2)
    for op in (group_median, group_max, group_std):
        with pytest.raises(ValueError, match="group_ids"):
            op(torch.zeros(3), torch.tensor(ids), 2)


def test_seeded_uniform_depends_only_on_the_row_seed_stream_and_position():
    from common.ops import seeded_uniform

    seeds = torch.tensor([5, 9, 5, 2**61 + 3])
    u = seeded_uniform(seeds, 0, (4000,))  # (4, 4000)
    assert u.shape == (4, 4000) and u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])  # same seed, same draw
    assert torch.equal(seeded_uniform(seeds[1:2], 0, (4000,)), u[1:2])  # the other rows do not matter
    assert (seeded_uniform(seeds, 1, (4000,)) == u).float().mean() < 0.01  # another stream (epoch), another draw
    # uniform: mean 1/2 and variance 1/12 within 5 standard errors (n = 16000: s.e. of the mean 0.0023)
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 0.004
    assert seeded_uniform(seeds, 0, (2, 3)).shape == (4, 2, 3)
