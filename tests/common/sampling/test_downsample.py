"""D³S (arXiv 2509.22115), common/sampling/downsample.py: the max-variance subset against brute force, Lemma 1,
the |A|·H token top-K and its loss against hand computation, the relaxing schedule, degenerate and bad input,
the selector's state through a checkpoint round trip, and a SIGKILL-and-resume run of the recipe."""

import itertools
import math
import statistics

import pytest
import torch

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.sampling.downsample import (D3SSampleSelector, D3STokenLoss, linear_schedule, max_variance_subset,
                                        top_score_tokens)

from resume import TINY, assert_sigkill_resume_exact, cli


def make_batch(advantages, group_ids=None) -> RolloutBatch:
    a = torch.as_tensor(advantages, dtype=torch.float32)
    B = a.shape[0]
    g = torch.as_tensor(group_ids) if group_ids is not None else torch.arange(B) // 2
    return RolloutBatch(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                        completion_ids=torch.arange(B)[:, None].repeat(1, 3), completion_mask=torch.ones(B, 3, dtype=torch.bool),
                        group_ids=g, rewards=a.clone(), advantages=a)


def test_max_variance_subset_hand_computed() -> None:
    # A = [0.5, -1, 0, 2, 0.1], n = 2. Sorted: -1, 0, 0.1, 0.5, 2. Extremes: j=0 {0.5, 2} var 1.125;
    # j=1 {-1, 2} var (3²)/2 = 4.5; j=2 {-1, 0} var 0.5  ->  rows 1 and 3.
    keep = max_variance_subset(torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1]), 2)
    assert keep.tolist() == [False, True, False, True, False]


