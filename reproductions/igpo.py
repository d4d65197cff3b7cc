"""IGPO (inpainting-guided GRPO, Zhao et al. 2025, arXiv 2509.10396) against its matched controls on the chain-sum
task, with a small bidirectional masked-diffusion LM trained from scratch (domains.md §1(e); issue 18, "Reproduction").

Claim tested (pre-registered in ``reports/igpo.md`` before the full run):
  1. hard-split greedy accuracy: IGPO > sample-matched resampling > no-hint GRPO (the spec's margins: IGPO >= no-hint
     + 5 pp and >= resampling + 3 pp);
  2. IGPO's own all-wrong rate (groups whose G own samples are all wrong, before any inpainting) over the last 40 %
     of the sample budget <= 0.75 x no-hint GRPO's.

Per seed: two masked-diffusion SFT checkpoints (LLaDA's SFT loss, ``diffusion.dllm.model.masked_diffusion_sft_loss``)
on concise and on verbose-truncated traces; then every arm starts from that seed's checkpoint with the same RL seed
and the same prompt stream, and trains on the shared loop (``DiffusionLMModule.loop``: collect, update) until it has
generated exactly ``--budget`` samples (all generated samples count: a rescue's G extra samples too). The last step
takes fewer prompts, and IGPO's ``max_groups`` caps the rescued groups, so every arm stops at the same count.

Arms (recipe values read from ``configs/diffusion/d1.yaml`` and ``igpo.yaml``):
  d1           diffu-GRPO: p_mask 0.15 (random prompt masking), token ratio, no inpainting
  no_hint      GRPO with IGPO's estimator (p_mask 0), no inpainting: the baseline of the claim
  resample     all-wrong groups get G extra *unhinted* samples, up to 4 correct ones swapped in: the IGPO method part
               with η ≡ 0 (no chunk revealed; same extra samples, same replacement rule, no hints)
  igpo         η ~ U[0.2, 0.6], τ = 0.2
  full_hints   η = 1 (every hint chunk revealed)
  no_filter    τ = 1 (every hint token keeps its gradient)
  verbose_sft  IGPO from the verbose-trace SFT checkpoint

Measured: greedy accuracy on a held-out hard split (k in {5, 6}, never trained on) at ``--evals`` points of the
budget, with its evaluation record (prompt template, EOS rule, T, steps, block, temperature, split hash); each arm's
own all-wrong rate per step. Results go to ``<out>/results.json`` after every arm (a rerun skips finished ones).

    OMP_NUM_THREADS=1 .venv/bin/python reproductions/igpo.py                 # the full run, fills reports/igpo.md
    .venv/bin/python reproductions/igpo.py --smoke --out /tmp/igpo_smoke      # 1 seed, 2 arms, tiny: seconds
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from support.report import REPORTS, ROOT, mean_ci, plt, save_plot, table, wilson

import torch  # noqa: E402  (after support.report: the repository root on sys.path)
import yaml  # noqa: E402

from common.batch import RolloutBatch  # noqa: E402
from common.data import PromptStream  # noqa: E402
from common.loop import Stepper  # noqa: E402
from common.methods.base import Method  # noqa: E402
from diffusion.dllm.data import ALPHABET, ChainSumData, chain_sum  # noqa: E402
from diffusion.dllm.igpo import IGPO  # noqa: E402
from diffusion.dllm.model import TinyDiffusionLM  # noqa: E402
from diffusion.dllm.module import DiffusionLMModule  # noqa: E402

NAME = "igpo"
RESULTS_MARKER = "## Results"
READING_MARKER = "## Reading"  # hand-written sections after the results start here; a rerun keeps them
# arm -> (recipe, SFT init, IGPO overrides or None for no method part, description)
ARMS: dict[str, tuple[str, str, dict | None, str]] = {
    "d1": ("d1", "concise", None, "diffu-GRPO: p_mask 0.15, no inpainting"),
    "no_hint": ("igpo", "concise", None, "GRPO, IGPO's estimator (p_mask 0), no inpainting"),
    "resample": ("igpo", "concise", {"eta_low": 0.0, "eta_high": 0.0}, "all-wrong groups: G extra unhinted samples, <= 4 correct swapped in"),
    "igpo": ("igpo", "concise", {}, "IGPO: η ~ U[0.2, 0.6], τ = 0.2"),
    "full_hints": ("igpo", "concise", {"eta_low": 1.0, "eta_high": 1.0}, "IGPO with η = 1 (all hint chunks)"),
    "no_filter": ("igpo", "concise", {"entropy_keep": 1.0}, "IGPO with τ = 1 (no entropy filter)"),
    "verbose_sft": ("igpo", "verbose", {}, "IGPO from the verbose-trace SFT checkpoint"),
}
HARD_KS, RL_KS, RL_WEIGHTS = (5, 6), (3, 4, 5, 6), (0.15, 0.15, 0.35, 0.35)  # RL mix 70 % hard / 30 % easy (§1(e))
SFT_WEIGHTS = (0.45, 0.45, 0.05, 0.05)  # SFT mix 90 % easy / 10 % hard (§1(e) stage 1)
CORE = ("no_hint", "resample", "igpo")  # the arms of the claim
LATE = 0.6  # the all-wrong rate is averaged over steps that start after 60 % of the budget (spec: steps 150-250 of 250)


# ---------------------------------------------------------------------------------------------------- building
def build(spec: Any) -> Any:
    """A YAML ``class_path``/``init_args`` tree instantiated (nested specs first); other values as they are."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**{k: build(v) for k, v in spec.get("init_args", {}).items()})
    return spec


