"""Step-level Direct Advantage Policy Optimization (Skywork, arXiv 2412.18279): regressing the actor's log-ratio
on critic step advantages, A(s, a) = V(s ⊕ a) − V(s), improves the policy.

Check (shared/methods/text.md §22 (e)): a two-step tree (2 first steps x 2 second steps, known leaf success
probabilities, π_ref given), a tabular softmax actor per state, the loss of `common.losses.step_advantage`
averaged over π_ref's states and candidate steps, minimised to convergence (one offline actor update):
(1) with the exact critic, for β in {0.05 .. 2}: the expected success J(π) vs J(π_ref) and vs the KL-regularised
    optimum π* ∝ π_ref·exp(A/β); the fitted log-ratio vs A/β on the candidate steps;
(2) robustness: 1000 random trees (random π_ref and leaf probabilities) with a Monte-Carlo critic (V from 8
    outcome samples per state, as the paper's MC labels), β = 0.5: the fraction where J(π) > J(π_ref).
The paper's claim (policy improvement) is reproduced if J improves for every β on the fixed tree and in >= 95%
of the random trees (mean over 3 seeds of 1000 trees, the mean gain's 95% t interval above 0; three-valued rule
in ``PREREG``, restated after the first run, which had one seed). The spec's second part, log-ratio ≈ A/β, is reported separately: our threshold, fixed
before the run, was correlation > 0.99 for β >= 0.2; it holds only for β >= 1 (|A/β| <= 0.4). The paper's MATH/GSM8K/code gains need an LLM
and are not tested; the library's offline LM pipeline (text_reasoning/offline_steps.py) is exercised by tests.

    python reproductions/dapo_step.py       # ~10 s on 2 cores; writes reproductions/reports/dapo_step.md + .png
    python reproductions/dapo_step.py --smoke   # 2 seeds x 50 random trees, no report
"""

from __future__ import annotations


from support.report import (ROOT, eval_record, fmt_ci, mean_ci, plt, preregistration, save_plot, smoke_args, split_hash,
                            verdict, write_report)  # root on sys.path, Agg

import torch

from common.losses.step_advantage import direct_advantage_loss

RECORDS = ROOT / "configs/text_reasoning/data/dapo_step_arithmetic.jsonl"
BETAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
TREES, MC = 1000, 8
SEEDS = (0, 1, 2)

PREREG = preregistration(
    claim="one offline actor update that regresses log π/π_ref on critic step advantages A/β improves the policy "
          "(paper: step-level DAPO raises MATH / GSM8K accuracy of SFT models; no number for a tree). Here: J(π) > "
          "J(π_ref) for every β in {0.05 .. 2} on the fixed two-step tree (exact critic), and on random trees with a "
          "noisy MC critic (8 samples per state, β = 0.5) J improves in >= 95% of trees",
    control="J(π_ref), the reference policy the update starts from (the same tree, the same critic labels); J(π*) of "
            "the KL-regularised optimum is reported beside it",
    seeds="random trees: seeds 0, 1, 2 (1000 trees each; the fixed tree is deterministic)",
    not_reproduced_if="J(π) <= J(π_ref) for some β on the fixed tree, or the mean over seeds of the improved fraction "
                      "is below 0.8, or the 95% t interval of the mean gain J(π) − J(π_ref) lies below 0",
    inconclusive_if="neither (e.g. an improved fraction between 0.8 and 0.95). Post hoc: written after the first run "
                    "(one seed, rule 'every β and >= 95% of trees', verdict reproduced); seeds 1, 2, the interval and "
                    "the not-reproduced side are added")