def test_max_variance_subset_equals_brute_force() -> None:
    """text.md §9 (e)(1): 200 random vectors of size 10, N = 4: the extremes algorithm's subset has the largest
    variance of all 210 subsets (plain loop over itertools.combinations)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randn(10, generator=g, dtype=torch.float64)
        keep = max_variance_subset(a, 4)
        assert int(keep.sum()) == 4
        values = a.tolist()
        best = max(statistics.variance([values[i] for i in c]) for c in itertools.combinations(range(10), 4))
        assert statistics.variance([v for v, k in zip(values, keep.tolist()) if k]) == pytest.approx(best, rel=1e-12)


def test_lemma1_standardised_set_gives_subset_variance_at_least_one() -> None:
    """Lemma 1: with the full set standardised (mean 0, population variance 1) the selected subset's unbiased
    variance is >= 1 (text.md §9 (e)(2); scratch numpy min 1.18 over 3000 sets)."""
    g = torch.Generator().manual_seed(1)
    lowest = math.inf
    for _ in range(500):
        size = int(torch.randint(3, 12, (1,), generator=g))
        n = int(torch.randint(2, size + 1, (1,), generator=g))
        a = torch.randn(size, generator=g, dtype=torch.float64)
        a = (a - a.mean()) / a.std(unbiased=False)
        lowest = min(lowest, float(a[max_variance_subset(a, n)].var(unbiased=True)))
    assert lowest >= 1.0


def test_max_variance_subset_ties_and_bad_input() -> None:
    # all equal: every subset has variance 0; the first maximiser j = 0 keeps the n last rows (stable sort)
    assert max_variance_subset(torch.zeros(5), 2).tolist() == [False, False, False, True, True]
    assert max_variance_subset(torch.tensor([1.0, -1.0]), 5).tolist() == [True, True]  # n > B keeps all
    assert max_variance_subset(torch.zeros(0), 3).tolist() == []  # an empty batch stays empty
    with pytest.raises(ValueError, match="advantages must be a 1-D floating"):
        max_variance_subset(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="n .* must be >= 1"):
        max_variance_subset(torch.zeros(3), 0)


def test_linear_schedule_relaxes_then_stays() -> None:
    assert [linear_schedule(0.25, 1.0, t, 30) for t in (0, 15, 30, 90)] == [0.25, 0.625, 1.0, 1.0]
    assert linear_schedule(0.25, 1.0, 0, 0) == 1.0


def test_selector_keeps_the_scheduled_fraction_and_its_step_is_state() -> None:
    sel = D3SSampleSelector(n_init=0.25, n_final=1.0, warmup_steps=2)
    # 8 rows; step 0 keeps ⌈0.25·8⌉ = 2: the extremes −3 (row 5) and 2 (row 2)
    batch = make_batch([0.5, -1.0, 2.0, 0.0, 0.1, -3.0, 1.0, -0.2], group_ids=[0, 0, 1, 1, 2, 2, 3, 3])
    kept = sel.finalize(sel(batch))
    assert kept.completion_ids[:, 0].tolist() == [2, 5] and kept.group_ids.tolist() == [0, 1]  # renumbered
    # step 1: ⌈(0.25 + 0.75/2)·8⌉ = 5 rows; step 2 onwards all 8
    assert sel(batch).batch_size == 5
    sel.finalize(batch)
    assert sel(batch).batch_size == 8
    state = sel.state_dict()
    assert int(state["step"]) == 2
    fresh = D3SSampleSelector(n_init=0.25, n_final=1.0, warmup_steps=2)
    fresh.load_state_dict(state)
    assert int(fresh.step) == 2 and fresh(batch).batch_size == 8


def test_selector_all_zero_advantages_trains_on_nothing_and_bad_input() -> None:
    sel = D3SSampleSelector()
    assert sel(make_batch([0.0] * 6)).batch_size == 0
    # (B, T) advantages: rows ranked by their masked means −1 and 1; ⌈0.25·2⌉ = 1 row, the largest (j = 0)
    token_level = make_batch([1.0, -1.0]).replace(advantages=torch.tensor([[1.0, 1.0, -5.0], [0.0, 0.0, 3.0]]))
    assert sel(token_level).completion_ids[:, 0].tolist() == [1]
    with pytest.raises(ValueError, match="needs RolloutBatch.advantages"):
        sel(make_batch([1.0, 0.0]).replace(advantages=None))
    for kwargs, msg in (({"n_init": 0.0}, "n_init must be in"), ({"n_final": 1.5}, "n_final must be in"),
                        ({"warmup_steps": -1}, "warmup_steps must be >= 0")):
        with pytest.raises(ValueError, match=msg):
            D3SSampleSelector(**kwargs)


def test_top_score_tokens_hand_computed() -> None:
    score = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.0, 0.7]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    # 5 valid tokens, frac 0.5 -> ⌈2.5⌉ = 3: 0.9, 0.7 and the first 0.5 (row 0, ties by position)
    assert top_score_tokens(score, mask, 0.5).tolist() == [[True, False, True], [False, False, True]]
    assert not top_score_tokens(score, torch.zeros_like(mask), 0.5).any()
    with pytest.raises(ValueError, match="mask must be a bool"):
        top_score_tokens(score, mask.float(), 0.5)


def test_token_loss_value_and_gradient_on_kept_tokens_only() -> None:
    # A = (1, −2) per row, H as below: |A|·H = [[0.2, 0.8, 0.4], [1.0, 0.2, 1.6]]; K = 0.5 of 6 -> 3 tokens:
    # (1, 2) 1.6, (1, 0) 1.0, (0, 1) 0.8. At ρ = 1 the loss is −mean_kept A = −(−2 − 2 + 1)/3 = 1.
    H = torch.tensor([[0.2, 0.8, 0.4], [0.5, 0.1, 0.8]])
    A = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    loss_fn = D3STokenLoss(k_init=0.5, k_final=1.0, warmup_steps=10)
    out = loss_fn(lp, lp.detach(), A, mask, entropy=H, normaliser=Normaliser.of(mask))
    assert float(out.loss) == pytest.approx(1.0)
    out.loss.backward()
    # d/dℓ of −A ρ / 3 at ρ = 1 is −A/3 on kept tokens, 0 elsewhere
    expected = torch.tensor([[0.0, -1 / 3, 0.0], [2 / 3, 0.0, 2 / 3]])
    torch.testing.assert_close(lp.grad, expected)
    assert float(out.metrics["kept_token_frac"]) == pytest.approx(0.5)
    loss_fn.set_step(10)  # relaxed: every token, plain token-mean −(3·1 + 3·(−2))/6 = 0.5
    assert float(loss_fn(lp, lp.detach(), A, mask, entropy=H).loss) == pytest.approx(0.5)


def test_token_loss_degenerate_and_bad_input() -> None:
    loss_fn = D3STokenLoss()
    empty = torch.zeros(2, 3, dtype=torch.bool)
    out = loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), empty, entropy=torch.ones(2, 3))
    assert float(out.loss) == 0.0 and not torch.isnan(out.loss)
    with pytest.raises(ValueError, match="needs entropy"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), empty)
    with pytest.raises(ValueError, match="advantages must be"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), empty, entropy=torch.ones(2, 3))
    with pytest.raises(ValueError, match="k_init must be in"):
        D3STokenLoss(k_init=0.0)


def test_d3s_recipe_resumes_exactly_after_sigkill(tmp_path) -> None:
    run = cli("configs/text_reasoning/d3s.yaml", *TINY, "--data.init_args.prompts_per_step", "2",
              "--model.init_args.group_size", "4", "--model.init_args.selector.init_args.warmup_steps", "4",
              "--model.init_args.loss.init_args.warmup_steps", "4", "--model.init_args.rewards",
              '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 4}}]')
    ckpt = assert_sigkill_resume_exact(tmp_path, run, max_steps=6)
    assert int(ckpt["state_dict"]["selector.step"]) == 6