def recipe(name: str) -> dict:
    """``model.init_args`` of ``configs/diffusion/<name>.yaml``."""
    return yaml.safe_load((ROOT / f"configs/diffusion/{name}.yaml").read_text())["model"]["init_args"]


class OwnAllWrong(Method):
    """Records, before any inpainting or resampling (it is listed first), the fraction of this step's groups whose
    G own samples are all wrong, and the own accuracy."""

    requires = ("correct",)

    def __init__(self):
        super().__init__()
        self.rates: list[tuple[float, float, int]] = []  # (all-wrong rate, own accuracy, groups) per step

    def after_score(self, loop, batch: RolloutBatch) -> RolloutBatch:
        _, inverse = torch.unique(batch.group_ids, return_inverse=True)
        n_correct = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, batch.correct.float())  # (U,)
        self.rates.append((float((n_correct == 0).float().mean()), float(batch.correct.float().mean()), len(n_correct)))
        return batch


def make_module(arm: str, checkpoint: str | None, args: argparse.Namespace, igpo_cap: list,
                seed: int = 0) -> tuple[DiffusionLMModule, OwnAllWrong]:
    """The arm's ``DiffusionLMModule`` from its recipe's values (model size and G from ``args``), its policy's weights
    from ``checkpoint`` (None: a fresh model initialised with ``seed``)."""
    rec_name, _, overrides, _ = ARMS[arm]
    rec = recipe(rec_name)
    tracker = OwnAllWrong()
    methods: list[Method] = [tracker]
    if overrides is not None:
        spec = next(m for m in recipe("igpo")["methods"] if m["class_path"].endswith(".IGPO"))
        method = IGPO(**{**spec["init_args"], **overrides})
        igpo_cap.append(method)
        methods.append(method)
    source = TinyDiffusionLM(alphabet=ALPHABET, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             checkpoint=checkpoint, seed=seed)
    module = DiffusionLMModule(
        policy=source, gen_length=rec["gen_length"], block_length=rec["block_length"], steps=rec["steps"],
        temperature=rec["temperature"], p_mask=rec["p_mask"], advantage=build(rec["advantage"]), loss=build(rec["loss"]),
        methods=methods, group_size=args.group_size, mu=rec["mu"], minibatch_size=None, lr=rec["lr"],
        max_grad_norm=rec["max_grad_norm"], canaries=False)
    return module, tracker


# ---------------------------------------------------------------------------------------------------- data, SFT, eval
def eval_split(args: argparse.Namespace) -> list[dict]:
    """The held-out hard split (k in HARD_KS), the same for every seed and arm, and the RL training set without it."""
    data = ChainSumData(RL_KS, RL_WEIGHTS, HARD_KS, train_size=4096, val_size=args.eval_size, seed=0)
    data.setup()
    return data.val_set, data.train_set


def split_hash(split: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[s["prompt"], s["answer"]] for s in split]).encode()).hexdigest()[:16]