def random_trees(seed: int, trees: int = TREES):
    """The robustness check on ``trees`` random trees with an MC critic (β = 0.5). Returns the improved fraction, the
    gains J(π) − J(π_ref) (N,), and how many non-improved trees had a step advantage of the wrong sign / in all."""
    torch.manual_seed(seed)  # the Dirichlet draws use the global generator
    gen = torch.Generator().manual_seed(seed)
    rf = torch.distributions.Dirichlet(torch.ones(2)).sample((trees,))  # (N, 2)
    rs = torch.distributions.Dirichlet(torch.ones(2)).sample((trees, 2))  # (N, 2, 2)
    pp = torch.rand(trees, 2, 2, generator=gen)
    # MC critic: V(a) from MC outcome samples of π_ref below a, V(s0) from MC samples from the root
    leaf_draw = lambda probs, n: (torch.rand(*probs.shape, n, generator=gen) < probs[..., None]).double().mean(-1)  # noqa: E731
    v_mid_mc = (rs * leaf_draw(pp, MC)).sum(-1)  # (N, 2): E over b exactly, outcomes sampled MC times per leaf
    v_root_mc = (rf * leaf_draw(v_mid_mc, MC)).sum(-1)  # (N,)
    af, as_ = advantages(rf, rs, pp, v_mid_mc, v_root_mc)
    pf, ps = fit(rf, rs, af, as_, 0.5)
    j_ref_r, j_r = success(rf, rs, pp), success(pf, ps, pp)
    ef, es = advantages(rf, rs, pp)  # exact advantages of the same trees
    flipped = ((ef.sign() != af.sign()).any(-1) | (es.sign() != as_.sign()).flatten(1).any(-1))  # (N,)
    worse = j_r <= j_ref_r
    return float((j_r > j_ref_r).double().mean()), j_r - j_ref_r, int((worse & flipped).sum()), int(worse.sum())


def success(pi_first, pi_second, p):
    """J = Σ_a π(a) Σ_b π(b|a) p(a, b). Shapes: (..., 2), (..., 2, 2), (..., 2, 2) -> (...)."""
    return (pi_first * (pi_second * p).sum(-1)).sum(-1)


def advantages(ref_first, ref_second, p, v_mid=None, v_root=None):
    """Exact (or given) values and step advantages. A(s0, a) = V(a) − V(s0); A(a, b) = p(a, b) − V(a)."""
    v_mid = (ref_second * p).sum(-1) if v_mid is None else v_mid  # (..., 2)
    v_root = (ref_first * v_mid).sum(-1) if v_root is None else v_root  # (...)
    return v_mid - v_root[..., None], p - v_mid[..., None]  # (..., 2), (..., 2, 2)


