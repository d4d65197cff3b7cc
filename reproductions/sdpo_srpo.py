"""SDPO (arXiv 2601.20802) and SRPO (arXiv 2604.02288): self-distillation from a re-prompted EMA self-teacher, and
the router that keeps correct samples on GRPO.

Checks (shared/methods/text.md §13 (e), §14 (e)), all on the library's functions and loss classes:
  SDPO (1) α = 0 / 1 equal torch's kl_div forward / reverse exactly; α = 0.5 symmetric;
       (2) top-k + tail sums to 1 (±1e-6);
       (3) density: teacher = student at positions 0-3 of a 5-token response, different at 4 -> the gradient w.r.t.
           the logits is 0 at 0-3 and non-zero at 4;
       (4) EMA: after one update θ̄ = 0.95 θ̄ + 0.05 θ.
  SRPO (1) routing table; (2) all-correct batch = token-mean clipped GRPO exactly; (3) mean of w over Ω is 1 for
       any β, β = 0 -> w ≡ 1; (4) the paper's ambiguity: a correct answer a, teacher shown a different correct
       sibling b -> SDPO lowers log π(a), SRPO raises it.
  Claim (small): a contextual bandit standing in for the LLM: 16 contexts x 6 answers, 2 correct per context
  (ambiguous), logit-table policy, G = 8 samples per context, 16 contexts per step, Adam lr 0.05, 150 steps,
  10 seeds. The self-teacher is the EMA policy (η = 0.05) re-prompted with the first successful sibling's answer,
  modelled as q ∝ π_θ̄ · exp(κ·1[v = sibling answer]) with κ = 3. GRPO, SDPO and SRPO use the library's
  ClippedPolicyLoss / SDPOLoss / SRPOLoss, trained through the library's loop (``common.loop.Loop`` over a
  logit-table ``Policy``, the self-teacher a ``Method`` part; both defined here). The paper's claim, scaled down: SDPO is ahead of GRPO early (step 10)
  and SRPO ends at least as high as both (step 150), judged by 95% t intervals of the paired seed differences
  (three-valued rule in ``PREREG``, restated with intervals after the first run).
  What the bandit cannot show: the paper's diagnosis that the self-teacher grows less reliable over long LLM
  training (here the teacher is reliable by construction), wall-clock budgets, and the benchmark numbers.

    python reproductions/sdpo_srpo.py       # ~1 min on 2 cores; writes reproductions/reports/sdpo_srpo.md and .png
    python reproductions/sdpo_srpo.py --smoke   # 2 seeds x 12 steps, no report (< 10 s)
"""

from __future__ import annotations

import math

from support.report import (diff_ci, eval_record, fmt_ci, plt, preregistration, save_plot, smoke_args, split_hash,
                            verdict, write_report)  # root on sys.path, Agg

import torch
import torch.nn.functional as F

from common.progress import progress  # step i/N and elapsed time on stderr
from common.advantages.group import grpo
from common.batch import RolloutBatch
from common.losses.ppo_clip import ClippedPolicyLoss
from common.losses.self_distill import Distillation, SDPOLoss, ema_update_, generalized_jsd, topk_with_tail
from common.losses.srpo import SRPOLoss, entropy_weights, srpo_routes
from common.loop import Loop, Stepper
from common.methods.base import Method
from common.policies.base import Policy, PolicyOutput

CONTEXTS, ANSWERS, CORRECT, G, STEPS, SEEDS = 16, 6, 2, 8, 150, 10
KAPPA, EMA, LR = 3.0, 0.05, 0.05