def sft_loss(model, prompt_ids, prompt_mask, response_ids, mask_id: int, eps: float, generator) -> torch.Tensor:
    """LLaDA's SFT loss (``diffusion.dllm.model.masked_diffusion_sft_loss``) with t = (1 − ε) u + ε for a given ε
    (LLaDA: 10⁻³; ``MaskedDiffusionCE.eps`` is the same knob): every response token (EOS padding included) masked with
    probability t, the prompt never; Σ_masked CE / t over the batch's response tokens. Shapes: prompt (B, P), response
    (B, T) -> ()."""
    B, T = response_ids.shape
    t = (1 - eps) * torch.rand(B, 1, generator=generator) + eps  # (B, 1)
    masked = torch.rand(B, T, generator=generator) < t  # (B, T)
    noisy = response_ids.masked_fill(masked, mask_id)
    logits = model(torch.cat([prompt_ids, noisy], 1), torch.cat([prompt_mask, torch.ones_like(masked)], 1))[:, -T:]  # (B, T, V)
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), response_ids, reduction="none")  # (B, T)
    return (ce * masked / t).sum() / (B * T)


def sft(trace: str, seed: int, held_out: set[str], args: argparse.Namespace, path: Path) -> dict:
    """LLaDA masked-diffusion SFT of a fresh TinyDiffusionLM on concise or verbose-truncated traces; saves the weights."""
    from safetensors.torch import save_file

    pol = make_module("no_hint", None, args, [], seed)[0].policy  # a fresh model, the RL recipes' prompt encoding
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the pilot's init: LLaMA's std 0.02 stayed at chance
        torch.manual_seed(seed)
        for p in pol.model.parameters():
            if p.dim() == 2:  # embeddings (tied head) and projections; norms keep their ones
                p.normal_(0.0, args.init_std)
    data = [s for s in chain_sum(args.sft_size, RL_KS, seed=10_000 + seed, weights=SFT_WEIGHTS) if s["prompt"] not in held_out]
    tok, T = pol.tokenizer, pol.gen_length
    key = "trace" if trace == "concise" else "verbose"
    resp = []
    for s in data:  # ok: data preparation
        ids = tok(s[key][: T - 1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the trace cut at T with its EOS
        resp.append(ids + [tok.eos_token_id] * (T - len(ids)))  # EOS padding to T (LLaDA trains on it)
    prompt_ids, prompt_mask = pol.encode(data)  # (N, L)
    responses = torch.tensor(resp)  # (N, T)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(pol.model.parameters(), lr=args.sft_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / args.sft_steps)))
    pol.model.train()
    t0, losses = time.process_time(), []
    for _ in range(args.sft_steps):
        idx = torch.randint(0, len(data), (args.sft_batch,), generator=g)
        loss = sft_loss(pol.model, prompt_ids[idx], prompt_mask[idx], responses[idx], pol.mask_id, args.sft_eps, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pol.model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    pol.model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone() for k, v in pol.model.state_dict().items()}, str(path))  # tied head: cloned
    return {"loss_last50": statistics.fmean(losses[-50:]), "cpu_s": time.process_time() - t0, "examples": len(data)}


@torch.no_grad()
def evaluate(module: DiffusionLMModule, split: list[dict], batch: int = 500) -> float:
    """Greedy accuracy (the task's verifier) on ``split``, no hints."""
    right = 0
    for i in range(0, len(split), batch):
        right += int(module.verify(module.policy.rollout(split[i : i + batch], 1, greedy=True)).sum())
    return right / len(split)


def eval_record(module: DiffusionLMModule, split: list[dict]) -> dict:
    """What a reported accuracy was measured with (the record the issue asks every accuracy to carry)."""
    pol = module.policy
    ids, mask = pol.encode(split[:1])
    return {"prompt_template": repr(pol.tokenizer.decode(ids[0][mask[0]])) + f" (prompt {split[0]['prompt']!r}: BOS, "
            "the digits, '=' from the char tokenizer's chat template)",
            "eos_rule": "completion = tokens before the first EOS; answer = the character after the first '#'",
            "gen_length": pol.gen_length, "steps": pol.steps, "block_length": pol.block_length, "temperature": 0.0,
            "decoding": "greedy LLaDA low-confidence remasking", "split": f"{len(split)} prompts, k in {list(HARD_KS)}",
            "split_hash": split_hash(split)}


# ---------------------------------------------------------------------------------------------------- one arm
def run_arm(arm: str, seed: int, checkpoint: str, split: list[dict], train: list[dict], args: argparse.Namespace) -> dict:
    caps: list[IGPO] = []
    module, tracker = make_module(arm, checkpoint, args, caps)
    pol, loop = module.policy, module.loop
    counted = [0, False]  # samples generated in training, counting on
    sample_batch = pol.sample_batch

    def counting(*a, **k):
        out = sample_batch(*a, **k)
        if counted[1]:
            counted[0] += out.batch_size
        return out

    pol.sample_batch = counting
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=module.lr, weight_decay=module.weight_decay)
    stepper = Stepper(opt, pol.trainable_parameters(), max_grad_norm=module.max_grad_norm)
    torch.manual_seed(seed)  # the same RL seed for every arm of a seed
    G, P = args.group_size, args.prompts_per_step
    stream = iter(PromptStream(train, P, seed))  # the same prompt stream for every arm of a seed
    marks = [round(args.budget * (i + 1) / args.evals / G) * G for i in range(args.evals)]
    curve = [(0, 0, evaluate(module, split))]  # (samples, steps, accuracy)
    step_samples, metrics_log = [], []
    t0 = time.process_time()
    while counted[0] < args.budget:
        remaining = args.budget - counted[0]
        prompts = next(stream)[: min(P, remaining // G)]
        for m in caps:  # the rescues may take only what is left of the budget
            m.max_groups = (remaining - len(prompts) * G) // G
        start = counted[0]
        counted[1] = True
        module.loss_fn.set_step(len(step_samples))
        got = loop.collect(prompts)
        counted[1] = False
        metrics = loop.update(got.kept, stepper)
        step_samples.append((start, counted[0]))
        metrics_log.append({k: float(v) for k, v in metrics.items() if k in ("loss", "grad_norm", "rescued_groups",
                                                                               "replacements", "clip_frac")})
        if marks and counted[0] >= marks[0]:
            while marks and counted[0] >= marks[0]:
                marks.pop(0)
            curve.append((counted[0], len(step_samples), evaluate(module, split)))
    late = [r[0] for r, (s, _) in zip(tracker.rates, step_samples) if s >= LATE * args.budget] or [tracker.rates[-1][0]]
    return {"arm": arm, "seed": seed, "samples": counted[0], "steps": len(step_samples), "accuracy": curve[-1][2],
            "start_accuracy": curve[0][2], "curve": curve, "all_wrong_late": statistics.fmean(late) if late else float("nan"),
            "all_wrong_steps": len(late), "all_wrong": [r[0] for r in tracker.rates], "own_accuracy": [r[1] for r in tracker.rates],
            "step_samples": step_samples, "rescued": sum(m.get("rescued_groups", 0.0) for m in metrics_log),
            "replacements": sum(m.get("replacements", 0.0) for m in metrics_log), "cpu_s": time.process_time() - t0,
            "eval_record": eval_record(module, split)}


# ---------------------------------------------------------------------------------------------------- statistics
def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval over seeds (a single value: the interval is the value)."""
    return mean_ci(values, one_seed_half=0.0)


def three_way(mean: float, lo: float, hi: float, margin: float, higher: bool = True) -> str:
    """Pre-registered rule (reports/igpo.md). For a difference that should be >= margin (> 0): reproduced if
    mean >= margin and lo > 0; not reproduced if mean <= 0 or hi < margin; else inconclusive. For a ratio that should
    be <= margin (< 1), ``higher=False``: reproduced if mean <= margin and hi < 1; not reproduced if mean >= 1 or
    lo > margin; else inconclusive."""
    if higher:
        return "reproduced" if mean >= margin and lo > 0 else "not reproduced" if mean <= 0 or hi < margin else "inconclusive"
    return "reproduced" if mean <= margin and hi < 1 else "not reproduced" if mean >= 1 or lo > margin else "inconclusive"


def analyse(results: dict, seeds: list[int], arms: list[str], n_eval: int) -> dict:
    """Per-arm means, paired differences, all-wrong ratios and the verdicts (each over the seeds it has finished)."""
    def get(arm: str, seed: int) -> dict | None:
        return results.get(f"{arm}/{seed}")

    out: dict[str, Any] = {"seeds": {a: [s for s in seeds if get(a, s)] for a in arms}, "arms": {}, "claims": {}}
    for a in arms:
        done = out["seeds"][a]
        if not done:
            continue
        out["arms"][a] = {"accuracy": t_interval([get(a, s)["accuracy"] for s in done]),
                          "all_wrong_late": t_interval([get(a, s)["all_wrong_late"] for s in done]),
                          "samples": sorted({get(a, s)["samples"] for s in done}),
                          "steps": [get(a, s)["steps"] for s in done], "start": [get(a, s)["start_accuracy"] for s in done]}

    def paired(x: str, y: str) -> list[int]:
        return [s for s in seeds if get(x, s) and get(y, s)]

    for hi_arm, lo_arm, margin in [("igpo", "no_hint", 0.05), ("igpo", "resample", 0.03), ("resample", "no_hint", 0.0)]:
        both = paired(hi_arm, lo_arm) if hi_arm in arms and lo_arm in arms else []
        if both:
            d = [get(hi_arm, s)["accuracy"] - get(lo_arm, s)["accuracy"] for s in both]
            m, lo, hi = t_interval(d)
            v = three_way(m, lo, hi, margin)
            out["claims"][f"{hi_arm} - {lo_arm}"] = {"seeds": both, "diffs": d, "mean": m, "lo": lo, "hi": hi, "margin": margin,
                                                      "verdict": v if len(both) >= 3 else "inconclusive"}
    both = paired("igpo", "no_hint") if "igpo" in arms and "no_hint" in arms else []
    if both:
        r = [get("igpo", s)["all_wrong_late"] / max(get("no_hint", s)["all_wrong_late"], 1e-9) for s in both]
        m, lo, hi = t_interval(r)
        v = three_way(m, lo, hi, 0.75, higher=False)
        out["claims"]["all-wrong igpo / no_hint"] = {"seeds": both, "ratios": r, "mean": m, "lo": lo, "hi": hi, "margin": 0.75,
                                                     "verdict": v if len(both) >= 3 else "inconclusive"}
    verdicts = [c["verdict"] for c in out["claims"].values()]
    out["verdict"] = ("not reproduced" if "not reproduced" in verdicts else
                      "reproduced" if len(verdicts) == 4 and all(v == "reproduced" for v in verdicts) else "inconclusive")
    return out


def extra_groups(run: dict, args: argparse.Namespace) -> int:
    """All-wrong groups that got G extra samples (inpainted, or resampled without hints), from the steps' sample
    counts: a step's own rows are min(P, remaining // G)·G, the rest are the rescues'."""
    G, P = args.group_size, args.prompts_per_step
    own = [min(P, (args.budget - start) // G) * G for start, _ in run["step_samples"]]
    return sum((end - start) - o for (start, end), o in zip(run["step_samples"], own)) // G


def results_markdown(results: dict, summary: dict, args: argparse.Namespace, meta: dict) -> str:
    arms = list(summary["arms"])
    f = lambda x: f"{x:.3f}"  # noqa: E731
    rows = []
    for a in arms:
        s, seeds = summary["arms"][a], summary["seeds"][a]
        m, lo, hi = s["accuracy"]
        wm, wlo, whi = s["all_wrong_late"]
        per_seed = ", ".join(f"{results[f'{a}/{x}']['accuracy']:.3f}" for x in seeds)
        rows.append([a, ARMS[a][3], ",".join(map(str, seeds)), "/".join(map(str, s["samples"])), "/".join(map(str, s["steps"])),
                     ", ".join(f(x) for x in s["start"]), per_seed, f"{f(m)} [{f(lo)}, {f(hi)}]", f"{f(wm)} [{f(wlo)}, {f(whi)}]"])
    acc_table = table(["arm", "what", "seeds", "samples", "steps (per seed)", "accuracy before RL (per seed)",
                       "hard accuracy after (per seed)", "mean [95% t-interval]", "own all-wrong rate, late (mean [95% t])"], rows)
    claim_rows = []
    for name, c in summary["claims"].items():
        vals = c.get("diffs", c.get("ratios"))
        claim_rows.append([name, ",".join(map(str, c["seeds"])), ", ".join(f"{v:+.3f}" if "diffs" in c else f"{v:.3f}" for v in vals),
                           f"{c['mean']:+.3f}" if "diffs" in c else f"{c['mean']:.3f}", f"[{c['lo']:.3f}, {c['hi']:.3f}]",
                           (">= " if "diffs" in c else "<= ") + f"{c['margin']:g}", f"**{c['verdict']}**"])
    claims_table = table(["comparison (paired by seed)", "seeds", "per seed", "mean", "95% t-interval", "claimed", "verdict"],
                         claim_rows)
    wil = []
    for a in arms:
        for x in summary["seeds"][a]:
            r = results[f"{a}/{x}"]
            lo, hi = wilson(r["accuracy"], args.eval_size)
            wil.append(f"{a}/{x} {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")
    rec = results[f"{arms[0]}/{summary['seeds'][arms[0]][0]}"]["eval_record"]
    record = "\n".join(f"- {k}: {v}" for k, v in rec.items())
    rescue = table(["arm", "all-wrong groups given G extra samples (per seed)", "groups rescued by hints (per seed)",
                    "hinted samples swapped in (per seed)"],
                   [[a, ", ".join(str(extra_groups(results[f"{a}/{x}"], args)) for x in summary["seeds"][a]),
                     ", ".join(f"{results[f'{a}/{x}']['rescued']:.0f}" for x in summary["seeds"][a]),
                     ", ".join(f"{results[f'{a}/{x}']['replacements']:.0f}" for x in summary["seeds"][a])]
                    for a in arms if ARMS[a][2] is not None])
    sft_rows = [[k, f"{v['loss_last50']:.3f}", v["examples"], f"{v['cpu_s']:.0f}"] for k, v in sorted(meta.get("sft", {}).items())]
    missing = [f"{a}/{s}" for a in args.arms for s in args.seeds if f"{a}/{s}" not in results]
    return f"""{RESULTS_MARKER}

Run: `{meta.get('command', '')}` ({'smoke; ' if args.smoke else ''}model d = {args.hidden}, {args.layers} layers,
{args.heads} heads, init std {args.init_std}; SFT {args.sft_steps} steps x {args.sft_batch}, ε = {args.sft_eps}; RL budget {args.budget} generated samples per arm,
{args.prompts_per_step} prompts x G = {args.group_size} a step; {args.eval_size} hard prompts). CPU time in all:
{meta.get('cpu_s', 0):.0f} s on one thread. Runs not finished: {', '.join(missing) if missing else 'none'}.

{acc_table}

Every arm generated exactly the same number of samples (column "samples"); arms that rescue all-wrong groups spend
part of the budget on the rescues, so they take fewer steps. "Own all-wrong rate, late": mean over the steps that
start after {LATE:.0%} of the budget of the fraction of groups whose G own samples are all wrong (before any
inpainting or resampling).

{claims_table}

Overall verdict: **{summary.get('verdict', 'n/a')}**.

Per seed and arm, 95% Wilson intervals of the final accuracy ({args.eval_size} prompts): {'; '.join(wil)}.

{rescue}

("Groups rescued by hints" and "hinted samples swapped in" are the IGPO method's own metrics, which count rows
that carry a hint mask; resampling's swapped-in samples carry none, so they are not counted there.)

SFT checkpoints (loss = the masked-diffusion loss, mean of the last 50 steps):

{table(["init / seed", "loss", "examples", "CPU s"], sft_rows) if sft_rows else "(none)"}

Evaluation record (every accuracy above):
{record}

![hard accuracy and own all-wrong rate vs samples]({NAME}.png)
"""


def plot(results: dict, summary: dict, out: Path) -> None:
    arms = list(summary["arms"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for a in arms:
        runs = [results[f"{a}/{s}"] for s in summary["seeds"][a]]
        xs = [p[0] for p in runs[0]["curve"]]
        ax1.plot(xs, [statistics.fmean(r["curve"][i][2] for r in runs) for i in range(len(xs))], marker="o", label=a)
        n = min(len(r["all_wrong"]) for r in runs)
        window = 10
        ys = [statistics.fmean(statistics.fmean(r["all_wrong"][max(0, i - window + 1) : i + 1]) for r in runs) for i in range(n)]
        ax2.plot([runs[0]["step_samples"][i][1] for i in range(n)], ys, label=a)
    ax1.set(xlabel="generated samples", ylabel="hard-split greedy accuracy", title="mean over the finished seeds")
    ax2.set(xlabel="generated samples", ylabel="own all-wrong rate (10-step mean)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    save_plot(fig, NAME, out)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 seed, arms no_hint and igpo, a tiny model: seconds")
    ap.add_argument("--out", type=Path, default=None, help="results and (smoke) report folder (default runs/igpo_repro)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--sft-batch", type=int, default=128)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--sft-eps", type=float, default=0.9, help="t = (1 - eps) u + eps of the SFT masks (LLaDA 1e-3)")
    ap.add_argument("--init-std", type=float, default=0.1, help="std of the fresh model's weight matrices before SFT")
    ap.add_argument("--sft-size", type=int, default=20000, help="SFT problems drawn (the held-out split removed)")
    ap.add_argument("--budget", type=int, default=4096, help="generated samples per arm (a multiple of G)")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--evals", type=int, default=4, help="accuracy evaluations along the budget (plus one before)")
    ap.add_argument("--no-report", action="store_true", help="only run and save results.json")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.arms = args.seeds[:1], ["no_hint", "igpo"]
        args.hidden, args.layers, args.heads, args.sft_steps, args.sft_batch, args.sft_size = 32, 1, 2, 20, 32, 400
        args.budget, args.prompts_per_step, args.group_size, args.eval_size, args.evals = 48, 4, 4, 40, 1
    if args.budget % args.group_size or args.budget < args.group_size:
        raise SystemExit(f"--budget must be a positive multiple of --group-size ({args.group_size}), got {args.budget}")
    torch.set_num_threads(1)
    out = (args.out or ROOT / "runs/igpo_repro").resolve()
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    state = json.loads(res_path.read_text()) if res_path.exists() else {}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "arms", "no_report")}
    if state.get("config", config) != config:
        raise SystemExit(f"{res_path} holds results of other settings ({state['config']}); use another --out")
    state["config"], results, meta = config, state.setdefault("results", {}), state.setdefault("meta", {"sft": {}})

    def save() -> None:
        res_path.write_text(json.dumps(state, indent=1))

    split, train = eval_split(args)
    held = {s["prompt"] for s in split}
    t_all = time.process_time()

    def checkpoint(init: str, seed: int) -> str:
        path = out / f"sft_{init}_seed{seed}.safetensors"
        if f"{init}/{seed}" not in meta["sft"] or not path.exists():
            meta["sft"][f"{init}/{seed}"] = sft(init, seed, held, args, path)
            save()
            print(f"sft {init} seed {seed}: loss {meta['sft'][f'{init}/{seed}']['loss_last50']:.3f}", flush=True)
        return str(path)

    core = [a for a in args.arms if a in CORE]  # the claim's arms first for every seed, then the others
    for arm, seed in [(a, s) for s in args.seeds for a in core] + [(a, s) for s in args.seeds for a in args.arms if a not in CORE]:
        if f"{arm}/{seed}" in results:
            continue
        r = run_arm(arm, seed, checkpoint(ARMS[arm][1], seed), split, train, args)
        results[f"{arm}/{seed}"] = r
        meta["cpu_s"] = meta.get("cpu_s", 0.0) + time.process_time() - t_all
        t_all = time.process_time()
        save()
        print(f"{arm} seed {seed}: accuracy {r['start_accuracy']:.3f} -> {r['accuracy']:.3f}, own all-wrong (late) "
              f"{r['all_wrong_late']:.3f}, {r['samples']} samples in {r['steps']} steps, {r['cpu_s']:.0f} CPU s", flush=True)
    meta["cpu_s"] = meta.get("cpu_s", 0.0) + time.process_time() - t_all
    meta["command"] = "OMP_NUM_THREADS=1 .venv/bin/python reproductions/igpo.py" + (" --smoke" if args.smoke else "")
    save()
    summary = analyse(results, args.seeds, args.arms, args.eval_size)
    state["summary"] = summary
    save()
    line = f"{NAME}: claim {summary.get('verdict', 'n/a')}: " + "; ".join(
        f"{k} {c['mean']:+.3f} [{c['lo']:.3f}, {c['hi']:.3f}] ({c['verdict']})" for k, c in summary["claims"].items())
    print(line, flush=True)
    if args.no_report or not summary["arms"]:
        return
    report_dir = out if args.smoke else REPORTS
    report = report_dir / f"{NAME}.md"
    old = (REPORTS / f"{NAME}.md").read_text() if (REPORTS / f"{NAME}.md").exists() else f"# {NAME}\n\n"
    pre = old.split("\n" + RESULTS_MARKER + "\n")[0].rstrip() + "\n\n"  # the pre-registration, kept as written
    reading = "\n" + READING_MARKER
    kept = "" if args.smoke or reading not in old else old[old.index(reading):]  # hand-written notes, kept
    report.write_text(pre + results_markdown(results, summary, args, meta) + f"\nVerdict line: `{line}`\n" + kept)
    plot(results, summary, report_dir)


if __name__ == "__main__":
    main()
