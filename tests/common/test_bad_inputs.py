"""Bad-input matrix for every public function of common/advantages, common/losses and common/ops.

Each row is ``(function, kwargs, expected)``: ``raises(arg)`` means a ``ValueError`` whose message names ``arg``;
``finite`` means every returned tensor is finite and, where a value is given, equals the documented one
(zeros for all-equal groups and groups of one, 0 loss and 0 gradient for a mask with no valid token, an empty
tensor for B = 0). NaN/inf rewards always raise at an estimator; ops and losses do not inspect values, except
that masked-out positions never contribute (rows "nan_in_padding"). A ``meta`` tensor stands in for "another
device" on a CPU-only machine. Test ids read ``function-case-expected``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import ops
from common.advantages.base import check_rewards
from common.advantages.group import GRPO, RLOO, DrGRPO, ReinforcePP, dr_grpo, grpo, reinforce_pp, rloo
from common.batch import RolloutBatch
from common.losses.aggregate import AGGREGATIONS, Normaliser, aggregate
from common.losses.kl import kl_estimate
from common.losses.logprobs import selective_log_softmax, token_logprobs
from common.losses.ppo_clip import ClippedPolicyLoss, LossOutput, clipped_surrogate

Tensor = torch.Tensor


class raises(NamedTuple):
    arg: str  # the ValueError's message must name it

    def __str__(self) -> str:
        return f"raises({self.arg})"


class finite(NamedTuple):
    value: Any = None  # expected first output: a tensor/number or a zero-argument callable; None = finite only
    dtype: torch.dtype | None = None  # expected dtype of the first output
    zero_grad: bool = False  # backward of the first output gives 0 gradient to every input requiring grad

    def __str__(self) -> str:
        return "finite"


NAN, INF, META, L = float("nan"), float("inf"), torch.device("meta"), torch.long
R = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])  # group 0 spread, group 1 all-equal, group 2 a group of one
G = torch.tensor([0, 0, 0, 1, 1, 2])
G_GAP = torch.tensor([0, 0, 0, 5, 5, 2])  # ids {0, 2, 5}: legal (< B), empty groups 1, 3, 4 in between
GAP_SLOTS = [0, 3, 2, 4, 5, 1]  # contiguous slot feeding each gap slot (3, 4, 5 are empty there too)
PERM = torch.tensor([3, 0, 5, 1, 4, 2])  # members interleaved
R0, G0, G1 = torch.zeros(0), torch.zeros(0, dtype=L), torch.arange(6)  # B = 0; every group of one
MASK = torch.tensor([[True, True, False], [True, False, False]])
NONE = torch.zeros(2, 3, dtype=torch.bool)  # no valid token anywhere
X = torch.tensor([[0.5, -1.0, 2.0], [1.5, 3.0, -2.0]])
X_PAD_NAN = X.masked_fill(~MASK, NAN)
LP = -torch.tensor([[0.5, 1.0, 2.0], [0.1, 3.0, 4.0]])
GEN = torch.Generator().manual_seed(0)
H, W, TG = torch.randn(4, 8, generator=GEN), torch.randn(5, 8, generator=GEN), torch.tensor([0, 1, 2, 4])
LOGITS, TT = torch.randn(2, 3, 5, generator=GEN), torch.tensor([[0, 4, 2], [1, 1, 3]])


MATRIX: list = []
put = lambda t, i, v=NAN: t.index_fill(0, torch.tensor([i]), v)  # noqa: E731  a copy of t with t[i] = v


def name(fn: Callable) -> str:
    return fn.__qualname__.split("<locals>.")[-1]


def row(fn: Callable, case: str, expected, **kw) -> None:
    MATRIX.append(pytest.param(fn, kw, expected, id=f"{name(fn)}-{case}-{expected}"))


def via_batch(cls):  # an estimator class called on a RolloutBatch
    def call(rewards, group_ids, **init):
        z = torch.zeros(group_ids.shape[0], 1, dtype=L)
        return cls(**init)(RolloutBatch(prompt_ids=z, prompt_mask=z.bool(), completion_ids=z, completion_mask=z.bool(), group_ids=group_ids, rewards=rewards))

    call.__qualname__ = cls.__name__
    return call


def policy_loss(init=None, **kw) -> LossOutput:
    return ClippedPolicyLoss(**{"beta": 0.04, "entropy_coef": 0.01, **(init or {})})(**kw)


policy_loss.__qualname__ = "ClippedPolicyLoss"
grad_lp = lambda: LP.clone().requires_grad_()  # noqa: E731  fresh leaf per row, for the 0-gradient rows

# ------------------------------------------------------------------------------ advantage estimators
for f in (grpo, dr_grpo, rloo, reinforce_pp):
    for case, r in [("nan", put(R, 0)), ("nan_in_group_of_one", put(R, 5)), ("inf", put(R, 2, INF)),
                    ("neg_inf", put(R, 3, -INF)), ("2d_rewards", R[:, None]), ("int_rewards", R.long()),
                    ("rewards_on_meta", R.to(META))]:
        row(f, case, raises("rewards"), rewards=r, group_ids=G)
    row(f, "length_mismatch", raises("rewards"), rewards=R[:5], group_ids=G)
    for case, g, n in [("id_eq_B", put(G, 5, 6), None), ("negative_id", put(G, 0, -1), None),
                       ("id_ge_num_groups", G, 2), ("gap_ids_ge_num_groups", G_GAP, 3), ("float_ids", G.float(), None),
                       ("2d_ids", G[:, None], None), ("ids_on_meta", G.to(META), None)]:
        row(f, case, raises("group_ids"), rewards=R, group_ids=g, num_groups=n)
    row(f, "legal", finite(), rewards=R, group_ids=G)
    row(f, "empty", finite(torch.zeros(0)), rewards=R0, group_ids=G0)
    row(f, "groups_of_one", finite(torch.zeros(6)), rewards=R, group_ids=G1)
    row(f, "all_equal", finite(torch.zeros(6)), rewards=torch.full((6,), 0.1), group_ids=G)
    row(f, "interleaved", finite(lambda f=f: f(R, G)[PERM]), rewards=R[PERM], group_ids=G[PERM])
    row(f, "gap_ids", finite(lambda f=f: f(R, G)), rewards=R, group_ids=G_GAP)
    row(f, "gap_ids_num_groups", finite(lambda f=f: f(R, G)), rewards=R, group_ids=G_GAP, num_groups=9)
    row(f, "int32_ids", finite(lambda f=f: f(R, G)), rewards=R, group_ids=G.int())
    row(f, "float64", finite(lambda f=f: f(R, G), torch.float64), rewards=R.double(), group_ids=G)
    row(f, "bfloat16_all_equal", finite(torch.zeros(6), torch.bfloat16), rewards=torch.full((6,), 0.1).bfloat16(), group_ids=G)
for cls in (GRPO, DrGRPO, RLOO, ReinforcePP):
    f = via_batch(cls)
    row(f, "nan", raises("rewards"), rewards=put(R, 1), group_ids=G)
    row(f, "inf", raises("rewards"), rewards=put(R, 1, INF), group_ids=G)
    row(f, "rewards_none", raises("rewards"), rewards=None, group_ids=G)
    row(f, "groups_of_one", finite(torch.zeros(6)), rewards=R, group_ids=G1)
row(via_batch(GRPO), "bad_scale", raises("scale"), rewards=R, group_ids=G, scale="std")
row(via_batch(GRPO), "negative_eps", raises("eps"), rewards=R, group_ids=G, eps=-1.0)
row(via_batch(ReinforcePP), "negative_eps", raises("eps"), rewards=R, group_ids=G, eps=-1.0)
row(grpo, "bad_scale", raises("scale"), rewards=R, group_ids=G, scale="std")
for case, r in [("nan", put(R, 0)), ("inf", put(R, 0, INF)), ("2d", R[:, None]), ("int", R.long())]:
    row(check_rewards, case, raises("rewards"), rewards=r)
row(check_rewards, "empty", finite(), rewards=R0)

# ------------------------------------------------------------------------------ group ops
row(ops.check_groups, "legal", finite(6), values=R, group_ids=G)
row(ops.check_groups, "empty", finite(0), values=R0, group_ids=G0)
row(ops.check_groups, "length_mismatch", raises("rewards"), values=R[:5], group_ids=G)
row(ops.check_groups, "values_on_meta", raises("rewards"), values=R.to(META), group_ids=G)
row(ops.check_groups, "id_eq_B", raises("group_ids"), values=R, group_ids=put(G, 0, 6))
row(ops.check_groups, "not_a_tensor", raises("group_ids"), values=R, group_ids=[0, 0, 0, 1, 1, 2])
row(ops.group_count, "legal", finite(torch.tensor([3.0, 2, 1, 0, 0, 0])), group_ids=G)
row(ops.group_count, "empty", finite(torch.zeros(3)), group_ids=G0, num_groups=3)
row(ops.group_count, "gap_ids", finite(torch.tensor([3.0, 0, 1, 0, 0, 2])), group_ids=G_GAP)
row(ops.group_count, "id_eq_B", raises("group_ids"), group_ids=put(G, 0, 6))
row(ops.group_count, "float_ids", raises("group_ids"), group_ids=G.float())
STATS = (ops.group_sum, ops.group_first, ops.group_mean, ops.group_std, ops.group_max, ops.group_min, ops.group_median)
for f in STATS:
    row(f, "legal", finite(), x=R, group_ids=G)
    row(f, "empty", finite(torch.zeros(0)), x=R0, group_ids=G0)
    row(f, "empty_num_groups", finite(torch.zeros(3)), x=R0, group_ids=G0, num_groups=3)
    row(f, "groups_of_one", finite(torch.zeros(6) if f is ops.group_std else R), x=R, group_ids=G1)
    row(f, "interleaved", finite(lambda f=f: f(R, G)), x=R[PERM], group_ids=G[PERM])
    row(f, "gap_ids", finite(lambda f=f: f(R, G)[GAP_SLOTS]), x=R, group_ids=G_GAP)
    row(f, "int32_ids", finite(lambda f=f: f(R, G)), x=R, group_ids=G.int())
    row(f, "id_eq_B", raises("group_ids"), x=R, group_ids=put(G, 0, 6))
    row(f, "negative_id", raises("group_ids"), x=R, group_ids=put(G, 0, -1))
    row(f, "id_ge_num_groups", raises("group_ids"), x=R, group_ids=G, num_groups=2)
    row(f, "float_ids", raises("group_ids"), x=R, group_ids=G.float())
    row(f, "length_mismatch", raises("x"), x=R[:4], group_ids=G)
    row(f, "x_on_meta", raises("x"), x=R.to(META), group_ids=G)
    is_sum, is_extreme = f is ops.group_sum, f in (ops.group_max, ops.group_min)
    row(f, "2d_x", finite(torch.tensor([[2.0], [1], [2], [0], [0], [0]])) if is_sum else raises("x"), x=R[:, None], group_ids=G)
    row(f, "int_x", raises("x") if is_extreme else finite(lambda f=f: f((R * 2).double(), G)), x=(R * 2).long(), group_ids=G)
row(ops.group_std, "all_equal", finite(torch.zeros(6)), x=torch.full((6,), 0.1), group_ids=G)

# ------------------------------------------------------------------------------ masks and losses
for f in (ops.masked_sum, ops.masked_mean):
    row(f, "no_valid_token", finite(0.0), x=X, mask=NONE)
    row(f, "no_valid_token_dim1", finite(torch.zeros(2)), x=X, mask=NONE, dim=1)
    row(f, "empty", finite(0.0), x=X[:0], mask=MASK[:0])
    row(f, "nan_in_padding", finite(lambda f=f: f(X, MASK)), x=X_PAD_NAN, mask=MASK)
    row(f, "float_mask", finite(lambda f=f: f(X, MASK)), x=X, mask=MASK.float())
    row(f, "shape_mismatch", raises("mask"), x=X, mask=MASK[:, :2])
    row(f, "mask_on_meta", raises("mask"), x=X, mask=MASK.to(META))
row(Normaliser.of, "no_valid_token", finite(1.0), mask=NONE)  # denominators clamp to 1: 0 / 1, never 0 / 0
row(Normaliser.of, "empty", finite(1.0), mask=MASK[:0])
row(Normaliser.of, "1d_mask", raises("mask"), mask=MASK[0])
for mode in AGGREGATIONS:
    row(aggregate, f"{mode}_no_valid_token", finite(0.0, zero_grad=True), per_token=grad_lp, mask=NONE, mode=mode)
    row(aggregate, f"{mode}_empty", finite(0.0), per_token=X[:0], mask=MASK[:0], mode=mode)
    row(aggregate, f"{mode}_nan_in_padding", finite(lambda m=mode: aggregate(X, MASK, m)), per_token=X_PAD_NAN, mask=MASK, mode=mode)
    row(aggregate, f"{mode}_shape_mismatch", raises("mask"), per_token=X, mask=MASK[:1], mode=mode)
    row(aggregate, f"{mode}_mask_on_meta", raises("mask"), per_token=X, mask=MASK.to(META), mode=mode)
row(aggregate, "1d", raises("mask"), per_token=X[0], mask=MASK[0], mode="token_mean")
row(aggregate, "bad_mode", raises("aggregation"), per_token=X, mask=MASK, mode="sum")
row(kl_estimate, "legal", finite(), logprobs=LP, ref_logprobs=LP.flip(1))
row(kl_estimate, "empty", finite(torch.zeros(0, 3)), logprobs=LP[:0], ref_logprobs=LP[:0])
row(kl_estimate, "neg_inf_logprob", finite(torch.full((2, 3), 10.0)), logprobs=torch.full((2, 3), -INF), ref_logprobs=LP)
row(kl_estimate, "float64", finite(dtype=torch.float64), logprobs=LP.double(), ref_logprobs=LP.double())
row(kl_estimate, "shape_mismatch", raises("ref_logprobs"), logprobs=LP, ref_logprobs=LP[:, :2])
row(kl_estimate, "ref_on_meta", raises("ref_logprobs"), logprobs=LP, ref_logprobs=LP.to(META))
row(kl_estimate, "bad_estimator", raises("estimator"), logprobs=LP, ref_logprobs=LP, estimator="k4")
A = torch.tensor([1.0, -1.0])
CS = dict(logprobs=LP, old_logprobs=LP.flip(1), advantages=A, mask=MASK)
row(clipped_surrogate, "legal", finite(), **CS)
row(clipped_surrogate, "no_valid_token", finite(torch.zeros(2, 3), zero_grad=True), **{**CS, "logprobs": grad_lp, "mask": NONE})
row(clipped_surrogate, "empty", finite(torch.zeros(0, 3)), logprobs=LP[:0], old_logprobs=LP[:0], advantages=A[:0], mask=MASK[:0])
row(clipped_surrogate, "nan_in_padding", finite(lambda: clipped_surrogate(**CS)[0]), **{**CS, "logprobs": LP.masked_fill(~MASK, NAN)})
row(clipped_surrogate, "huge_log_ratio", finite(), **{**CS, "logprobs": LP * 1e4})
row(clipped_surrogate, "token_level_adv", finite(), **{**CS, "advantages": X})
row(clipped_surrogate, "sequence_ratio_empty_row", finite(), **{**CS, "mask": MASK & torch.tensor([[True], [False]])}, ratio_level="sequence")
row(clipped_surrogate, "old_shape_mismatch", raises("old_logprobs"), **{**CS, "old_logprobs": LP[:, :2]})
row(clipped_surrogate, "mask_shape_mismatch", raises("mask"), **{**CS, "mask": MASK[:1]})
row(clipped_surrogate, "1d_logprobs", raises("logprobs"), logprobs=LP[0], old_logprobs=LP[0], advantages=A, mask=MASK[0])
row(clipped_surrogate, "float_mask", raises("mask"), **{**CS, "mask": MASK.float()})
row(clipped_surrogate, "adv_wrong_B", raises("advantages"), **{**CS, "advantages": torch.ones(3)})
row(clipped_surrogate, "adv_3d", raises("advantages"), **{**CS, "advantages": A[:, None, None]})
row(clipped_surrogate, "adv_on_meta", raises("advantages"), **{**CS, "advantages": A.to(META)})
row(clipped_surrogate, "mask_on_meta", raises("mask"), **{**CS, "mask": MASK.to(META)})
row(clipped_surrogate, "bad_ratio_level", raises("ratio_level"), **CS, ratio_level="seq")
PL = {**CS, "ref_logprobs": LP.flip(0), "entropy": X.abs()}
row(policy_loss, "legal", finite(), **PL)
row(policy_loss, "no_valid_token", finite(0.0, zero_grad=True), **{**PL, "logprobs": grad_lp, "mask": NONE})
row(policy_loss, "empty", finite(0.0), **{k: v[:0] for k, v in PL.items()})
row(policy_loss, "nan_in_padding", finite(lambda: policy_loss(**PL).loss),
    **{**PL, **{k: PL[k].masked_fill(~MASK, NAN) for k in ("logprobs", "ref_logprobs", "entropy")}})
row(policy_loss, "entropy_shape", raises("entropy"), **{**PL, "entropy": X[:, :2]})
row(policy_loss, "entropy_on_meta", raises("entropy"), **{**PL, "entropy": X.to(META)})
row(policy_loss, "ref_missing", raises("ref_logprobs"), **{**PL, "ref_logprobs": None})
row(policy_loss, "ref_shape", raises("ref_logprobs"), **{**PL, "ref_logprobs": LP[:1]})
row(policy_loss, "ref_on_meta", raises("ref_logprobs"), **{**PL, "ref_logprobs": LP.to(META)})
row(policy_loss, "1d_mask", raises("mask"), **{**PL, "mask": MASK[0]})
row(policy_loss, "float_mask", raises("mask"), **{**PL, "mask": MASK.float()})
row(policy_loss, "eps_low_ge_1", raises("eps_low"), **PL, init={"eps_low": 1.0})
row(policy_loss, "bad_aggregation", raises("aggregation"), **PL, init={"aggregation": "sum"})
TL = dict(hidden=H, weight=W, targets=TG)
row(token_logprobs, "legal", finite(dtype=torch.float32), **TL)
row(token_logprobs, "empty", finite(torch.zeros(0)), **{**TL, "hidden": H[:0], "targets": TG[:0]})
row(token_logprobs, "int32_targets", finite(lambda: token_logprobs(**TL)[0]), **{**TL, "targets": TG.int()})
row(token_logprobs, "bfloat16", finite(dtype=torch.float32), **{**TL, "hidden": H.bfloat16(), "weight": W.bfloat16()})
row(token_logprobs, "1d_hidden", raises("hidden"), **{**TL, "hidden": H[0]})
row(token_logprobs, "targets_length", raises("targets"), **{**TL, "targets": TG[:3]})
row(token_logprobs, "weight_H_mismatch", raises("weight"), **{**TL, "weight": W[:, :7]})
row(token_logprobs, "bias_shape", raises("bias"), **TL, bias=torch.zeros(4))
row(token_logprobs, "float_targets", raises("targets"), **{**TL, "targets": TG.float()})
row(token_logprobs, "weight_on_meta", raises("weight"), **{**TL, "weight": W.to(META)})
row(token_logprobs, "targets_on_meta", raises("targets"), **{**TL, "targets": TG.to(META)})
row(token_logprobs, "zero_temperature", raises("temperature"), **TL, temperature=0.0)
row(token_logprobs, "zero_chunk_size", raises("chunk_size"), **TL, chunk_size=0)
SL = dict(logits=LOGITS, targets=TT)
row(selective_log_softmax, "legal", finite(dtype=torch.float32), **SL)
row(selective_log_softmax, "empty", finite(torch.zeros(0, 3)), logits=LOGITS[:0], targets=TT[:0])
row(selective_log_softmax, "int32_targets", finite(lambda: selective_log_softmax(**SL)), **{**SL, "targets": TT.int()})
row(selective_log_softmax, "neg_inf_logits_elsewhere", finite(), logits=LOGITS.index_fill(2, torch.tensor([0]), -INF), targets=TT.clamp(min=1))
row(selective_log_softmax, "targets_shape", raises("targets"), **{**SL, "targets": TT[:, :2]})
row(selective_log_softmax, "float_targets", raises("targets"), **{**SL, "targets": TT.float()})
row(selective_log_softmax, "targets_on_meta", raises("targets"), **{**SL, "targets": TT.to(META)})
row(selective_log_softmax, "zero_temperature", raises("temperature"), **SL, temperature=0.0)


def outputs(out: Any) -> list[Tensor]:
    if isinstance(out, LossOutput):
        return [out.loss, *out.metrics.values()]
    if isinstance(out, Normaliser):
        return [out.num_tokens, out.num_sequences]
    return [] if out is None else [torch.as_tensor(t) for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("fn, kwargs, expected", MATRIX)
def test_bad_input_matrix(fn: Callable, kwargs: dict, expected) -> None:
    kw = {k: v() if callable(v) else v for k, v in kwargs.items()}
    if isinstance(expected, raises):
        with pytest.raises(ValueError, match=expected.arg):
            fn(**kw)
        return
    outs = outputs(fn(**kw))
    for t in outs:
        assert torch.isfinite(t).all(), f"{name(fn)} returned {t}"
    if expected.value is not None:
        want = expected.value() if callable(expected.value) else expected.value
        torch.testing.assert_close(outs[0].double(), torch.as_tensor(want).double(), rtol=1e-5, atol=1e-6)
    if expected.dtype is not None:
        assert outs[0].dtype == expected.dtype
    if expected.zero_grad:
        if outs[0].requires_grad:
            outs[0].sum().backward()
        for v in kw.values():
            if torch.is_tensor(v) and v.requires_grad:
                assert v.grad is None or not v.grad.any(), f"gradient {v.grad} through a mask with no valid token"


# ------------------------------------------------------------------------------ properties on legal input
@st.composite
def legal_batch(draw, grid: bool = False):
    """Rewards (B,) with repeats, unequal interleaved groups with gaps, a mask (B, T) with empty rows."""
    B, T = draw(st.integers(1, 16)), draw(st.integers(1, 5))
    k = draw(st.integers(1, B))
    ids = draw(st.lists(st.integers(0, k - 1), min_size=B, max_size=B))
    value = st.integers(-4096, 4096).map(lambda v: v / 256) if grid else st.floats(-1e4, 1e4, width=32)
    rewards = draw(st.lists(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), value), min_size=B, max_size=B))
    rows = st.one_of(st.just([False] * T), st.lists(st.booleans(), min_size=T, max_size=T))
    mask = draw(st.lists(rows, min_size=B, max_size=B))
    return torch.tensor(rewards), torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)


@settings(max_examples=60, deadline=None)
@given(batch=legal_batch(), seed=st.integers(0, 2**16))
def test_legal_input_never_gives_nan_or_inf(batch, seed: int) -> None:
    rewards, ids, mask = batch
    for scale in ("group", "batch", "none"):
        assert torch.isfinite(grpo(rewards, ids, scale=scale)).all()
    for f in (dr_grpo, rloo, reinforce_pp, ops.group_std, ops.group_median, ops.group_max, ops.group_min):
        assert torch.isfinite(f(rewards, ids)).all(), name(f)
    gen = torch.Generator().manual_seed(seed)
    lp, old, ref, ent = (-20 * torch.rand(mask.shape, generator=gen) for _ in range(4))
    adv = rloo(rewards, ids)
    for level in ("token", "sequence"):
        pg = clipped_surrogate(lp, old, adv, mask, ratio_level=level, dual_clip=3.0)[0]
        for mode in AGGREGATIONS:
            assert torch.isfinite(aggregate(pg, mask, mode)), mode
            out = policy_loss(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref,
                              entropy=-ent, init={"aggregation": mode, "ratio_level": level})
            assert all(bool(torch.isfinite(t)) for t in outputs(out)), (mode, level)


@settings(max_examples=60, deadline=None)
@given(batch=legal_batch(grid=True), pick=st.integers(0, 15), c=st.integers(-2560, 2560))
def test_group_advantages_invariant_to_shifting_one_group(batch, pick: int, c: int) -> None:
    rewards, ids, _ = batch
    k = ids[pick % ids.numel()]  # a group that is present
    shifted = rewards + (c / 256) * (ids == k)  # multiples of 1/256: the shift itself is exact in float32
    for f in (grpo, dr_grpo, rloo, reinforce_pp):
        torch.testing.assert_close(f(shifted, ids), f(rewards, ids), rtol=1e-5, atol=1e-6, msg=name(f))
