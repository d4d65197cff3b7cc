"""UI-S1 (semi-online RL, arXiv 2509.11543) and MAPO (mixed turn/batch normalisation, arXiv 2603.06194) vs episode-level
GRPO at equal episodes, at CPU scale (issue 21; reports/uis1_mapo.md holds the claims and the verdict rules, committed
before the first run; shared/methods/agentic.md §9 and §10).

Both toys train a free logit table θ[task, turn, action] (one row per episode, one action token per turn: layout B of
agentic.md §1) through the library's code: the real ``common.loop.Loop`` / ``Stepper``, ``ClippedPolicyLoss``, the
turn table of ``common.segment_ops`` and the estimators ``common.advantages.uis1.UISemiOnline`` and
``common.advantages.mapo.MAPO``. The arms differ only in the advantage estimator (and, for UI-S1's patch check, in ε).

    U  UI-S1 on a T = 10 expert trajectory per task (K = 5 actions, the state is always the expert's: semi-online),
       patching up to ε = 2 mismatches; vs episode GRPO; and ε = 2 vs ε = 0.
    M  MAPO on an 8-turn "dialogue" with a judge's dense process reward (position-scaled, with a delayed effect);
       vs episode GRPO and vs turn-only / batch-only normalisation.

    OMP_NUM_THREADS=1 .venv/bin/python reproductions/uis1_mapo.py          # writes reports/uis1_mapo.{md,png}
    OMP_NUM_THREADS=1 .venv/bin/python reproductions/uis1_mapo.py --smoke  # seconds; writes nothing
"""

from __future__ import annotations

from support.report import REPORTS, eval_record, mean_ci, overall, plt, split_hash, save_plot, table, verdict  # the repository root on sys.path, Agg

import argparse
import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.advantages.group import grpo
from common.advantages.mapo import MAPO, mapo
from common.advantages.uis1 import UISemiOnline, uis1
from common.batch import RolloutBatch
from common.loop import Loop, Stepper
from common.losses.ppo_clip import ClippedPolicyLoss
from common.policies.base import PolicyOutput
from common.policies.toy import _ToyPolicy
from common.segment_ops import turn_table

TASKS, G, SEEDS = 8, 8, 10
U_T, U_K, U_P0, U_LR, U_STEPS, U_EPS = 10, 5, 0.3, 20.0, 40, 2  # lr: see the report's deviation
M_T, M_K, M_LR, M_STEPS = 8, 4, 10.0, 40