PREREG = preregistration(
    claim="SDPO learns faster than GRPO early (paper: higher avg@16 within the first hour on SciKnowEval / ToolAlpaca, "
          "Qwen3-8B) and SRPO ends at least as high as both (paper: SRPO above GRPO and SDPO at the end of training). "
          "Here: P(correct) at step 10, SDPO − GRPO > 0; at step 150, SRPO − GRPO >= 0 and SRPO − SDPO >= 0",
    control="GRPO (ClippedPolicyLoss, token mean) on the same bandit, seeds, initial logits, contexts per step, G = 8, "
            "Adam lr 0.05, steps; SDPO and SRPO see the same rollouts budget (16 contexts x 8 samples a step)",
    seeds=list(range(SEEDS)),
    not_reproduced_if="a component check fails, or the paired 95% t interval of SDPO − GRPO at step 10 lies below 0, or "
                      "that of SRPO − GRPO or SRPO − SDPO at step 150 lies below 0",
    inconclusive_if="no interval lies on the wrong side but SDPO − GRPO at step 10 is not above 0. Post hoc: written "
                    "after the first run (whose rule was 'SDPO − GRPO > 2 SE early, SRPO not below either by more than "
                    "2 SE late', verdict not reproduced); it restates that rule with t intervals")


def component_checks() -> dict[str, float | bool]:
    gen = torch.Generator().manual_seed(0)
    P = torch.log_softmax(torch.randn(4, 7, generator=gen, dtype=torch.float64), -1)
    Q = torch.log_softmax(torch.randn(4, 7, generator=gen, dtype=torch.float64), -1)
    fwd = float((generalized_jsd(P, Q, 0.0) - F.kl_div(P, Q, reduction="none", log_target=True).sum(-1)).abs().max())
    rev = float((generalized_jsd(P, Q, 1.0) - F.kl_div(Q, P, reduction="none", log_target=True).sum(-1)).abs().max())
    sym = float((generalized_jsd(P, Q, 0.5) - generalized_jsd(Q, P, 0.5)).abs().max())
    logp = torch.log_softmax(torch.randn(50, 200, generator=gen, dtype=torch.float64), -1)
    tail = float((topk_with_tail(logp, logp.topk(20, -1).indices).exp().sum(-1) - 1).abs().max())
    # density: 5 positions, teacher = student at 0-3
    z = torch.randn(1, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = z.detach().clone()
    zt[0, 4] += torch.randn(8, generator=gen, dtype=torch.float64)
    idx = torch.arange(8).expand(1, 5, 8)
    d = Distillation(student=topk_with_tail(torch.log_softmax(z, -1), idx, add_tail=False),
                     teacher=topk_with_tail(torch.log_softmax(zt, -1), idx, add_tail=False),
                     teacher_entropy=torch.zeros(1, 5, dtype=torch.float64), has_teacher=torch.tensor([True]))
    lp = torch.zeros(1, 5, dtype=torch.float64)
    SDPOLoss(top_k=8)(lp, lp, torch.zeros(1), torch.ones(1, 5, dtype=torch.bool), distill=d).loss.backward()
    g = z.grad.abs().sum(-1)[0]
    teacher, student = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    before = teacher.weight.detach().clone()
    ema_update_(teacher, student, 0.05)
    ema = float((teacher.weight - (0.95 * before + 0.05 * student.weight)).detach().abs().max())
    # SRPO
    routes = srpo_routes(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])).tolist()
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    lp = torch.randn(3, 3, generator=gen, dtype=torch.float64) - 2
    old, adv = lp + 0.1, torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    S = torch.log_softmax(torch.randn(3, 3, 4, generator=gen, dtype=torch.float64), -1)
    dd = Distillation(student=S, teacher=S.flip(-1), teacher_entropy=torch.ones(3, 3, dtype=torch.float64),
                      has_teacher=torch.tensor([True, True, False]))
    batch = RolloutBatch(prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.bool),
                         completion_ids=torch.zeros(3, 3, dtype=torch.long), completion_mask=mask,
                         group_ids=torch.zeros(3, dtype=torch.long), correct=torch.ones(3, dtype=torch.bool))
    all_correct = float((SRPOLoss()(lp, old, adv, mask, batch=batch, distill=dd).loss
                         - ClippedPolicyLoss(eps_high=0.28, aggregation="token_mean")(lp, old, adv, mask).loss).abs())
    H = torch.rand(4, 3, generator=gen, dtype=torch.float64) * 3
    omega = torch.rand(4, 3, generator=gen) < 0.6
    w_mean = max(abs(float(entropy_weights(H, omega, b)[omega].mean()) - 1) for b in (0.0, 0.5, 1.0, 4.0))
    w_beta0 = bool((entropy_weights(H, omega, 0.0)[omega] == 1).all())
    # ambiguity: π uniform over {a, b, c}; rollout a correct; teacher shown b: q = (0.1, 0.8, 0.1)
    zz = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)
    lpz = torch.log_softmax(zz, -1)
    amb = Distillation(student=lpz, teacher=torch.log(torch.tensor([[[0.1, 0.8, 0.1]]], dtype=torch.float64)),
                       teacher_entropy=torch.zeros(1, 1, dtype=torch.float64), has_teacher=torch.tensor([True]))
    m1 = torch.ones(1, 1, dtype=torch.bool)
    b1 = RolloutBatch(prompt_ids=torch.zeros(1, 1, dtype=torch.long), prompt_mask=m1.clone(),
                      completion_ids=torch.zeros(1, 1, dtype=torch.long), completion_mask=m1,
                      group_ids=torch.zeros(1, dtype=torch.long), correct=torch.tensor([True]))
    grad_log_a = torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)  # ∇_z log π(a) at uniform π
    (gs,) = torch.autograd.grad(SDPOLoss(top_k=3)(lpz[..., 0], lpz[..., 0].detach(), torch.ones(1), m1, distill=amb).loss,
                                zz, retain_graph=True)
    (gr,) = torch.autograd.grad(SRPOLoss(top_k=3)(lpz[..., 0], lpz[..., 0].detach(), torch.ones(1), m1, batch=b1,
                                                  distill=amb).loss, zz)
    return {"kl_forward": fwd, "kl_reverse": rev, "jsd_symmetry": sym, "tail_sum": tail,
            "grad_0_3": float(g[:4].max()), "grad_4": float(g[4]), "ema": ema,
            "routes_ok": routes == [False, False, True, False], "all_correct_vs_grpo": all_correct,
            "w_mean_minus_1": w_mean, "w_beta0_is_1": w_beta0,
            "dlogpi_a_sdpo": float(-(grad_log_a * gs.flatten()).sum()), "dlogpi_a_srpo": float(-(grad_log_a * gr.flatten()).sum())}


