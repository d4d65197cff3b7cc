"""ADORA (arXiv 2602.10019; authors' code ShadeCloak/ADORA): attenuating "temporarily disadvantageous" groups
(longest correct answer not longer than the mean wrong one) tilts updates toward long correct reasoning.

Check (shared/methods/text.md §15 (e)): (1) the rule on hand groups: correct (50, 80) vs wrong (100, 120) -> 0.1;
correct (150) vs wrong (100, 120) -> 1; a truncated wrong answer is ignored. (2) The property, exact for 0/1
rewards: for every group the length-weighted advantage Σ_i L_i A_i under ADORA (the library's ADORA around GRPO)
is >= GRPO's, on 10^4 random groups (G in 2..16, lengths 1..4096, some truncated). Reported: the fraction of groups
where it holds, the fraction attenuated, and the mean length-weighted advantage per group. The paper's benchmark
results (AMC 40 vs 35 on Logic-RL) need an LLM and are not tested.

    python reproductions/adora.py       # ~5 s on 2 cores; writes reproductions/reports/adora.md
"""

from __future__ import annotations

from support.report import plt, save_plot, verdict, write_report  # the repository root on sys.path, Agg

import torch

from common.advantages.adora import ADORA, adora_weights
from common.advantages.group import GRPO
from common.batch import RolloutBatch

GROUPS, MAX_LEN = 10_000, 4096


def batch_of(rewards: torch.Tensor, lengths: torch.Tensor, group_ids: torch.Tensor, truncated: torch.Tensor) -> RolloutBatch:
    B = len(rewards)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]  # (B, T)
    return RolloutBatch(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                        completion_ids=torch.zeros(B, MAX_LEN, dtype=torch.long), completion_mask=mask,
                        group_ids=group_ids, rewards=rewards, truncated=truncated)


def main() -> None:
    c = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    L = torch.tensor([50, 80, 100, 120, 150, 100, 120, 10, 5, 999])
    trunc = torch.tensor([0] * 9 + [1], dtype=torch.bool)
    w = adora_weights(c, L, torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), truncated=trunc)
    hand_ok = w.tolist() == [w[0].item()] * 4 + [1.0] * 6 and abs(w[0].item() - 0.1) < 1e-7

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 17, (GROUPS,), generator=gen)
    g = torch.repeat_interleave(torch.arange(GROUPS), sizes)  # (B,)
    p = torch.rand(GROUPS, generator=gen)[g]  # per-group accuracy
    r = (torch.rand(len(g), generator=gen) < p).float()
    lengths = torch.randint(1, MAX_LEN + 1, (len(g),), generator=gen)
    truncated = lengths > MAX_LEN - 40  # as the code's L_trunc = max length − ~40
    batch = batch_of(r, lengths, g, truncated)
    base, adora = GRPO()(batch), ADORA()(batch)
    lw = lambda a: torch.zeros(GROUPS, dtype=torch.float64).index_add_(0, g, (lengths * a).double())  # noqa: E731
    lw_base, lw_adora = lw(base), lw(adora)
    holds = (lw_adora >= lw_base - 1e-3).double().mean().item()
    informative = (torch.zeros(GROUPS).index_add_(0, g, base.abs()) > 0)
    attenuated = (torch.zeros(GROUPS).index_add_(0, g, (adora != base).float()) > 0)
    reproduced = hand_ok and holds == 1.0

    fig, ax = plt.subplots(figsize=(5, 4))
    m = informative
    ax.scatter(lw_base[m].numpy(), lw_adora[m].numpy(), s=2, alpha=0.4)
    lim = float(lw_base[m].abs().max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlabel("Σ L·A per group, GRPO")
    ax.set_ylabel("Σ L·A per group, ADORA (λ = 0.1)")
    fig.tight_layout()
    save_plot(fig, "adora")
    outcome = "reproduced" if reproduced else "not reproduced"
    write_report("adora", f"""# ADORA (arXiv 2602.10019): the length-advantage rule

Setup: {GROUPS:,} random groups (G = 2..16, per-group accuracy ~ U(0, 1), 0/1 rewards, lengths ~ U(1, {MAX_LEN}),
wrong answers longer than {MAX_LEN - 40} treated as truncated), GRPO advantages re-weighted by `ADORA` (λ = 0.1).

| check | result |
|---|---|
| hand groups: (50, 80) vs (100, 120) -> 0.1; (150) vs (100, 120) -> 1; truncated wrong ignored | {hand_ok} |
| groups with Σ L·A (ADORA) >= Σ L·A (GRPO) | {holds:.4f} |
| informative groups (some A != 0) | {informative.double().mean().item():.3f} |
| groups attenuated (TDS, weight 0.1) | {attenuated.double().mean().item():.3f} |
| mean Σ L·A per group, GRPO | {lw_base.mean().item():+.1f} |
| mean Σ L·A per group, ADORA | {lw_adora.mean().item():+.1f} |

![length-weighted advantage](adora.png)

Verdict: claim **{outcome}** for the rule's defining effect (updates tilt toward long correct answers: every point
lies on or above the diagonal). The paper's downstream claims (AMC 40 vs 35, MathVista 73.5 vs 70.2) and its
Difficulty-Advantage criterion are not tested (the criterion is unverified; only the code's length rule is built).
""")
    verdict("adora", reproduced, f"hand weights ok={hand_ok}; Σ L·A(ADORA) >= Σ L·A(GRPO) in {holds:.4f} of {GROUPS} groups; "
          f"mean per group {lw_base.mean().item():+.1f} -> {lw_adora.mean().item():+.1f}; {attenuated.double().mean().item():.2f} attenuated")


if __name__ == "__main__":
    main()
