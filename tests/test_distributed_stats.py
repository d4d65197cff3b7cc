"""Batch statistics over the global batch under DDP (issue 15), proven with real processes on gloo (CPU, 2 ranks):
one optimiser step of a 2-rank DDP run on a fixed batch split by rank equals one process's step on the whole batch
for REINFORCE++-baseline whitening, SPO's normalisation (tracker), Segment-PO (SPO-chain) whitening, the 80/20
entropy quantile, HAPO's entropy statistics, Clip-Cov and KL-Cov, and HAPO's sampling statistics are equal; the
same step with per-rank statistics (the control) differs, so the check can fail. The ranks' rows have different
lengths (rank 0's completions are cut to T = 6, rank 1's to T = 2), so the gathers are ragged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from ddp_stats_support import MICRO, PROVIDED, cases, micro_order, one_step, stats_batch, temperature_stats
from ddp_support import make_policy
from resume import ROOT

SUPPORT = ROOT / "tests/support"

# float64 throughout: DDP and one process sum the same terms in other orders (per rank, then across ranks; the
# ranks' forwards on their own padded widths), ~1e-16 relative per term over a few hundred terms, so weights of
# size ~1 agree to ~1e-13; 1e-10 leaves room and is still 1e7 x below what the step moves them (> 1e-3). The
# token selections (quantile, top-k, Clip-Cov's draw) are discontinuous: they agree because they are the same
# selection, not by tolerance.
TOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)]), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results, from one spawn of 2 gloo processes running every case."""
    tmp = tmp_path_factory.mktemp("ddp_stats")
    batch = stats_batch()
    torch.save(batch.state_dict(), tmp / "batch.pt")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "ddp_stats_support.py"), str(tmp / "batch.pt"), str(tmp)],
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port), stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    return batch, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def gap(a: dict, b: dict) -> float:
    """Largest weight difference between two results."""
    return max(float((a[n] - b[n]).abs().max()) for n in b if n != "advantages")


def test_the_gather_concatenates_ragged_rows_in_rank_order(ranks):
    _, (r0, r1) = ranks
    assert (r0["T"], r1["T"]) == (6, 2)  # the ranks' token widths differ
    want = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # rank 0's 3 rows, then rank 1's 1 row
    for r, start in ((r0, 0), (r1, 3)):
        assert torch.equal(r["gather"].values, want) and r["gather"].start == start
        assert r["gather_bool"].values.dtype == torch.bool and r["gather_bool"].values.tolist() == [True, False, True]
        assert r["gather_empty"].values.shape == (1, 2) and r["gather_empty"].start == (0 if r is r0 else 1)


def test_gather_on_one_process_is_the_identity_and_the_loop_hands_it_to_the_parts_that_declare_it():
    from common.distributed import all_gather_rows
    from common.loop import Loop
    from common.losses.ppo_clip import ClippedPolicyLoss

    t = torch.arange(6.0).view(3, 2)
    got = all_gather_rows(t)
    assert got.values is t and got.start == 0  # no copy, no collective

    def gather(x):
        return all_gather_rows(x)

    for case, make in cases().items():
        advantage, loss = make()
        Loop(make_policy(), lambda b: b, advantage, loss, group_size=3, provided=PROVIDED, all_gather=gather)
        declared = [p for p in (advantage, loss) if hasattr(type(p), "all_gather")]
        assert declared and all(p.all_gather is gather for p in declared), case
    plain = ClippedPolicyLoss()
    Loop(make_policy(), lambda b: b, cases()["reinforce_pp"]()[0], plain, group_size=3, all_gather=gather)
    assert not hasattr(plain, "all_gather")  # a loss without batch statistics gets nothing


@pytest.mark.parametrize("case", list(cases()))
def test_a_two_rank_step_equals_one_process_on_the_global_batch(ranks, case):
    batch, results = ranks
    ref = one_step(batch, case)  # one process, the whole batch, no collectives
    init = {n: p.detach() for n, p in make_policy().named_parameters()}
    assert max(float((ref[n] - init[n]).abs().max()) for n in init) > 1e-3, case  # the step moves the weights
    # the advantages: each rank's rows are the global batch's (token-level ones on the rank's own width)
    got = [r[case]["advantages"] for r in results]
    want = ref["advantages"]
    if want.dim() == 2:
        got = [torch.nn.functional.pad(a, (0, want.shape[1] - a.shape[1])) for a in got]
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=TOL, msg=case)
    for r in (0, 1):
        assert gap(results[r][case], ref) <= TOL, (case, r, gap(results[r][case], ref))
    # the control: the same DDP step with per-rank statistics does not give one process's weights
    control = gap(results[0]["per_rank", case], ref)
    assert control > 1e-4, (case, control)


def test_micro_batched_statistics_are_over_the_global_micro_batch(ranks):
    """With micro-batches HAPO's entropy statistics are over every rank's k-th micro-batch together: the 2-rank step
    with 3 rows per micro-batch equals one process on the rows reordered into those global micro-batches (6 rows)."""
    batch, results = ranks
    ref = one_step(batch.select(micro_order(batch.batch_size, 2, MICRO)), "hapo", micro=2 * MICRO)
    whole = one_step(batch, "hapo")  # one micro-batch: other statistics
    for r in (0, 1):
        assert gap(results[r]["hapo", "micro"], ref) <= TOL, r
    assert gap(ref, whole) > 1e-4


def test_hapo_sampling_statistics_are_the_global_batch_s(ranks):
    batch, results = ranks
    want = temperature_stats(batch)
    for r in (0, 1):
        torch.testing.assert_close(results[r]["temperature"], want, rtol=0, atol=1e-6)  # float32 statistics
    assert float((results[1]["per_rank", "temperature"] - want).abs().max()) > 1e-3


def test_clip_cov_keys_are_uniform_and_a_function_of_the_index_and_seed_only():
    """Clip-Cov's draw keys (common.losses.entropy.uniform_keys): 10^5 indices fill 10 equal bins within 5 standard
    deviations of Binomial(10^5, 0.1) (sd ≈ 95) and adjacent keys are uncorrelated (|r| < 5/sqrt(n)); the same
    (index, seed) gives the same key whatever else is drawn with it, and another seed other keys."""
    from common.losses.entropy import uniform_keys

    n = 100_000
    keys = uniform_keys(torch.arange(n), 12345)  # (n,)
    assert keys.dtype == torch.float64 and bool(((keys >= 0) & (keys < 1)).all())
    counts = torch.bincount((keys * 10).long(), minlength=10)
    assert int((counts - n // 10).abs().max()) < 5 * 95, counts.tolist()
    r = torch.corrcoef(torch.stack([keys[:-1], keys[1:]]))[0, 1]
    assert abs(float(r)) < 5 / n**0.5
    assert torch.equal(uniform_keys(torch.tensor([[7, 99_999]]), 12345)[0], keys[[7, 99_999]])
    assert not torch.equal(uniform_keys(torch.arange(100), 12346), keys[:100])