class TabularPolicy(Policy):
    """A logit-table policy θ (CONTEXTS, ANSWERS): π(v | c) = softmax(θ_c)_v, one token per answer (T = 1).

    Prompts are dicts ``{"index": c}``; the row's context travels in ``batch.inputs["context"]`` (B,). Each row
    samples its answer with the script's generator. ``forward(..., hidden=True)`` also returns the full
    log-probabilities log π(· | c) (B, 1, ANSWERS) as the features at the action position, which the self-teacher
    method distils against.
    """

    def __init__(self, theta: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.theta = torch.nn.Parameter(theta)  # (CONTEXTS, ANSWERS)
        self.generator, self.horizon = generator, 1

    @torch.no_grad()
    def rollout(self, prompts, n, *, greedy=False):
        ctx = torch.tensor([p["index"] for p in prompts]).repeat_interleave(n)  # (B,) row p·n + j: sample j of p
        y = torch.multinomial(torch.softmax(self.theta[ctx], -1), 1, generator=self.generator).squeeze(1)  # (B,)
        return RolloutBatch(completion_ids=y[:, None], completion_mask=torch.ones(y.shape[0], 1, dtype=torch.bool),
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n), inputs={"context": ctx})

    def forward(self, batch, *, epoch=0, reference=False, hidden=False):
        logp = torch.log_softmax(self.theta[batch.inputs["context"]], -1)  # (B, V)
        m = batch.completion_mask  # (B, 1)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True) * m  # (B, 1)
        return PolicyOutput(logp.gather(1, batch.completion_ids) * m, entropy, logp[:, None] if hidden else None)


