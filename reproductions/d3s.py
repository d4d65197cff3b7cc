"""D³S (arXiv 2509.22115): the rollouts that maximise Var(A) carry a larger policy gradient than a random subset.

Checks of shared/methods/text.md §9 (e), all on the library's functions (common/sampling/downsample.py):
1. the O(B log B) "extremes" subset equals brute force (200 random vectors of size 10, N = 4);
2. Lemma 1: with the set standardised (mean 0, population variance 1) the chosen size-N subset has unbiased
   variance >= 1 (3000 random sets, size <= 11);
3. the claim's mechanism: with a tiny linear-softmax policy (contextual bandit, 8 prompts x G = 8, GRPO
   advantages) the policy-gradient norm of the D³S subset (N = 16 of 64) is >= that of a random subset of the same
   size in > 90% of 300 trials. Also shown: PODS-style max-Var(R) subsets and the token level (share of the
   full-batch gradient kept by the top 20% tokens by |A|·H vs 20% random tokens, a 4-step toy sequence policy).
Not tested: the accuracy gains (Qwen2.5-Math-7B, +4.5 pass@1), the schedule (its values are not published).

    .venv/bin/python reproductions/d3s.py      # ~10 s on 2 cores
"""

from __future__ import annotations

import itertools
import statistics
from support.report import plt, save_plot, verdict, write_report  # the repository root on sys.path, Agg

import torch

from common.advantages.group import grpo
from common.sampling.downsample import max_variance_subset, top_score_tokens

torch.set_num_threads(1)


def brute_force_check(trials: int = 200) -> int:
    g = torch.Generator().manual_seed(0)
    equal = 0
    for _ in range(trials):
        a = torch.randn(10, generator=g, dtype=torch.float64)
        got = float(a[max_variance_subset(a, 4)].var())
        best = max(statistics.variance([a[i].item() for i in c]) for c in itertools.combinations(range(10), 4))
        equal += abs(got - best) <= 1e-12 * best
    return equal


def lemma1_min(trials: int = 3000) -> float:
    g = torch.Generator().manual_seed(1)
    lowest = float("inf")
    for _ in range(trials):
        size = int(torch.randint(3, 12, (1,), generator=g))
        n = int(torch.randint(2, size + 1, (1,), generator=g))
        a = torch.randn(size, generator=g, dtype=torch.float64)
        a = (a - a.mean()) / a.std(unbiased=False)
        lowest = min(lowest, float(a[max_variance_subset(a, n)].var()))
    return lowest


def grad_norm(W: torch.Tensor, x: torch.Tensor, actions: torch.Tensor, adv: torch.Tensor, rows: torch.Tensor) -> float:
    """|| (1/N) Σ_{i∈S} A_i ∇_W log π(a_i | x_i) || for a linear-softmax policy π = softmax(x W)."""
    W = W.clone().requires_grad_(True)
    logp = torch.log_softmax(x[rows] @ W, -1).gather(1, actions[rows, None])[:, 0]  # (N,)
    (adv[rows] * logp).mean().backward()
    return float(W.grad.norm())


def sample_level(trials: int = 300, prompts: int = 8, G: int = 8, n: int = 16, dim: int = 6, arms: int = 5):
    g = torch.Generator().manual_seed(2)
    d3s, rand, pods = [], [], []
    for _ in range(trials):
        W = torch.randn(dim, arms, generator=g, dtype=torch.float64)
        ctx = torch.randn(prompts, dim, generator=g, dtype=torch.float64)
        x = ctx.repeat_interleave(G, 0)  # (B, dim)
        actions = torch.multinomial(torch.softmax(x @ W, -1), 1, generator=g)[:, 0]  # (B,)
        good = torch.rand(prompts, arms, generator=g) < 0.4  # which arms are right for each prompt
        rewards = good.repeat_interleave(G, 0).gather(1, actions[:, None])[:, 0].double()  # (B,)
        groups = torch.arange(prompts).repeat_interleave(G)
        adv = grpo(rewards, groups)  # (B,) on the full groups
        if not bool((adv != 0).any()):
            continue
        keep = max_variance_subset(adv, n).nonzero()[:, 0]
        by_reward = max_variance_subset(rewards + 1e-9 * torch.arange(len(rewards)), n).nonzero()[:, 0]
        d3s.append(grad_norm(W, x, actions, adv, keep))
        rand.append(grad_norm(W, x, actions, adv, torch.randperm(len(adv), generator=g)[:n]))
        pods.append(grad_norm(W, x, actions, adv, by_reward))
    return torch.tensor(d3s), torch.tensor(rand), torch.tensor(pods)