def fit(ref_first, ref_second, a_first, a_second, beta):
    """Minimise E_{s∼d_ref} E_{a∼π_ref} (log π − log π_ref − A/β)² over free logits (LBFGS to convergence)."""
    lf, ls = ref_first.log().clone().requires_grad_(True), ref_second.log().clone().requires_grad_(True)
    d_mid = ref_first  # (..., 2) probability of reaching each second-step state under π_ref
    opt = torch.optim.LBFGS([lf, ls], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        first = direct_advantage_loss(torch.log_softmax(lf, -1).flatten(), ref_first.log().flatten(), a_first.flatten(), beta)
        second = direct_advantage_loss(torch.log_softmax(ls, -1).flatten(), ref_second.log().flatten(), a_second.flatten(), beta)
        loss = (ref_first.flatten() * first).sum() + ((d_mid[..., None] * ref_second).flatten() * second).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(lf, -1).detach(), torch.softmax(ls, -1).detach()


def main() -> None:
    args = smoke_args(__doc__, "2 seeds x 50 random trees, no report")
    torch.set_default_dtype(torch.float64)
    ref_first = torch.tensor([0.6, 0.4])
    ref_second = torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    p = torch.tensor([[0.9, 0.1], [0.6, 0.5]])
    a_first, a_second = advantages(ref_first, ref_second, p)
    # V(a1) = 0.5, V(a2) = 0.57, V(s0) = 0.528: A(s0, ·) = (−0.028, +0.042); A(a1, ·) = ±0.4; A(a2, ·) = (0.03, −0.07)
    j_ref = float(success(ref_first, ref_second, p))
    rows, fixed_ok, fit_ok = [], True, True
    for beta in BETAS:
        pf, ps = fit(ref_first, ref_second, a_first, a_second, beta)
        star_f = ref_first * (a_first / beta).exp()
        star_s = ref_second * (a_second / beta).exp()
        j, j_star = float(success(pf, ps, p)), float(success(star_f / star_f.sum(), star_s / star_s.sum(-1, keepdim=True), p))
        ratio = torch.cat([(pf / ref_first).log(), (ps / ref_second).log().flatten()])
        target = torch.cat([a_first, a_second.flatten()]) / beta
        corr = float(torch.corrcoef(torch.stack([ratio, target]))[0, 1])
        err = float((ratio - target).abs().max())
        fixed_ok &= j > j_ref
        fit_ok &= beta < 0.2 or corr > 0.99
        rows.append((beta, j, j_star, corr, err, float(target.abs().max())))

    per_seed = [random_trees(sd, 50 if args.smoke else TREES) for sd in SEEDS[:2 if args.smoke else 3]]
    improved_ci = mean_ci([r[0] for r in per_seed])  # improved fraction, mean [95% t] over seeds
    gain_ci = mean_ci([float(r[1].mean()) for r in per_seed])  # mean gain per seed
    improved, gain, worse_flipped, worse_n = per_seed[0][0], per_seed[0][1], per_seed[0][2], per_seed[0][3]  # seed 0: plot
    worse_flipped_all, worse_all = sum(r[2] for r in per_seed), sum(r[3] for r in per_seed)
    if not fixed_ok or improved_ci[0] < 0.8 or gain_ci[2] < 0:
        outcome = "not reproduced"
    elif improved_ci[0] >= 0.95 and gain_ci[1] > 0:
        outcome = "reproduced"
    else:
        outcome = "inconclusive"
    if args.smoke:
        verdict("dapo_step (smoke)", outcome, f"{len(per_seed)} seeds x 50 trees, improved {fmt_ci(improved_ci)}")
        return
    import json

    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    finals = [r for r in records if r["terminal"]]
    adv = torch.tensor([r["advantage"] for r in records])
    lm = (f"{len(records)} step records from {len(finals)} SmolLM2 rollouts on one-digit sums "
          f"({sum(r['reward'] > 0.5 for r in finals)} correct, {sum(1 for r in finals if not r['eos'])} cut at 40 tokens); "
          f"critic advantages mean {float(adv.mean()):+.3f}, std {float(adv.std()):.3f}, range [{float(adv.min()):+.2f}, "
          f"{float(adv.max()):+.2f}]")
    labels = torch.tensor([r["reward"] for r in records])
    fit_rmse = float((torch.tensor([r["value"] for r in records]) - labels).pow(2).mean().sqrt())

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(BETAS, [r[1] for r in rows], "o-", label="J(π), DAPO-step fit")
    axes[0].plot(BETAS, [r[2] for r in rows], "s--", label="J(π*), π* ∝ π_ref exp(A/β)")
    axes[0].axhline(j_ref, color="k", lw=0.8, label="J(π_ref)")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("β")
    axes[0].set_ylabel("expected success")
    axes[0].legend(fontsize=8)
    axes[1].hist(gain.numpy(), bins=50)
    axes[1].set_xlabel("J(π) − J(π_ref), 1000 random trees (seed 0), MC critic, β = 0.5")
    fig.tight_layout()
    save_plot(fig, "dapo_step")

    per_seed_rows = "\n".join(f"| {sd} | {r[0]:.3f} | {float(r[1].mean()):+.4f} | {float(r[1].min()):+.4f} |"
                              for sd, r in zip(SEEDS, per_seed))
    record = eval_record(task="two-step trees (2 x 2 steps) with known leaf success probabilities",
                         prompt_template="none (tabular states)", answer_extraction="none (leaf success probability)",
                         eos_rule="none (two steps)", sampling="none: J = Σ_a π(a) Σ_b π(b|a) p(a, b) exactly",
                         split=f"the fixed tree, and {TREES} random trees per seed (torch.manual_seed(seed) Dirichlet(1, 1) "
                         f"policies, uniform leaf probabilities); fixed-tree hash {split_hash([[0.6, 0.4], [[0.5, 0.5], [0.7, 0.3]], [[0.9, 0.1], [0.6, 0.5]]])}",
                         seeds=list(SEEDS))
    table = "\n".join(f"| {b} | {j:.4f} | {js:.4f} | {c:.4f} | {e:.3f} | {t:.2f} |" for b, j, js, c, e, t in rows)
    write_report("dapo_step", f"""# Step-level DAPO (Skywork, arXiv 2412.18279): the offline step-advantage regression

Setup: two-step tree, π_ref(a1, a2) = (0.6, 0.4), π_ref(b | a1) = (0.5, 0.5), π_ref(b | a2) = (0.7, 0.3), leaf success
p = ((0.9, 0.1), (0.6, 0.5)); exact critic V(a1) = 0.5, V(a2) = 0.57, V(s0) = 0.528; J(π_ref) = {j_ref:.4f}.
A tabular softmax actor minimises E_(s ∼ d_ref, a ∼ π_ref)[(log π(a|s) − log π_ref(a|s) − A(s, a)/β)²]
(`direct_advantage_loss`) to convergence. π* is the KL-regularised optimum the regression approximates.

{PREREG}
| β | J(π) | J(π*) | corr(log π/π_ref, A/β) | max abs(log-ratio − A/β) | max abs(A/β) |
|---|---|---|---|---|---|
{table}

Random trees ({TREES} per seed, π_ref and leaf probabilities uniform at random, critic from {MC} MC outcome samples per
state, β = 0.5), seeds {", ".join(str(x) for x in SEEDS)}:

| seed | improved fraction | mean gain | worst gain |
|---|---|---|---|
{per_seed_rows}
| mean [95% t] | {fmt_ci(improved_ci)} | {fmt_ci(gain_ci, 4, signed=True)} | |

![success vs beta](dapo_step.png)

Verdict: claim **{outcome}** at toy scale: one offline actor update on critic step advantages improves the
expected success for every β on the fixed tree and in {improved_ci[0]:.1%} of random trees (mean of {len(per_seed)} seeds)
with a noisy MC critic.
The spec's second check, "the fitted log-ratio is ≈ A/β", is **{"reproduced" if fit_ok else "not reproduced"}** by our
pre-set threshold (correlation > 0.99 for β >= 0.2): it holds only where |A/β| is small (correlation 0.990 at
β = 1, 0.997 at β = 2); at small β
the ignored log Z(s) = log E_π_ref exp(A/β) dominates and the fitted log-ratio is far from A/β (max error 7.3 at
β = 0.05 against targets up to 8), although the resulting policy is close to π* in success. In {worse_flipped_all} of the {worse_all}
random trees (all seeds) where J does not improve, the MC critic got the sign of at least one step advantage wrong. Not tested: the paper's MATH/GSM8K/code benchmark
gains (LLM scale), iterative DAPO, and the exact loss scaling (unverified in our sources). The LM pipeline (steps
= lines of SmolLM2 rollouts, a linear critic on the reference model's hidden state, offline actor training) is
built in `text_reasoning/offline_steps.py` and run by the recipe `configs/text_reasoning/dapo_step.yaml`.
Its committed data: {lm}. The critic's RMSE on its own (one-sample MC) labels is {fit_rmse:.3f} against a label
std of {float(labels.std(unbiased=False)):.3f}: fitted on {len(records)} states, with no held-out check, so it is a
weak critic; the recipe shows the pipeline runs end to end, not that it improves SmolLM2.

{record}""")
    verdict("dapo_step", outcome, f"J(π_ref) {j_ref:.4f} -> J(π) " + ", ".join(f"{r[1]:.4f}@β={r[0]}" for r in rows)
          + f"; random trees improved {fmt_ci(improved_ci)}, mean gain {fmt_ci(gain_ci, 4, signed=True)} "
          f"(MC critic, seeds {', '.join(str(x) for x in SEEDS[:len(per_seed)])}, 95% t); log-ratio ≈ A/β {'holds' if fit_ok else 'fails'} "
          f"(corr {rows[0][3]:.3f} at β={rows[0][0]}, {rows[-1][3]:.3f} at β={rows[-1][0]})")


if __name__ == "__main__":
    main()