class BanditSelfTeacher(Method):
    """The re-prompted EMA self-teacher of SDPO / SRPO for the logit table (the bandit's stand-in for
    ``text_reasoning.self_distill.SelfDistillation``):

        after_score   teacher context: the first successful sibling j ≠ i of the row's group
                      (dont_reprompt_on_self_success); its answer goes in ``teacher_prompt_ids`` (B, 1), h_i in
                      ``has_teacher`` (B,)
        loss_inputs   q = log softmax(θ̄_c + κ·1[v = sibling answer]) (B, 1, V) against the student's log π(· | c)
                      from the policy forward, passed to the loss as ``distill``
        after_update  θ̄ ← (1 − η) θ̄ + η θ
    """

    provides = ("teacher_prompt_ids", "teacher_prompt_mask", "has_teacher")
    needs_hidden = True

    def __init__(self, kappa: float, ema: float):
        super().__init__()
        self.kappa, self.ema = kappa, ema

    def setup(self, loop) -> None:
        self.register_buffer("teacher", loop.policy.theta.detach().clone())  # θ̄ (CONTEXTS, ANSWERS)

    def after_score(self, loop, batch):
        ok, gid = batch.correct, batch.group_ids  # (B,)
        B = batch.batch_size
        rows = torch.arange(B)
        cand = ok[None, :] & (gid[None, :] == gid[:, None]) & (rows[None, :] != rows[:, None])  # (B, B)
        has = cand.any(1)  # (B,)
        donor = torch.where(cand, rows[None, :], B).min(1).values.clamp(max=B - 1)  # (B,)
        return batch.replace(teacher_prompt_ids=batch.completion_ids[donor] * has[:, None],
                             teacher_prompt_mask=has[:, None].clone(), has_teacher=has)

    def loss_inputs(self, loop, micro, out, inputs):
        tilt = self.kappa * F.one_hot(micro.teacher_prompt_ids[:, 0], ANSWERS).float() * micro.teacher_prompt_mask  # (B, V)
        q = torch.log_softmax(self.teacher[micro.inputs["context"]] + tilt, -1)  # (B, V) the re-prompted EMA teacher
        return {"distill": Distillation(student=out.hidden, teacher=q[:, None],
                                        teacher_entropy=-(q.exp() * q).sum(-1, keepdim=True), has_teacher=micro.has_teacher)}

    def after_update(self, loop, batch):
        with torch.no_grad():
            self.teacher.lerp_(loop.policy.theta.detach(), self.ema)
        return {}


def train(method: str, seed: int) -> list[float]:
    """The library's loop (``common.loop.Loop``) on a ``TabularPolicy``: G samples per context, Dr.GRPO-centred
    advantages, the method's loss (SDPO / SRPO with the ``BanditSelfTeacher`` part), one Adam step a batch.
    Accuracy Σ_{v correct} π(v|c), mean over contexts, after every step."""
    gen = torch.Generator().manual_seed(seed)
    policy = TabularPolicy(torch.randn(CONTEXTS, ANSWERS, generator=gen), gen)
    correct = torch.zeros(CONTEXTS, ANSWERS, dtype=torch.bool)
    correct.scatter_(1, torch.rand(CONTEXTS, ANSWERS, generator=gen).argsort(1)[:, :CORRECT], True)
    loss_fn = {"grpo": ClippedPolicyLoss(eps_high=0.28, aggregation="token_mean"),
               "sdpo": SDPOLoss(top_k=ANSWERS, add_tail=False), "srpo": SRPOLoss(top_k=ANSWERS, add_tail=False)}[method]

    def score(b: RolloutBatch) -> RolloutBatch:
        ok = correct[b.inputs["context"], b.completion_ids[:, 0]]  # (B,)
        return b.replace(rewards=ok.float(), correct=ok)

    methods = [] if method == "grpo" else [BanditSelfTeacher(KAPPA, EMA)]
    loop = Loop(policy, score, lambda b: grpo(b.rewards, b.group_ids, scale="none"), loss_fn, methods=methods,
                group_size=G, provided=("correct",))  # Dr.GRPO centring, from all G rollouts
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=LR)
    stepper = Stepper(opt, policy.trainable_parameters(), max_grad_norm=0.0)
    prompts = [{"index": c} for c in range(CONTEXTS)]
    acc = []
    for _ in range(STEPS):
        loop.update(loop.collect(prompts).kept, stepper)
        with torch.no_grad():
            acc.append(float((torch.softmax(policy.theta, -1) * correct).sum(1).mean()))
    return acc