def token_level(trials: int = 200, B: int = 16, T: int = 8, arms: int = 6, frac: float = 0.2):
    """Share of the full-batch token-level gradient norm kept by the top-20% |A|·H tokens vs 20% random tokens,
    for a per-position softmax policy (logits (T, arms)) with sequence-level advantages."""
    g = torch.Generator().manual_seed(3)
    top, rand = [], []
    for _ in range(trials):
        scale = torch.linspace(0.2, 3.0, T, dtype=torch.float64)[:, None]  # positions differ in entropy
        logits0 = scale * torch.randn(T, arms, generator=g, dtype=torch.float64)
        probs = torch.softmax(logits0, -1)
        tokens = torch.multinomial(probs, B, replacement=True, generator=g).T  # (B, T)
        A = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T)  # (B, T)
        H = -(probs * probs.log()).sum(-1)[None, :].expand(B, T)  # (B, T)
        mask = torch.ones(B, T, dtype=torch.bool)

        def norm_of(sel: torch.Tensor) -> float:
            logits = logits0.clone().requires_grad_(True)
            logp = torch.log_softmax(logits, -1)[torch.arange(T)[None, :].expand(B, T), tokens]  # (B, T)
            (A * logp * sel).sum().backward()
            return float(logits.grad.norm())

        full = norm_of(mask)
        top.append(norm_of(top_score_tokens(A.abs() * H, mask, frac)) / full)
        r = torch.rand(B, T, generator=g, dtype=torch.float64)
        rand.append(norm_of(top_score_tokens(r, mask, frac)) / full)
    return torch.tensor(top), torch.tensor(rand)


def main() -> None:
    eq = brute_force_check()
    low = lemma1_min()
    d3s, rand, pods = sample_level()
    wins = float((d3s >= rand).float().mean())
    wins_pods = float((d3s >= pods).float().mean())
    top, rtok = token_level()
    tok_wins = float((top >= rtok).float().mean())
    ok = eq == 200 and low >= 1.0 and wins > 0.9

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ratio = (d3s / rand).log10().clamp(max=2.0)  # a random subset of zero-advantage rows has no gradient
    axes[0].hist(ratio.numpy(), bins=30, color="C0")
    axes[0].axvline(0, color="k", lw=1)
    axes[0].set(xlabel="log10(|g| D³S / |g| random), capped at 2", ylabel="trials",
                title=f"sample level: D³S >= random in {wins:.1%}")
    axes[1].hist([top.numpy(), rtok.numpy()], bins=30, label=["top 20% |A|·H", "random 20%"], color=["C1", "C7"])
    axes[1].set(xlabel="|g| kept / |g| all tokens", ylabel="trials", title="token level")
    axes[1].legend()
    fig.tight_layout()
    save_plot(fig, "d3s")
    details = (f"extremes = brute force {eq}/200, Lemma 1 min var {low:.3f} >= 1, "
            f"|g| D³S subset >= random subset in {wins:.1%} of {len(d3s)} trials (median ratio "
            f"{float((d3s / rand).median()):.2f})")
    line = verdict("d3s", ok, details, echo=False)
    write_report("d3s", f"""# D³S: the max-Var(A) subset carries a larger policy gradient

Paper: "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy Optimization"
(arXiv 2509.22115). Setup: `reproductions/d3s.py`; implementation `common/sampling/downsample.py`
(`max_variance_subset`, `top_score_tokens`, `D3SSampleSelector`, `D3STokenLoss`); recipe `configs/text_reasoning/d3s.yaml`.

| check (text.md §9 (e)) | threshold | result |
|---|---|---|
| extremes subset = brute force (200 vectors of 10, N = 4) | 200/200 | {eq}/200 |
| Lemma 1: standardised set, chosen subset's unbiased variance (3000 sets, size ≤ 11) | min ≥ 1 | min {low:.3f} |
| gradient norm, D³S subset vs random subset (linear-softmax bandit, 16 of 64 rollouts, GRPO A) | > 90% of trials | {wins:.1%} of {len(d3s)} (median ratio {float((d3s / rand).median()):.2f}) |
| gradient norm, D³S (max Var(A)) vs PODS-style max Var(R) subset, same size | (shown, not a threshold) | D³S ≥ in {wins_pods:.1%} (median ratio {float((d3s / pods).median()):.2f}) |
| token level: share of the full gradient norm kept by the top 20% tokens by abs(A)·H vs 20% random | (shown) | top ≥ random in {tok_wins:.1%}; median share {float(top.median()):.2f} vs {float(rtok.median()):.2f} |

Verdict: `{line}`

What this tests: the paper's mechanism (the subset of maximal advantage variance gives larger gradient norms
than a random subset, and the selection is exact and cheap). The PODS comparison picks rows by reward variance
across the batch; with group-normalised advantages it differs from D³S mainly in how it treats groups of
different spread. Not tested: the accuracy gains on AIME/AMC/MATH with Qwen2.5-Math-7B and Llama3.1-8B, and the
curriculum schedule (its values are not published; the recipe uses 25% → 100% of rollouts, 20% → 100% of tokens
over the first half of training).

![gradient norms](d3s.png)
""")
    print(line)


if __name__ == "__main__":
    main()
