"""Retrieval module: phase masks on real SmolLM2-tokenised outputs, the factorised advantage on a real batch,
the tiny pointer policy (tensor rewards vs the text rewards; the swapped-mask arm is worse), and both recipes
from `advlab` in a subprocess on a tiny policy."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.advantages.factorised import FactorisedGRPO
from common.models import bundled_smollm2_path, load_tokenizer
from common.rollout.hf import completion_mask
from retrieval.module import phase_starts
from retrieval.rewards import RankingNDCG, SlateCoverage, coverage, format_answer, ndcg_at_k

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled_smollm2_path())


def tokenised(tok, texts):
    """Right-padded completions ending in EOS, as the HF backend returns them."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask, _ = completion_mask(ids, torch.tensor([tok.eos_token_id]))
    return ids.masked_fill(~mask, tok.pad_token_id), mask


def test_phase_masks_on_real_tokenised_outputs(tok):
    texts = [format_answer([3, 7, 12, 5], [7, 3]), "<slate>11 2</slate><rank>2</rank>", "<slate> 4 9 no closing tag",
             format_answer([14, 1], [1, 14]) + " extra words"]
    ids, mask = tokenised(tok, texts)
    starts = phase_starts(tok, ids, mask)
    for row, (zero, s), text in zip(ids.tolist(), starts, texts):
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1
        assert zero == 0
        if "</slate>" in text:
            gen, rank = tok.decode(row[:s]), tok.decode(row[s:n], skip_special_tokens=True)
            # the token that completes </slate> is the last slate token (tags belong to their phase); a merged
            # token such as "><" in "</slate><rank>" stays with the slate
            assert "</slate>" in gen and "</slate>" not in tok.decode(row[: s - 1])
            assert gen + rank == text and "rank>" in rank and "</slate>" not in rank
        else:
            assert s == n  # no slate end: the whole completion (with EOS) is the slate phase


def test_factorised_advantage_on_a_real_batch(tok):
    # one group of 3 real answers; relevant ids 3 (grade 2) and 7 (grade 1)
    rel = [0.0] * 20
    rel[2], rel[6] = 2.0, 1.0
    texts = [format_answer([3, 7], [3, 7]), format_answer([3, 5], [5, 3]), "<slate> 3 3 </slate> <rank> 3 </rank>"]
    sample = {"relevance": rel, "max_slate": 10, "rank_k": 5}
    ids, mask = tokenised(tok, texts)
    from common.batch import RolloutBatch

    starts = phase_starts(tok, ids, mask)
    comps = torch.stack([SlateCoverage()(texts, [sample] * 3), RankingNDCG(5)(texts, [sample] * 3)], 1)
    # R_gen = (1, 1/2, -1) -> mean 1/6 -> A_gen = (5/6, 1/3, -7/6)
    # R_rank = (1, 1/(2·log2 3) / (2 + 1/log2 3) = 0.20079, -1): mean 0.06693 -> A_rank = (0.93307, 0.13386, -1.06693)
    ndcg2 = (2 / 1.584962500721156) / (2 + 1 / 1.584962500721156)
    assert comps[:, 1].tolist() == pytest.approx([1.0, ndcg2, -1.0], abs=1e-6)
    batch = RolloutBatch(prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.bool),
                         completion_ids=ids, completion_mask=mask, group_ids=torch.zeros(3, dtype=torch.long),
                         reward_components=comps, rewards=comps.sum(1),
                         phase_starts=torch.tensor(starts), samples=[sample] * 3, completions=texts)
    adv = FactorisedGRPO()(batch)  # (B, T)
    a_gen = [5 / 6, 1 / 3, -7 / 6]
    mean_rank = (1 + ndcg2 - 1) / 3
    a_rank = [1 - mean_rank, ndcg2 - mean_rank, -1 - mean_rank]
    for i, (_, s) in enumerate(starts):
        n = int(mask[i].sum())
        torch.testing.assert_close(adv[i, :s], torch.full((s,), a_gen[i] / s))
        torch.testing.assert_close(adv[i, s:n], torch.full((n - s,), a_rank[i] / (n - s)))
        assert torch.equal(adv[i, n:], torch.zeros(ids.shape[1] - n))