def main() -> None:
    global STEPS, SEEDS
    args = smoke_args(__doc__, "2 seeds x 12 steps, no report (< 10 s)")
    if args.smoke:
        STEPS, SEEDS = 12, 2
    c = component_checks()
    checks_ok = (c["kl_forward"] == 0 and c["kl_reverse"] == 0 and c["jsd_symmetry"] < 1e-12 and c["tail_sum"] < 1e-6
                 and c["grad_0_3"] < 1e-12 and c["grad_4"] > 1e-3 and c["ema"] < 1e-6 and c["routes_ok"]
                 and c["all_correct_vs_grpo"] == 0 and c["w_mean_minus_1"] < 1e-12 and c["w_beta0_is_1"]
                 and c["dlogpi_a_sdpo"] < 0 < c["dlogpi_a_srpo"])
    curves = {m: torch.tensor([train(m, s) for s in progress(range(SEEDS), f"sdpo_srpo: {m}, seeds")]) for m in ("grpo", "sdpo", "srpo")}  # (S, STEPS)

    def paired(a: str, b: str, step: int) -> tuple[float, float, float]:
        return diff_ci(curves[a][:, step].tolist(), curves[b][:, step].tolist())  # (mean, low, high), same seeds

    early, late = 9, STEPS - 1
    sdpo_early = paired("sdpo", "grpo", early)
    srpo_vs_grpo, srpo_vs_sdpo = paired("srpo", "grpo", late), paired("srpo", "sdpo", late)
    if not checks_ok or any(ci[2] < 0 for ci in (sdpo_early, srpo_vs_grpo, srpo_vs_sdpo)):
        outcome = "not reproduced"
    elif sdpo_early[1] > 0:
        outcome = "reproduced"
    else:
        outcome = "inconclusive"
    if args.smoke:
        verdict("sdpo_srpo (smoke)", outcome, f"{SEEDS} seeds x {STEPS} steps, checks {'pass' if checks_ok else 'FAIL'}")
        return

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, cur in curves.items():
        mean, se = cur.mean(0), cur.std(0) / math.sqrt(SEEDS)
        ax.plot(range(1, STEPS + 1), mean, label=m.upper())
        ax.fill_between(range(1, STEPS + 1), mean - 2 * se, mean + 2 * se, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"P(correct answer), mean of {SEEDS} seeds (±2 SE)")
    ax.legend()
    fig.tight_layout()
    save_plot(fig, "sdpo_srpo")

    table = "\n".join(f"| {m.upper()} | {float(cur[:, 0].mean()):.3f} | {float(cur[:, early].mean()):.3f} | "
                      f"{float(cur[:, 49].mean()):.3f} | {float(cur[:, late].mean()):.3f} |" for m, cur in curves.items())
    details = (f"component checks {'pass' if checks_ok else 'FAIL'} (ambiguity dlogπ(a): SDPO "
            f"{c['dlogpi_a_sdpo']:+.3f}, SRPO {c['dlogpi_a_srpo']:+.3f}); bandit P(correct) step {early + 1}: SDPO − GRPO "
            f"{fmt_ci(sdpo_early, signed=True)}; step {STEPS}: SRPO − GRPO {fmt_ci(srpo_vs_grpo, signed=True)}, "
            f"SRPO − SDPO {fmt_ci(srpo_vs_sdpo, signed=True)} (seeds 0-{SEEDS - 1}, paired 95% t intervals)")
    rows = "\n".join(f"| {k} | {v:.2e} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in c.items())
    line = verdict("sdpo_srpo", outcome, details, echo=False)
    record = eval_record(task=f"ambiguous bandit, {CONTEXTS} contexts x {ANSWERS} answers, {CORRECT} correct per context",
                         prompt_template="none (a context index)", answer_extraction="none (the answer index)",
                         eos_rule="none (one action)", sampling="none: P(correct) is computed exactly, mean over contexts "
                         "of Σ_{v correct} softmax(θ_c)[v], after each step", split="all 16 contexts (train = evaluation); "
                         "hash " + split_hash(range(CONTEXTS)), seeds=list(range(SEEDS)))
    write_report("sdpo_srpo", f"""# SDPO (arXiv 2601.20802) and SRPO (arXiv 2604.02288)

Library code under test: `common/losses/self_distill.py` (SDPO loss, top-k + tail, generalised JSD, EMA),
`common/losses/srpo.py` (routing, teacher-entropy weights, joint token mean); the LLM path
(`text_reasoning/self_distill.py`: re-prompted EMA teacher on real tokens) is covered by
`tests/text_reasoning/test_self_distill.py`, not by this script.

## Component checks (spec §13 (e), §14 (e))

| check | value |
|---|---|
{rows}

(`kl_*`: |D_α − torch kl_div| at α = 0 / 1; `grad_0_3` / `grad_4`: |∂L/∂logits| where teacher = student / differs;
`all_correct_vs_grpo`: |SRPO − token-mean GRPO| on an all-correct batch; `dlogpi_a_*`: change of log π(a) after a
gradient step per unit step size, for a correct answer a whose teacher prefers a different correct answer b.)

{PREREG}
## Bandit (the claim, scaled down)

{CONTEXTS} contexts x {ANSWERS} answers ({CORRECT} correct per context), logit-table policy from N(0, 1) logits,
G = {G}, Adam lr {LR}, {STEPS} steps, {SEEDS} seeds, trained through the library's loop (`common.loop.Loop`; the
policy and the self-teacher `Method` part are defined in the script). Self-teacher: EMA policy (η = {EMA}) tilted by κ = {KAPPA}
toward the first successful sibling's answer; rows without a successful sibling have no teacher.

| method | P(correct) step 1 | step {early + 1} | step 50 | step {STEPS} |
|---|---|---|---|---|
{table}

![P(correct)](sdpo_srpo.png)

Rule: the pre-registered one above (paired 95% t intervals over the {SEEDS} seeds).

Verdict: claim **{outcome}**.

`{line}`

Reading: the bandit has one token per answer, so SDPO's main advantage in the paper (dense, per-token credit from
the teacher's logits, check 3 above) has nothing to act on; its per-answer signal here is weaker than GRPO's, and
SRPO, which drops GRPO's negative gradients on failed samples in favour of that signal, ends lower. The mechanism
checks (routing, weights, ambiguity signs) hold; the outcome claim does not show at this scale.

Not tested: the paper's benchmark numbers (SciKnowEval, ToolAlpaca avg@16 within 1 h / 10 h on Qwen3-4B/8B), the
late-training degradation of SDPO (it comes from a self-teacher that grows less reliable, which a bandit with a
fixed tilt κ does not have), and an LLM-scale comparison.

{record}""")
    print(line)


if __name__ == "__main__":
    main()
