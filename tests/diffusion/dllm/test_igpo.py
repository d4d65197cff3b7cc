"""IGPO (diffusion/dllm/igpo.py): the entropy filter, hint chunks, inpainting of all-wrong groups only with
replacement by correct hinted samples, and IGPO with zero replacements = diffu-GRPO bit for bit."""

from __future__ import annotations

import torch

from common.advantages.group import GRPO
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from diffusion.dllm.data import ALPHABET, chain_sum
from diffusion.dllm.igpo import IGPO, chunk, entropy_filter
from diffusion.dllm.model import TinyDiffusionLM
from diffusion.dllm.policy import MaskedDiffusionPolicy
from diffusion.dllm.rewards import ChainSumCorrect, ChainSumReward


def policy(p_mask: float = 0.0) -> MaskedDiffusionPolicy:
    return MaskedDiffusionPolicy(TinyDiffusionLM(alphabet=ALPHABET, hidden_size=32, num_layers=1, num_heads=2, seed=0),
                                 gen_length=8, block_length=4, steps=4, p_mask=p_mask)


def test_entropy_filter_keeps_max_1_floor_tau_n_hint_tokens_and_every_generated_token():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(4, 12, generator=g)
    hint = torch.zeros(4, 12, dtype=torch.bool)
    hint[0, :7] = True  # n = 7 -> max(1, floor(1.4)) = 1
    hint[1, 1:11] = True  # n = 10 -> 2
    hint[2, 5] = True  # n = 1 -> 1
    keep = entropy_filter(entropy, hint, 0.2)
    assert (keep | hint).all()  # non-hint positions all kept
    assert (keep & hint).sum(1).tolist() == [1, 2, 1, 0]
    for b in range(3):  # the kept ones are the highest-entropy hint positions
        kept, dropped = entropy[b][keep[b] & hint[b]], entropy[b][~keep[b] & hint[b]]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()
    assert entropy_filter(entropy, hint, 1.0).all()  # tau = 1 keeps everything


def test_chunks_are_consecutive_sized_and_leave_a_short_tail():
    torch.manual_seed(0)
    for _ in range(50):
        region = list(range(int(torch.randint(0, 12, ()))))
        cs = chunk(region, 2, 3)
        flat = [i for c in cs for i in c]
        assert flat == region[: len(flat)] and len(region) - len(flat) < 2
        assert all(2 <= len(c) <= 3 for c in cs)


def test_only_all_wrong_groups_are_inpainted_and_replaced(one_thread):
    """Group 0 mixed, group 1 all correct, group 2 all wrong (set by hand). The score calls a hinted row correct
    (η = 1: every chunk revealed); λ_max = 2 of G = 4: rows 8, 9 are replaced by hinted samples whose hint mask marks
    exactly the trace's hint region and whose tokens there are the trace's; everything else is untouched."""
    torch.manual_seed(0)
    pol = policy()
    prompts = chain_sum(3, ks=(6,), seed=0)

    def score(b: RolloutBatch) -> RolloutBatch:
        r = (b.hint_mask.any(1) if b.hint_mask is not None else torch.zeros(b.batch_size, dtype=torch.bool)).float()
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",), correct=r > 0)

    method = IGPO(eta_low=1.0, eta_high=1.0, max_replacements=2)
    loop = Loop(pol, score, GRPO(scale="none"), ClippedPolicyLoss(), methods=[method], group_size=4, provided=("correct",))
    batch = pol.rollout(prompts, 4)
    correct = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    batch = batch.replace(rewards=correct.float(), reward_components=correct.float()[:, None], reward_names=("r",), correct=correct)
    out = method.after_score(loop, batch)
    same = torch.tensor([1] * 8 + [0, 0, 1, 1], dtype=torch.bool)
    for name in ("completion_ids", "completion_mask", "rewards", "seeds", "prompt_ids", "group_ids"):
        assert torch.equal(getattr(out, name)[same], getattr(batch, name)[same]), name
    assert torch.equal(out.group_ids, batch.group_ids)
    assert not out.hint_mask[same].any() and out.hint_keep[same].all()
    trace = [pol.tokenizer.convert_tokens_to_ids(c) for c in prompts[2]["trace"]]
    region = prompts[2]["hint_positions"]  # s_2 .. s_{k-1}: 4 positions
    for row in (8, 9):
        assert out.hint_mask[row].nonzero().squeeze(1).tolist() == region
        assert out.completion_ids[row, region].tolist() == [trace[i] for i in region]
        assert bool(out.correct[row]) and out.rewards[row] == 1.0
        assert (out.hint_keep[row] & out.hint_mask[row]).sum() == 1  # max(1, floor(0.2 * 4))
    metrics = method.after_update(loop, out)
    assert metrics["replacements"] == 2 and metrics["rescued_groups"] == 1
    assert metrics["all_wrong_before"] == 1 / 3 and metrics["all_wrong_after"] == 0


def test_igpo_with_zero_replacements_is_diffu_grpo_bit_for_bit(one_thread):
    """Same seeds, two training steps (mu = 2) of a tiny masked-diffusion LM on chain-sum (the random policy's groups
    are mostly all wrong): IGPO(max_replacements=0) and the plain loop give identical weights and metrics."""
    reward, verify = ChainSumReward(), ChainSumCorrect()

    def score(b: RolloutBatch) -> RolloutBatch:
        r = reward(b.completions, b.samples)
        return b.replace(rewards=r, reward_components=r[:, None], reward_names=("r",),
                         correct=verify(b.completions, b.samples) > 0.5)

    runs = []
    for methods in ([IGPO(max_replacements=0)], []):
        torch.manual_seed(0)
        pol = policy(p_mask=0.15)
        loop = Loop(pol, score, GRPO(scale="none"), ClippedPolicyLoss(aggregation="token_mean"), methods=methods,
                    group_size=4, mu=2, provided=("correct",))
        opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-2)
        metrics = []
        for step in range(2):
            got = loop.collect(chain_sum(3, seed=step))
            metrics.append(loop.update(got.kept, Stepper(opt, pol.trainable_parameters())))
        runs.append((pol, metrics))
    (a, ma), (b, mb) = runs
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for x, y in zip(ma, mb):
        assert torch.equal(x["loss"], y["loss"]) and torch.equal(x["grad_norm"], y["grad_norm"])
    assert ma[0]["all_wrong_before"] == ma[0]["all_wrong_after"] and ma[0]["replacements"] == 0