def test_toy_policy_rewards_match_text_rewards_and_swapped_arm_is_worse():
    from retrieval.metrics import RankingMetrics
    from retrieval.tasks import catalogue, recommendation
    from retrieval.toy import PointerPolicy, coverage_t, greedy_rankings, ndcg_t, teacher_sft, toy_features, train_rl

    cat = catalogue(200, 8, seed=0)
    samples = recommendation(400, seed=1, cat=cat, max_slate=8, rank_k=5)
    x, rel = toy_features(samples, cat.vectors)
    torch.manual_seed(0)
    policy = PointerPolicy(x.shape[-1], n_slate=8, rank_k=5)
    actions = policy.sample(x[:16], generator=torch.Generator().manual_seed(0))  # (16, 13)
    for a, r in zip(actions.tolist(), rel[:16].tolist()):  # the tensor rewards against the plain text ones
        slate, ranking = [c + 1 for c in a[:8]], [c + 1 for c in a[8:]]
        assert len(set(slate)) == 8 and set(ranking) <= set(slate) and len(set(ranking)) == 5
    torch.testing.assert_close(coverage_t(actions[:, :8], rel[:16]),
                               torch.tensor([coverage([c + 1 for c in a[:8]], r) for a, r in zip(actions.tolist(), rel[:16].tolist())]))
    torch.testing.assert_close(ndcg_t(actions[:, 8:], rel[:16], 5),
                               torch.tensor([ndcg_at_k([c + 1 for c in a[8:]], r, 5) for a, r in zip(actions.tolist(), rel[:16].tolist())]))
    # teacher-forced log-probs against a plain loop: slate steps choose among unchosen pool items, ranking steps
    # among unranked slate items, each a softmax of its phase's head over what is still allowed
    lp = policy.log_probs(x[:4], actions[:4])  # (4, 13)
    lg = policy.logits(x[:4]).detach()  # (4, 2, 20)
    for i, a in enumerate(actions[:4].tolist()):
        for s_, c in enumerate(a):
            phase, done = (0, a[:s_]) if s_ < 8 else (1, a[8:s_])
            allowed = [j for j in range(20) if j not in done and (phase == 0 or j in a[:8])]
            ref = lg[i, phase, c] - torch.logsumexp(lg[i, phase, allowed], 0)
            torch.testing.assert_close(lp[i, s_].detach(), ref, rtol=1e-5, atol=1e-5)
    # the swapped-mask sanity arm (slate tokens trained on the ranking reward and vice versa) ends worse
    first = x[..., :8].sum(-1)
    teacher_sft(policy, x, first, 40, torch.Generator().manual_seed(0))
    results = {}
    for swap in (False, True):
        p = PointerPolicy(x.shape[-1], n_slate=8, rank_k=5)
        p.load_state_dict(policy.state_dict())
        train_rl(p, x, rel, factorised=True, swap_phases=swap, steps=60, g=torch.Generator().manual_seed(1), prompts=16)
        m = RankingMetrics(ndcg_k=(3,), recall_k=(5,))
        m.update(greedy_rankings(p, x[:200]), rel[:200].tolist())
        results["fgrpo_swapped" if swap else "fgrpo"] = float(m.compute()["ndcg@3"])
    assert results["fgrpo_swapped"] < results["fgrpo"] - 0.05, results


TINY = ["--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.sampling.max_new_tokens", "8",
        "--model.init_args.group_size", "4", "--data.init_args.first_stage", "latent",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--trainer.max_steps", "2",
        "--trainer.logger", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["configs/retrieval/fgrpo.yaml", "configs/retrieval/grpo_joint.yaml"])
def test_recipe_runs_two_steps_from_advlab(recipe, tmp_path):
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(ROOT / recipe), *TINY, "--evaluate", "true"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out accuracy: before" in proc.stdout and "(4 problems)" in proc.stdout
    (path,) = tmp_path.rglob("last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