def interval(diff: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired per-seed differences (one seed: no interval)."""
    return mean_ci(diff, one_seed_half=math.nan)


def rule(m: float, lo: float, hi: float, thr: float) -> str:
    """The pre-registered rule: reproduced if mean ≥ thr and lo > 0; not reproduced if hi < thr or mean ≤ 0."""
    if m >= thr and lo > 0:
        return "reproduced"
    if hi < thr or m <= 0:
        return "not reproduced"
    return "inconclusive"


class _Cells(nn.Module):
    def __init__(self, tasks: int, turns: int, actions: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(tasks, turns, actions))


class TurnTable(_ToyPolicy):
    """π(a_t | task, t) = softmax(θ[task, t])_a: one free logit row per (task, turn) and one action token per turn.

    A rollout is one row per episode: T tokens (turn t's action at column t), ``episode_ids`` unique per row,
    ``token_turn`` = t, ``turn_mask`` all True; the environment's ``score`` cuts the row where the episode ends
    (completion_mask / turn_mask / token_turn). Actions are drawn independently per turn: the state of turn t does not
    depend on earlier actions (UI-S1's expert state; MAPO's toy judge), so this table is the right policy class.
    """

    provides = ("episode_ids", "turn_ids", "token_turn", "turn_mask")

    def __init__(self, tasks: int, turns: int, actions: int):
        super().__init__()
        self.net, self.reference, self.horizon = _Cells(tasks, turns, actions), None, turns
        self.generator: torch.Generator | None = None
        self._episodes = 0

    @property
    def logits(self) -> Tensor:  # (tasks, T, K)
        return self.net.logits

    @torch.no_grad()
    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        idx = torch.tensor([p["index"] for p in prompts]).repeat_interleave(n)  # (B,)
        probs = torch.softmax(self.logits[idx], -1)  # (B, T, K)
        B, T, K = probs.shape
        a = torch.multinomial(probs.reshape(B * T, K), 1, generator=self.generator).reshape(B, T)  # (B, T)
        ep = torch.arange(self._episodes, self._episodes + B)
        self._episodes += B
        return RolloutBatch(completion_ids=a, completion_mask=torch.ones(B, T, dtype=torch.bool),
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n), inputs={"task": idx},
                            samples=[dict(p) for p in prompts for _ in range(n)], completions=[""] * B,
                            episode_ids=ep, turn_ids=torch.zeros(B, dtype=torch.long),
                            token_turn=torch.arange(T).expand(B, T).clone(), turn_mask=torch.ones(B, T, dtype=torch.bool))

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        table = (self.reference if reference else self.net).logits
        logp = torch.log_softmax(table[batch.inputs["task"]], -1)  # (B, T, K)
        m = batch.completion_mask  # (B, T)
        return PolicyOutput(logp.gather(2, batch.completion_ids[..., None])[..., 0] * m, -(logp.exp() * logp).sum(-1) * m)


def episode_grpo(b: RolloutBatch) -> Tensor:
    """The matched control: the episode's return normalised over its task's G episodes, on every played turn. (B, T)"""
    return grpo(b.rewards, b.group_ids)[:, None] * b.completion_mask


episode_grpo.min_group_size = 2
episode_grpo.requires = ()


# ------------------------------------------------------------------ U: UI-S1
def uis1_env(expert: Tensor, eps: int):
    """Semi-online scoring: match = expert action; the (eps+1)-th mismatch ends the episode (a patched mismatch is
    still trained, with reward 0); turn reward 1 on a match."""

    def score(b: RolloutBatch) -> RolloutBatch:
        match = b.completion_ids == expert[b.inputs["task"]]  # (B, T)
        before = torch.cumsum((~match).long(), 1) - (~match).long()  # (B, T) mismatches in the turns before t
        alive = before <= eps  # (B, T) turn t is played
        r = (match & alive).double()
        tok = torch.where(alive, b.token_turn, torch.full_like(b.token_turn, -1))
        return b.replace(completion_mask=alive, turn_mask=alive, token_turn=tok, turn_rewards=r, turn_matched=match & alive,
                         rewards=r.sum(1), num_turns=alive.sum(1))

    return score


def rms(b: RolloutBatch) -> float:
    """Root mean square of the advantages over the trained tokens (the effective step size of each arm)."""
    m = b.loss_mask
    return float((b.advantages[m] ** 2).mean().sqrt())


def uis1_run(arm: str, seed: int, steps: int, lr_scale: float = 1.0) -> tuple[float, float, list[float], float]:
    """One seed of "uis1" (ε = 2), "grpo" (ε = 2) or "uis1_eps0". Returns (final step accuracy, final Π_t P_t, curve,
    RMS of the advantages over the run)."""
    gen = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, U_K, (TASKS, U_T), generator=gen)  # (tasks, T)
    policy = TurnTable(TASKS, U_T, U_K).double()
    policy.generator = gen
    with torch.no_grad():
        policy.logits.scatter_(2, expert[..., None], math.log(U_P0 / ((1 - U_P0) / (U_K - 1))))
    eps = 0 if arm == "uis1_eps0" else U_EPS
    est = episode_grpo if arm == "grpo" else UISemiOnline(gamma=0.5, mode="mean_std", w_episode=1.0, w_step=1.0,
                                                          episode_signal="turn_score")
    loop = Loop(policy, uis1_env(expert, eps), est, ClippedPolicyLoss(aggregation="token_mean"), group_size=G,
                provided=("turn_rewards", "turn_matched", "num_turns"))
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=U_LR * lr_scale), params, max_grad_norm=0.0)
    prompts = [{"prompt": f"task{i}", "index": i} for i in range(TASKS)]

    def acc() -> tuple[float, float]:
        p = torch.softmax(policy.logits.detach(), -1).gather(2, expert[..., None])[..., 0]  # (tasks, T)
        return float(p.mean()), float(p.prod(1).mean())

    curve, scale = [], []
    for _ in range(steps):
        curve.append(acc()[0])
        kept = loop.collect(prompts).kept
        scale.append(rms(kept))
        loop.update(kept, stepper)
    final = acc()
    return final[0], final[1], curve + [final[0]], statistics.fmean(scale)


# ------------------------------------------------------------------ M: MAPO
def mapo_env(q: Tensor, d: Tensor, scale: Tensor):
    """Dense judge reward r_t = s_t (q[t, a_t] + d[t−1, a_{t−1}]); every dialogue runs all T turns."""

    def score(b: RolloutBatch) -> RolloutBatch:
        task, a = b.inputs["task"], b.completion_ids  # (B,), (B, T)
        qa = q[task].gather(2, a[..., None])[..., 0]  # (B, T)
        da = d[task].gather(2, a[..., None])[..., 0]  # (B, T) effect of turn t's response on turn t + 1
        r = scale * (qa + torch.cat([torch.zeros_like(da[:, :1]), da[:, :-1]], 1))  # (B, T)
        return b.replace(turn_rewards=r, rewards=r.sum(1), num_turns=torch.full_like(task, a.shape[1]))

    return score


def mapo_value(policy: TurnTable, q: Tensor, d: Tensor, scale: Tensor) -> float:
    """(E_π[Σ r] − E_uniform) / (max − E_uniform), exact, mean over tasks."""
    nxt = torch.cat([scale[1:], torch.zeros(1, dtype=scale.dtype)])  # (T,) s_{t+1}, 0 after the last turn
    w = scale[None, :, None] * q + nxt[None, :, None] * d  # (tasks, T, K) value of action a at turn t
    p = torch.softmax(policy.logits.detach(), -1)
    v, u, best = (p * w).sum((1, 2)), w.mean(2).sum(1), w.amax(2).sum(1)  # (tasks,)
    return float(((v - u) / (best - u)).mean())


MAPO_ARMS = {"mapo": dict(w_batch=0.6, w_turn=0.4), "turn_only": dict(w_batch=0.0, w_turn=1.0),
             "batch_only": dict(w_batch=1.0, w_turn=0.0)}


def mapo_run(arm: str, seed: int, steps: int, lr_scale: float = 1.0) -> tuple[float, list[float], float]:
    """One seed of "mapo", "turn_only", "batch_only" or "grpo". Returns (final normalised value, curve, advantage RMS)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    q = torch.rand(TASKS, M_T, M_K, generator=gen, dtype=torch.float64)
    d = torch.rand(TASKS, M_T, M_K, generator=gen, dtype=torch.float64)
    d[:, -1] = 0.0  # the last response has no next turn
    scale = 1.0 + torch.arange(M_T, dtype=torch.float64) / 2  # (T,) later turns score larger
    policy = TurnTable(TASKS, M_T, M_K).double()
    policy.generator = gen
    est = episode_grpo if arm == "grpo" else MAPO(gamma=0.85, turn_std=True, batch_std=True, **MAPO_ARMS[arm])
    loop = Loop(policy, mapo_env(q, d, scale), est, ClippedPolicyLoss(aggregation="token_mean"), group_size=G,
                provided=("turn_rewards", "num_turns"))
    params = policy.trainable_parameters()
    stepper = Stepper(torch.optim.SGD(params, lr=M_LR * lr_scale), params, max_grad_norm=0.0)
    prompts = [{"prompt": f"dialogue{i}", "index": i} for i in range(TASKS)]
    curve, size = [], []
    for _ in range(steps):
        curve.append(mapo_value(policy, q, d, scale))
        kept = loop.collect(prompts).kept
        size.append(rms(kept))
        loop.update(kept, stepper)
    final = mapo_value(policy, q, d, scale)
    return final, curve + [final], statistics.fmean(size)


# ------------------------------------------------------------------ sanity checks (pre-registered; the run is void if one fails)
def sanity() -> dict[str, object]:
    out: dict[str, object] = {}
    rng = np.random.default_rng(0)
    miss = rng.random((10000, 10)) >= 0.6  # (N, T) p = 0.6 of a match
    before = np.cumsum(miss, 1) - miss
    out["turns"] = [float((before <= e).sum(1).mean()) for e in (0, 1, 2)]
    ok_turns = all(abs(m - x) <= 0.1 for m, x in zip(out["turns"], (2.49, 4.87, 6.95)))
    # return semantics: matched [1, 1, 0, 1], r = 1, γ = 0.5 -> G = [1.5, 1, 1, 1] (A^S of a 1-episode group is 0, so
    # read G through a 2-episode group where episode 2's returns are 0: A^S = (G − G/2)/std... use mean mode, w_E = 0)
    b = RolloutBatch(completion_ids=torch.zeros(2, 4, dtype=torch.long), completion_mask=torch.ones(2, 4, dtype=torch.bool),
                     group_ids=torch.zeros(2, dtype=torch.long), rewards=torch.tensor([4.0, 0.0], dtype=torch.float64),
                     episode_ids=torch.tensor([0, 1]), turn_ids=torch.zeros(2, dtype=torch.long),
                     token_turn=torch.arange(4).expand(2, 4).clone(), turn_mask=torch.ones(2, 4, dtype=torch.bool),
                     turn_rewards=torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64),
                     turn_matched=torch.tensor([[True, True, False, True], [True] * 4]))
    _, _, a_s = uis1(turn_table(b), gamma=0.5, mode="mean", w_episode=0.0)
    out["G"] = [round(2 * float(x), 6) for x in a_s[:4]]  # A^S = G − G/2 in each (task, t) pair
    ok_ret = out["G"] == [1.5, 1.0, 1.0, 1.0]
    # MAPO §10 (e): 2 prompts x 4 rollouts x 5 turns, positive rewards, a tie at turn 2 of prompt 0
    g = torch.Generator().manual_seed(0)
    r = torch.rand(8, 5, generator=g, dtype=torch.float64) + 0.5
    r[:4, 2:] = r[0, 2:]  # identical rewards from turn 2 on in prompt 0: its turn-2 returns tie
    mb = RolloutBatch(completion_ids=torch.zeros(8, 5, dtype=torch.long), completion_mask=torch.ones(8, 5, dtype=torch.bool),
                      group_ids=torch.arange(2).repeat_interleave(4), rewards=r.sum(1), episode_ids=torch.arange(8),
                      turn_ids=torch.zeros(8, dtype=torch.long), token_turn=torch.arange(5).expand(8, 5).clone(),
                      turn_mask=torch.ones(8, 5, dtype=torch.bool), turn_rewards=r)
    tt = turn_table(mb)
    a, ab, at = mapo(tt, gamma=0.85)
    t = tt.t.double()
    corr = lambda x: float(torch.corrcoef(torch.stack([x, t]))[0, 1])  # noqa: E731
    tie = (tt.group == 0) & (tt.t == 2)
    out["corr"] = (corr(ab), corr(at), corr(a))
    ok_mapo = (out["corr"][0] < -0.5 and bool((at[tie] == 0).all()) and abs(out["corr"][1]) < abs(out["corr"][2])
               < abs(out["corr"][0]) and bool((a[tie] != 0).all()))
    out["ok"] = ok_turns and ok_ret and ok_mapo
    return out


def record(seeds: Sequence[int]) -> str:
    """What "step accuracy" and "normalised value" mean (exact functions of the logit tables; no text, no sampling)."""
    experts = [torch.randint(0, U_K, (TASKS, U_T), generator=torch.Generator().manual_seed(s)).tolist() for s in seeds]
    return eval_record(task=f"U: {TASKS} tasks, a T = {U_T} expert trajectory of K = {U_K} actions each (semi-online: the "
                            f"state is always the expert's); M: {TASKS} dialogues, {M_T} turns, K = {M_K} responses, a "
                            "judge's dense reward s_t (q[t, a_t] + d[t−1, a_{t−1}]), s_t = 1 + t/2",
                       prompt_template="none (a prompt is the task / dialogue index; tabular turn policy)",
                       answer_extraction="none: the action index at each turn",
                       eos_rule=f"none: U ends after {U_T} turns (patched up to ε mismatches during training), M after {M_T}",
                       sampling="none: U step accuracy = mean over tasks and turns of π(expert action \\| turn), exact; "
                                "M normalised value = (E_π[Σ r] − E_uniform) / (max − E_uniform), exact, mean over "
                                "dialogues. Training rollouts: multinomial at T = 1, G = 8 per task",
                       split=f"the {TASKS} training tasks (train = evaluation); U experts per seed, hash "
                             f"{split_hash(experts)}; M judge tables drawn from seed 1000 + s",
                       seeds=list(seeds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="2 seeds x 3 updates per arm, no report (seconds)")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = range(2) if args.smoke else range(args.seeds)
    us, ms = (3, 3) if args.smoke else (U_STEPS, M_STEPS)
    checks = sanity()
    U = {arm: [uis1_run(arm, s, us) for s in seeds] for arm in ("uis1", "grpo", "uis1_eps0")}
    M = {arm: [mapo_run(arm, s, ms) for s in seeds] for arm in ("mapo", "grpo", "turn_only", "batch_only")}
    acc = {k: [x[0] for x in v] for k, v in U.items()}
    succ = {k: [x[1] for x in v] for k, v in U.items()}
    val = {k: [x[0] for x in v] for k, v in M.items()}
    mean = lambda xs: statistics.fmean(xs)  # noqa: E731
    diff = lambda a, b: [x - y for x, y in zip(a, b)]  # noqa: E731
    u1 = interval(diff(acc["uis1"], acc["grpo"]))
    u2 = interval(diff(acc["uis1"], acc["uis1_eps0"]))
    m1 = interval(diff(val["mapo"], val["grpo"]))
    mt = interval(diff(val["mapo"], val["turn_only"]))
    mb = interval(diff(val["mapo"], val["batch_only"]))
    vU1, vU2, vM1 = rule(*u1, 0.05), rule(*u2, 0.05), rule(*m1, 0.05)
    if mt[1] > 0 and mb[1] > 0:
        vM2 = "reproduced"
    elif mt[0] <= 0 or mb[0] <= 0 or mt[2] < 0 or mb[2] < 0:
        vM2 = "not reproduced"
    else:
        vM2 = "inconclusive"
    if not checks["ok"]:
        vU1 = vU2 = vM1 = vM2 = "void (sanity check failed)"
    fmt = lambda i: f"{i[0]:+.3f} [{i[1]:+.3f}, {i[2]:+.3f}]"  # noqa: E731
    details = (f"UI-S1 − GRPO step accuracy {fmt(u1)} ({vU1}); ε=2 − ε=0 {fmt(u2)} ({vU2}); MAPO − GRPO normalised "
               f"value {fmt(m1)} ({vM1}); MAPO − turn-only {fmt(mt)}, − batch-only {fmt(mb)} ({vM2})")
    line = verdict("uis1_mapo", overall([vU1, vU2, vM1, vM2]) if checks["ok"] else "inconclusive", details, echo=False)
    print(line)
    if args.smoke:
        return

    # exploratory (after the pre-registered run; not verdicts): the arms' advantages differ in size, and with SGD on
    # a logit table that is a step-size difference; rerun a control with its lr scaled to the other arm's mean RMS
    u_rms = {k: mean([x[3] for x in v]) for k, v in U.items()}
    m_rms = {k: mean([x[2] for x in v]) for k, v in M.items()}
    u_gm = [uis1_run("grpo", s, us, lr_scale=u_rms["uis1"] / u_rms["grpo"])[0] for s in seeds]
    m_gm = [mapo_run("grpo", s, ms, lr_scale=m_rms["mapo"] / m_rms["grpo"])[0] for s in seeds]
    m_mm = [mapo_run("mapo", s, ms, lr_scale=m_rms["turn_only"] / m_rms["mapo"])[0] for s in seeds]
    x_u = interval(diff(acc["uis1"], u_gm))
    x_mg = interval(diff(val["mapo"], m_gm))
    x_mt = interval(diff(m_mm, val["turn_only"]))
    explore = [("UI-S1 vs GRPO with lr x RMS(UI-S1)/RMS(GRPO) = " f"{u_rms['uis1'] / u_rms['grpo']:.2f}",
                f"GRPO {mean(u_gm):.3f}", f"UI-S1 − GRPO {fmt(x_u)}"),
               ("MAPO vs GRPO with lr x RMS(MAPO)/RMS(GRPO) = " f"{m_rms['mapo'] / m_rms['grpo']:.2f}",
                f"GRPO {mean(m_gm):.3f}", f"MAPO − GRPO {fmt(x_mg)}"),
               ("MAPO with lr x RMS(turn-only)/RMS(MAPO) = " f"{m_rms['turn_only'] / m_rms['mapo']:.2f} vs turn-only",
                f"MAPO {mean(m_mm):.3f}", f"MAPO − turn-only {fmt(x_mt)}")]
    mid = min(10, us)
    x_u2 = interval(diff([r[2][mid] for r in U["uis1"]], [r[2][mid] for r in U["uis1_eps0"]]))
    explore.append((f"patching (U2) at update {mid} instead of the end: UI-S1 ε = 2 vs ε = 0",
                    f"ε=2 {mean([r[2][mid] for r in U['uis1']]):.3f}, ε=0 {mean([r[2][mid] for r in U['uis1_eps0']]):.3f}",
                    f"ε=2 − ε=0 {fmt(x_u2)}"))
    rms_line = ("; ".join(f"{k} {v:.2f}" for k, v in u_rms.items()) + " (U); "
                + "; ".join(f"{k} {v:.2f}" for k, v in m_rms.items()) + " (M)")

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, c in (("uis1", "C0"), ("grpo", "C1"), ("uis1_eps0", "C2")):
        ax[0].plot(torch.tensor([r[2] for r in U[arm]]).mean(0), color=c, label=arm)
    ax[0].set(xlabel="update", ylabel="step accuracy (mean P(expert))", title="UI-S1: T = 10 expert steps, K = 5")
    ax[0].legend()
    for arm, c in (("mapo", "C0"), ("grpo", "C1"), ("turn_only", "C2"), ("batch_only", "C3")):
        ax[1].plot(torch.tensor([r[1] for r in M[arm]]).mean(0), color=c, label=arm)
    ax[1].set(xlabel="update", ylabel="normalised value", title="MAPO: 8-turn dialogue, dense judge reward")
    ax[1].legend()
    fig.tight_layout()
    save_plot(fig, "uis1_mapo", dpi=110)

    n = len(seeds)
    rows = [("U1 UI-S1 vs episode GRPO (ε = 2): final step accuracy", f"UI-S1 {mean(acc['uis1']):.3f}, GRPO {mean(acc['grpo']):.3f}",
             fmt(u1), vU1),
            ("U trajectory success Π_t P_t (secondary)", f"UI-S1 {mean(succ['uis1']):.3f}, GRPO {mean(succ['grpo']):.3f}",
             fmt(interval(diff(succ["uis1"], succ["grpo"]))), "–"),
            ("U2 patching: UI-S1 ε = 2 vs ε = 0: final step accuracy", f"ε=2 {mean(acc['uis1']):.3f}, ε=0 {mean(acc['uis1_eps0']):.3f}",
             fmt(u2), vU2),
            ("M1 MAPO vs episode GRPO: final normalised value", f"MAPO {mean(val['mapo']):.3f}, GRPO {mean(val['grpo']):.3f}",
             fmt(m1), vM1),
            ("M2 MAPO vs turn-only / batch-only", f"turn-only {mean(val['turn_only']):.3f}, batch-only {mean(val['batch_only']):.3f}",
             f"{fmt(mt)} / {fmt(mb)}", vM2)]
    per_seed = table(("seed", "U: UI-S1", "U: GRPO", "U: ε=0", "M: MAPO", "M: GRPO", "M: turn-only", "M: batch-only"),
                     [(s, f"{acc['uis1'][i]:.3f}", f"{acc['grpo'][i]:.3f}", f"{acc['uis1_eps0'][i]:.3f}",
                       f"{val['mapo'][i]:.3f}", f"{val['grpo'][i]:.3f}", f"{val['turn_only'][i]:.3f}",
                       f"{val['batch_only'][i]:.3f}") for i, s in enumerate(seeds)])
    path = REPORTS / "uis1_mapo.md"
    pre = path.read_text().split("\n## Results")[0].rstrip() + "\n"
    path.write_text(pre + f"""
## Results

Command: `OMP_NUM_THREADS=1 .venv/bin/python reproductions/uis1_mapo.py` (CPU, {n} seeds). Intervals: 95% t-intervals
of the per-seed paired difference (same tasks, initial θ and sampler seed per seed in every arm).

Sanity checks (pre-registered): trained turns per rollout at p = 0.6, T = 10, 10k MC rollouts, ε = 0 / 1 / 2:
{checks['turns'][0]:.3f} / {checks['turns'][1]:.3f} / {checks['turns'][2]:.3f} (spec 2.49 / 4.87 / 6.95); UI-S1 returns
for matched [1, 1, 0, 1]: {checks['G']} (spec [1.5, 1, 1, 1]); MAPO synthetic batch corr(A, t) batch-only / turn-only /
mixed {checks['corr'][0]:+.3f} / {checks['corr'][1]:+.3f} / {checks['corr'][2]:+.3f}, tie: A_turn = 0, A_mixed ≠ 0;
all pass: {checks['ok']}.

{table(("claim", "measured (means)", "difference [95% CI]", "verdict"), rows)}

Per seed (final step accuracy for U, final normalised value for M):

{per_seed}

Exploratory, after the pre-registered run (not verdicts). RMS of the advantages over the trained tokens, mean over
updates and seeds: {rms_line}. With SGD on a logit table an arm whose advantages are larger takes larger steps, so
each control below is rerun with its learning rate scaled by the ratio of the mean RMS (same seeds):

{table(("exploratory comparison", "rerun arm (mean)", "difference [95% CI]"), explore)}

![learning curves](uis1_mapo.png)

Verdict line: `{line}` (one verdict from the four parts: not reproduced if any part is, reproduced if all are, else
inconclusive)

{record(seeds)}
Deviation, stated: the pre-registered learning rates (SGD 2.0 for U, 1.0 for M, on the token-mean loss) barely moved
the control in a single-arm check before any comparison (GRPO step accuracy 0.30 -> 0.35 and normalised value
0 -> 0.045 in 40 updates: the token mean over the ~64 x 7 played turns divides each (task, turn) cell's gradient by
~50). They were raised to 20 (U) and 10 (M), chosen on the GRPO arm alone (it then ends at 0.69 / 0.40, not
saturated). Nothing else changed. A UI-S1 advantage is the sum of two normalised terms (w_E = w_S = 1) and the
arms' advantages differ in size; the exploratory rows below rescale the controls' step size to match.

Reading. U1: on a semi-online chain where every turn is graded against the expert, UI-S1's per-turn advantages (the
turn's own score over the task's turns plus the discounted step return over the (task, t) group) learn every step
far faster than one episode-level GRPO advantage spread over 10 turns, and the gap survives a step-size-matched
control (below); this is the per-turn credit claim at toy scale, not the paper's AndroidWorld / AITW gains. U2: the
patch module (ε = 2) trains more turns per episode than ε = 0 (2.8x at p = 0.6, spec §9 (e)) and is clearly ahead mid-run (exploratory row
below), but both arms end near the ceiling of 1 after 40 updates, so the pre-registered final-accuracy margin of
+0.05 is not met. M1: MAPO's mixed normalisation beats episode-level GRPO by less than the pre-registered +0.05 at
40 updates (all arms are still rising); step-size-matched, the gap is larger. M2: the turn-only scope, which removes
the position bias this toy builds in (s_t = 1 + t/2), beats MAPO's 0.6 / 0.4 mix in every seed, also at matched step
size; the batch scope's extra signal on tied turns does not pay here, because in this toy a (task, t) group of 8
with continuous judge scores almost never ties. Whether the mix helps where ties are common (a judge with coarse scores) is untested.
""")


if __name__ == "__main__":
    main()
