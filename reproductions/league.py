"""The estimator league table: every advantage estimator, loss and update-changing method of the library on the same
task, the same rollout budget and the same seeds, against GRPO, Dr.GRPO and RLOO.

    python reproductions/league.py            # fast tier: tiny Llama from scratch, every arm x 5 seeds (~30 min)
    python reproductions/league.py --smoke    # 2 arms x 1 seed x 2 steps (a test runs it)
    python reproductions/league.py --arms grpo,rloo --seeds 0,1,2   # a subset
    python reproductions/league.py --tier smollm2 --arms grpo,dr_grpo,rloo --steps 10   # SmolLM2 tier cells

Each arm is composed from the library's parts exactly as its recipe YAML does: the ``model.init_args`` entries
``advantage``, ``loss``, ``selector``, ``methods``, ``kl_in_reward``, ``mu``, ``minibatch_size``,
``max_generation_rounds`` (and ``group_size`` where a recipe samples one completion per prompt) are read from
``configs/<domain>/<recipe>.yaml`` and instantiated by import path with their init args; nothing of an estimator is
re-implemented here. What the league fixes for every arm (the matched budget): the policy (the same SFT'd
checkpoint), the task and its reward, the sampling settings, rows sampled per step (prompts x G), the learning
rate, the number of steps and the seeds. Where a recipe's argument is tied to its own run length or batch (a
warm-up of 30 steps, a schedule over 60 steps, a buffer threshold of 32 rows) it is rescaled to the league's and the
rescaling is listed in the table (``overrides``).

Fast tier (``--tier fast``): a 2-layer Llama built from config with a character tokenizer (``common.models.
TinyLlama``) is trained from scratch by teacher forcing on "chain sums" (``3+5+8+1=`` -> ``8,16,17``: the running
sums, a multi-step task where the first steps can be right and the last wrong), stopped while it is still weak
(cached under ``$ADVLAB_CACHE``), then every arm trains it with RL for ``--steps`` steps. The reward gives partial
credit: the fraction of running sums right up to the first wrong one; accuracy is the last sum (the answer) right.
Held-out greedy accuracy is recorded every ``--eval_every`` steps against the rollouts sampled and the tokens
generated so far (counted in the rollout backend, so a method that samples extra continuations -- SPO's Monte
Carlo values, DAPO's refill rounds, a tree -- pays for them).

SmolLM2 tier (``--tier smollm2``): the bundled SmolLM2-135M-Instruct on arithmetic and countdown with each LM
reasoning method's recipe parts, vLLM rollouts where vLLM is installed; its cells are written as measured, and every
cell not measured carries the reason and the command that fills it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import platform
import random
import string
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.report import (REPORTS, ROOT, diff_ci, eval_record, fmt_ci, mean_ci, plt, save_plot, split_hash, table,
                            write_report)

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from common.rewards.math import PerSampleReward  # noqa: E402
from common.rollout.base import Sampling  # noqa: E402
from common.rollout.hf import HFBackend  # noqa: E402
from text_reasoning.data import ReasoningData, TaskSource  # noqa: E402
from text_reasoning.tasks import Problem  # noqa: E402

LEAGUE_MD = ROOT / "reproductions" / "league.md"
CONFIGS = ROOT / "configs"
MAX_CHARS = 64  # model output is hostile input: only its first MAX_CHARS characters are parsed
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


# ------------------------------------------------------------------------------------------------ the task
class ChainSum(TaskSource):
    """``operands`` single digits; the answer is the running sums, comma separated: ``3+5+8+1`` -> ``8,16,17``.

    ``meta``: ``steps`` (the running sums), ``distribution`` (the final sum's tens digit, 0-3: DUMP's curriculum
    reads it through ``SampleFields``), ``solution`` (the answer text, for methods that show it).
    """

    def __init__(self, operands: int = 4):
        if operands < 2:
            raise ValueError(f"ChainSum: operands must be >= 2, got {operands}")
        self.operands = operands

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, out, seen = random.Random(seed), [], set()
        limit = 10 ** self.operands
        while len(out) < n:
            digits = [rng.randrange(10) for _ in range(self.operands)]
            key = tuple(digits)
            if key in seen and len(seen) < limit:
                continue
            seen.add(key)
            sums = [sum(digits[: i + 1]) for i in range(1, self.operands)]
            answer = ",".join(str(s) for s in sums)
            out.append(Problem("+".join(str(d) for d in digits), answer, "chain_sum", self.operands - 1,
                               {"steps": sums, "distribution": min(sums[-1] // 10, 3), "solution": answer}))
        return out


def _parts(completion: str) -> list[str]:
    return completion[:MAX_CHARS].strip().split(",")


class StepCredit(PerSampleReward):
    """Partial credit: (number of running sums right before the first wrong one) / (number of sums)."""

    def score(self, completion: str, sample: dict) -> float:
        right = 0
        for got, want in zip(_parts(completion), sample["steps"]):
            if got.strip() != str(want):
                break
            right += 1
        return right / len(sample["steps"])


class FinalCorrect(PerSampleReward):
    """Accuracy: the last comma-separated field equals the final sum (and there are exactly as many fields)."""

    def score(self, completion: str, sample: dict) -> float:
        got = _parts(completion)
        return float(len(got) == len(sample["steps"]) and got[-1].strip() == str(sample["steps"][-1]))


class MeteredBackend(HFBackend):
    """The HF backend, counting the rows sampled and the tokens generated for training (``counting`` on)."""

    def __init__(self):
        super().__init__()
        self.counting, self.rows, self.tokens = True, 0, 0

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, n, sampling, greedy=False):
        batch = super().generate(model, tokenizer, prompt_ids, prompt_mask, n, sampling, greedy=greedy)
        if self.counting:
            self.rows += batch.batch_size
            self.tokens += int(batch.completion_mask.sum())
        return batch


# ------------------------------------------------------------------------------------------------ the arms
DATA_KEYS = ("tasks", "train_size", "val_size", "prompts_per_step", "val_batch_size", "seed", "val_tasks")
PART_KEYS = ("advantage", "loss", "selector", "methods", "kl_in_reward", "mu", "minibatch_size",
             "max_generation_rounds")


@dataclass
class Arm:
    """One league entry: a recipe whose parts are used, or parts given inline (the three baselines' variants)."""

    name: str
    recipe: str | None = None  # configs/<...>.yaml
    parts: dict = field(default_factory=dict)  # inline YAML-shaped parts (class_path/init_args), override the recipe's
    overrides: dict = field(default_factory=dict)  # dotted path in the parts -> value, or callable(cfg) -> value
    paper: str = ""
    lm_reasoning: bool = True  # its paper is about LM reasoning (the SmolLM2 tier runs it)
    not_fast: str = ""  # why the fast tier cannot measure it ("" = it can)
    note: str = ""  # what to keep in mind when reading its cell


_CLIP = {"class_path": "common.losses.ppo_clip.ClippedPolicyLoss",
         "init_args": {"eps_low": 0.2, "eps_high": 0.2, "aggregation": "seq_mean_token_mean", "beta": 0.0}}


def _steps(cfg):
    return cfg.steps


ARMS: list[Arm] = [
    Arm("grpo", "text_reasoning/grpo_arithmetic.yaml", paper="arXiv 2402.03300"),
    Arm("dr_grpo", parts={"advantage": {"class_path": "common.advantages.group.DrGRPO"},
                          "loss": {"class_path": "common.losses.ppo_clip.ClippedPolicyLoss",
                                   "init_args": {"eps_low": 0.2, "eps_high": 0.2, "aggregation": "seq_mean_token_sum_norm",
                                                 "beta": 0.0}}}, paper="arXiv 2503.20783"),
    Arm("rloo", parts={"advantage": {"class_path": "common.advantages.group.RLOO"}, "loss": _CLIP},
        paper="arXiv 2402.14740"),
    Arm("reinforce_pp", parts={"advantage": {"class_path": "common.advantages.group.ReinforcePP"},
                               "loss": {**_CLIP, "init_args": {**_CLIP["init_args"], "aggregation": "token_mean"}}},
        paper="arXiv 2501.03262"),
    Arm("grpo_batch_std", parts={"advantage": {"class_path": "common.advantages.group.GRPO",
                                               "init_args": {"scale": "batch"}}, "loss": _CLIP},
        paper="arXiv 2402.03300 (batch σ)"),
    Arm("mc_grpo", "text_reasoning/mc_grpo.yaml", paper="MC-GRPO"),
    Arm("ngrpo", "text_reasoning/ngrpo.yaml", paper="NGRPO"),
    Arm("dapo", "text_reasoning/dapo.yaml", paper="arXiv 2503.14476"),
    Arm("clip_cov", "text_reasoning/clip_cov.yaml", paper="arXiv 2505.22617"),
    Arm("kl_cov", "text_reasoning/kl_cov.yaml", paper="arXiv 2505.22617"),
    Arm("entropy_top20", "text_reasoning/entropy_top20.yaml", paper="arXiv 2506.01939"),
    Arm("holder_po", "text_reasoning/holder_po.yaml", overrides={"loss.init_args.total_steps": _steps},
        paper="HölderPO"),
    Arm("hapo", "text_reasoning/hapo.yaml", paper="HAPO"),
    Arm("drpo", "text_reasoning/drpo.yaml", paper="DRPO"),
    Arm("adora", "text_reasoning/adora.yaml", paper="ADORA"),
    Arm("d3s", "text_reasoning/d3s.yaml", overrides={"selector.init_args.warmup_steps": _steps,
                                                     "loss.init_args.warmup_steps": _steps}, paper="D³S"),
    Arm("ssb", "text_reasoning/ssb.yaml", overrides={"selector.init_args.min_nonzero": lambda c: c.rows // 2},
        paper="SSB"),
    Arm("r3", "text_reasoning/r3.yaml", paper="R³"),
    Arm("dump", "text_reasoning/dump.yaml", paper="DUMP",
        not_fast="a curriculum over task sources (one distribution per source); the fast tier has one task, where DUMP "
                 "is GRPO -- it is in the SmolLM2 tier on its recipe's mixture (Knights-and-Knaves, sums)"),
    Arm("grpo_adaptive_kl", "text_reasoning/grpo_adaptive_kl.yaml", paper="adaptive KL (Ziegler et al. 2019)"),
    Arm("tppo", "text_reasoning/tppo.yaml", paper="T-PPO"),
    Arm("spo_stream", "text_reasoning/spo_stream.yaml",
        overrides={"advantage.init_args.num_prompts": lambda c: c.train_size}, paper="SPO single-stream"),
    Arm("spo_chain", "text_reasoning/spo_chain.yaml", paper="Segment PO (chain)",
        note="its Monte Carlo prefix values sample about 5x GRPO's tokens (the rows column counts them); a 2-step probe "
             "hit a shape error in common/methods/segment_po.py prefix_values when every completion of a batch ends "
             "early (reported), not met in these 5 seeds"),
    Arm("spo_tree", "text_reasoning/spo_tree.yaml", paper="Segment PO (tree)"),
    Arm("dpo_online", "text_reasoning/dpo.yaml", paper="DPO (online pairs)"),
    Arm("adpo", "text_reasoning/adpo.yaml", paper="ADPO"),
    Arm("adhint", "text_reasoning/adhint.yaml", paper="ADHint",
        note="privileged information: hinted rows start from a prefix of the reference answer (forced, not generated: "
             "fewer tokens generated)"),
    Arm("sdpo", "text_reasoning/sdpo.yaml", paper="SDPO",
        note="the teacher is the policy re-prompted with a sibling's solution ('Correct solution: ...'), a context "
             "the char-level toy never saw in SFT: its collapse here may be the toy's, not the method's"),
    Arm("srpo", "text_reasoning/srpo.yaml", paper="SRPO", note="the same re-prompted teacher as SDPO (see there)"),
]
BASELINES = ("grpo", "dr_grpo", "rloo")

# Parts of the library not in the league, and why (the table lists them).
EXCLUDED = {
    "common.advantages.gigpo.GiGPO, hgpo.HGPO, mapo.MAPO, uis1.UISemiOnline, combine.MultiScope, turns.TurnAdvantage":
        "turn-level estimators: they group the steps of multi-turn episodes by environment state or turn; on a "
        "single-turn task every episode has one turn and they reduce to their episode-level base",
    "common.advantages.dcpo.DCPO, poad.POAD, istar.IStar (configs/agentic/dcpo, poad, istar.yaml)":
        "their recipes' parts need episode fields (RolloutBatch.episode_ids, end_reason, turn_mask) that only the "
        "multi-turn agent policy provides; tried on the fast tier, the Loop refuses them at construction "
        "(check_requirements)",
    "common.advantages.factorised.FactorisedGRPO (configs/retrieval/fgrpo.yaml)":
        "needs RolloutBatch.phase_starts (search / answer phases of a retrieval episode)",
    "common.losses.step_advantage.DirectAdvantageLoss (dapo_step.yaml), preference.DPOLoss offline (dpo_offline.yaml)":
        "offline: they train on stored step records / preference pairs, not on the policy's rollouts, so there is "
        "no rollout budget to match",
    "common.losses.correction.RolloutCorrection": "a correction for a sampler that differs from the trained policy "
        "(vLLM); both tiers sample with the policy itself (HF generate), where it is the identity; it is part of "
        "grpo_adaptive_kl's recipe (included)",
    "common.losses.kl.*, kl_control.*": "KL terms, not estimators: beta 0 in every recipe but grpo_adaptive_kl "
        "(included)",
    "common.methods.arpo.ARPO, spear.SPEAR, episode_stats, canaries, ref_refresh, sample_fields":
        "tool-use agents (ARPO, SPEAR need tool calls), or logging / plumbing that does not change the update "
        "(ref_refresh is in grpo_adaptive_kl)",
}


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {}) if isinstance(node, dict) else node[int(k)]
    node[keys[-1]] = value


def import_path(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any) -> Any:
    """A YAML value as jsonargparse builds it for a class-typed argument: ``{class_path, init_args}`` -> the object
    (init args instantiated recursively), lists element-wise, anything else as is."""
    if isinstance(spec, list):
        return [instantiate(s) for s in spec]
    if isinstance(spec, dict) and "class_path" in spec:
        cls = import_path(spec["class_path"])
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    return spec


def arm_config(arm: Arm, cfg) -> tuple[dict, list[str]]:
    """The arm's parts as YAML-shaped dicts (from its recipe, then inline parts, then the league's rescaling) and the
    list of rescalings applied."""
    parts: dict = {}
    notes = []
    if arm.recipe:
        y = yaml.safe_load((CONFIGS / arm.recipe).read_text())
        init = y["model"]["init_args"]
        parts = {k: copy.deepcopy(init[k]) for k in PART_KEYS if k in init}
        if init.get("group_size", 8) != 8:  # G is part of the method (SPO: 1, MC-GRPO: G + 1 = 3); rows stay matched
            parts["group_size"] = init["group_size"]
            notes.append(f"G={init['group_size']} (recipe), {max(1, cfg.rows // init['group_size'])} prompts/step")
        if (y.get("data") or {}).get("class_path", "text_reasoning.data.ReasoningData") != "text_reasoning.data.ReasoningData":
            data_cls = y["data"]["class_path"]  # e.g. SPO's PrioritisedData: its own arguments, the league's task
            extra = {k: v for k, v in y["data"].get("init_args", {}).items() if k not in DATA_KEYS}
            parts["data"] = {"class_path": data_cls, "init_args": extra}
            notes.append(f"data {data_cls.rsplit('.', 1)[-1]}")
        data = (y.get("data") or {}).get("init_args", {})
        recipe_rows = data.get("prompts_per_step", 4) * init.get("group_size", 8)
        if "minibatch_size" in parts and parts["minibatch_size"]:  # the same number of optimiser steps per batch
            mb = max(1, round(parts["minibatch_size"] * cfg.rows / recipe_rows))
            notes.append(f"minibatch_size {parts['minibatch_size']}->{mb} (same steps per batch)")
            parts["minibatch_size"] = mb
    parts.update(copy.deepcopy(arm.parts))
    for path, value in arm.overrides.items():
        v = value(cfg) if callable(value) else value
        notes.append(f"{path.split('.')[0]}.{path.split('.')[-1]}={v}")
        _set(parts, path, v)
    return parts, notes


# ------------------------------------------------------------------------------------------------ the fast tier
@dataclass
class FastConfig:
    steps: int = 30
    prompts: int = 8
    group_size: int = 8
    lr: float = 1e-4
    eval_every: int = 5
    train_size: int = 2000
    val_size: int = 200
    max_new_tokens: int = 12
    hidden: int = 64
    layers: int = 2
    sft_steps: int = 150
    sft_lr: float = 3e-3

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


def sft_policy(cfg: FastConfig) -> Path:
    """The weak starting policy: TinyLlama(hidden, layers) from config, teacher-forced on the training chain sums for
    ``sft_steps`` steps (batch 64, AdamW), saved as a Hugging Face directory (cached by its settings)."""
    from common.models import TinyLlama, cache_dir

    out = cache_dir() / f"league_sft_h{cfg.hidden}_l{cfg.layers}_s{cfg.sft_steps}_lr{cfg.sft_lr:g}_n{cfg.train_size}"
    if (out / "config.json").exists():
        return out
    model, tok = TinyLlama(cfg.hidden, cfg.layers, 4, ALPHABET, seed=0).load()
    data = ReasoningData([ChainSum()], train_size=cfg.train_size, val_size=cfg.val_size, seed=0)
    data.setup()
    texts = [tok.apply_chat_template([{"role": "user", "content": s["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for s in data.train_set]
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    tok.padding_side = "right"
    for step in range(cfg.sft_steps):
        idx = torch.randint(len(texts), (64,), generator=g).tolist()
        prompts = [texts[i] for i in idx]
        full = [p + data.train_set[i]["answer"] + tok.eos_token for p, i in zip(prompts, idx)]
        enc = tok(full, return_tensors="pt", padding=True, add_special_tokens=False)
        plen = torch.tensor([len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts])  # (64,)
        labels = enc["input_ids"].masked_fill(~enc["attention_mask"].bool(), -100)
        pos = torch.arange(labels.shape[1])[None]  # (1, L)
        labels = labels.masked_fill(pos < plen[:, None], -100)  # completion tokens only
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok.padding_side = "left"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def greedy_eval(module, val: list[dict], backend: MeteredBackend, credit: bool) -> tuple[float, float]:
    """Held-out greedy accuracy (the module's verifier) and mean partial credit (fast tier; else the accuracy), not
    counted as training rollouts."""
    backend.counting = False
    try:
        with torch.no_grad():
            batch = module.policy.rollout(val, 1, greedy=True)
    finally:
        backend.counting = True
    acc = float(module.verify(batch).float().mean())
    return acc, float(StepCredit()(batch.completions, batch.samples).mean()) if credit else acc


def run_arm(arm: Arm, seed: int, cfg: FastConfig, policy, tasks: list, *, fast: bool = True) -> dict:
    """One arm x one seed: the shared module (TextReasoningModule) with the arm's parts and the league's fixed
    settings, trained by a Lightning Trainer for ``cfg.steps`` rollout batches; held-out greedy accuracy every
    ``cfg.eval_every`` batches, with the rollouts and tokens sampled so far."""
    import lightning as L

    from text_reasoning.module import TextReasoningModule

    parts_cfg, notes = arm_config(arm, cfg)
    data_spec = parts_cfg.pop("data", None)
    parts = {k: instantiate(v) for k, v in parts_cfg.items()}
    G = parts.pop("group_size", cfg.group_size)
    prompts = max(1, cfg.rows // G)  # the same rows per step for every arm
    L.seed_everything(seed, verbose=False)
    backend = MeteredBackend()
    task_parts = dict(verifier=FinalCorrect(), rewards=[StepCredit()]) if fast else {}
    module = TextReasoningModule(
        policy=policy, sampling=Sampling(max_new_tokens=cfg.max_new_tokens, temperature=1.0, logprobs=True),
        rollout_backend=backend, group_size=G, lr=cfg.lr, max_grad_norm=1.0, canaries=False,
        log_completions_every=0, **task_parts, **parts)
    data_cls = ReasoningData if data_spec is None else import_path(data_spec["class_path"])
    data = data_cls(tasks, train_size=cfg.train_size, val_size=cfg.val_size, prompts_per_step=prompts,
                    val_batch_size=cfg.val_size, seed=0, **(data_spec or {}).get("init_args", {}))
    data.setup()
    curve = []
    done = [0]  # RL steps (rollout batches); Lightning's global_step counts optimiser steps (several per batch
    # for recipes with minibatches), so the league stops and evaluates on rollout batches

    class Eval(L.Callback):
        def on_train_start(self, trainer, pl_module):
            curve.append((0, 0, 0, *greedy_eval(pl_module, data.val_set, backend, fast)))

        def on_train_batch_end(self, trainer, pl_module, *args):
            done[0] += 1
            step = done[0]
            if step % cfg.eval_every == 0 or step == cfg.steps:
                curve.append((step, backend.rows, backend.tokens, *greedy_eval(pl_module, data.val_set, backend, fast)))
            if step >= cfg.steps:
                trainer.should_stop = True

    trainer = L.Trainer(max_steps=-1, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Eval()])
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    if curve[-1][0] != cfg.steps:
        curve.append((done[0], backend.rows, backend.tokens, *greedy_eval(module, data.val_set, backend, fast)))
    return {"arm": arm.name, "seed": seed, "curve": curve, "final_acc": curve[-1][3], "final_credit": curve[-1][4],
            "start_acc": curve[0][3], "rows": backend.rows, "tokens": backend.tokens, "G": G,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "notes": notes,
            "split_hash": split_hash(data.val_set)}


def run_fast(arm: Arm, seed: int, cfg: FastConfig, sft_dir: Path) -> dict:
    from common.models import Pretrained

    return run_arm(arm, seed, cfg, Pretrained(str(sft_dir)), [ChainSum()])

# ------------------------------------------------------------------------------------------------ reporting
def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": [], "failed": {}, "meta": {}}


def save_results(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def fast_table(res: dict, arms: list[Arm]) -> tuple[str, list, list]:
    by = {}
    for r in res["runs"]:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    base = by.get("grpo", {})
    rows, plotted, stats = [], [], []  # stats: (arm, mean accuracy, seeds, reading)
    for arm in arms:
        runs = by.get(arm.name)
        if arm.not_fast:
            rows.append((arm.name, arm.recipe or "inline parts", "—", "—", "—", "—", "—", "—",
                         f"not in the fast tier: {arm.not_fast}"))
            continue
        if not runs:
            why = res["failed"].get(arm.name, "not run")
            rows.append((arm.name, arm.recipe or "inline parts", "—", "—", "—", "—", "—", "—", f"not measured: {why}"))
            continue
        seeds = sorted(runs)
        acc = [runs[s]["final_acc"] for s in seeds]
        cred = [runs[s]["final_credit"] for s in seeds]
        ci = fmt_ci(mean_ci(acc)) if len(acc) > 1 else f"{acc[0]:.3f} (1 seed)"
        cci = fmt_ci(mean_ci(cred)) if len(cred) > 1 else f"{cred[0]:.3f}"
        common_seeds = [s for s in seeds if s in base]
        if arm.name != "grpo" and len(common_seeds) > 1:
            ci_d = diff_ci([runs[s]["final_acc"] for s in common_seeds], [base[s]["final_acc"] for s in common_seeds])
            d = fmt_ci(ci_d, signed=True)
            reading = "above GRPO" if ci_d[1] > 0 else "below GRPO" if ci_d[2] < 0 else "no detectable difference"
            tok_ratio = (sum(runs[s]["tokens"] for s in common_seeds) /
                         max(1, sum(base[s]["tokens"] for s in common_seeds)))
            if not 0.8 <= tok_ratio <= 1.25:  # rows matched, tokens not: say so in the reading itself
                reading += f" (at {tok_ratio:.1f}x GRPO's generated tokens)"
        else:
            d, reading = "—", "—"
        rows_used = sum(runs[s]["rows"] for s in seeds) / len(seeds)
        toks = sum(runs[s]["tokens"] for s in seeds) / len(seeds)
        notes = "; ".join(dict.fromkeys(runs[seeds[0]]["notes"] + ([arm.note] if arm.note else [])))
        if arm.name != "grpo" and common_seeds and all(runs[s]["curve"] == base[s]["curve"] for s in common_seeds):
            notes = "; ".join(x for x in (notes, "the same curve as GRPO on every seed (its parts never changed the "
                                                 "update here)") if x)
        if arm.name in res["failed"]:
            notes = "; ".join(x for x in (notes, f"a later seed failed: {res['failed'][arm.name]}") if x)
        rows.append((arm.name, arm.recipe or "inline parts", ci, d, reading, cci, f"{rows_used:.0f}", f"{toks:.0f}",
                     f"{len(seeds)} seed{'s' * (len(seeds) > 1)}" + (f"; {notes}" if notes else "")))
        plotted.append((arm.name, [runs[s]["curve"] for s in seeds]))
        stats.append((arm.name, sum(acc) / len(acc), len(seeds), reading))
    header = ["arm", "parts from", "held-out accuracy [95% CI]", "Δ vs GRPO (paired) [95% CI]", "reading",
              "partial credit [95% CI]", "rollouts", "generated tokens", "notes"]
    return table(header, rows), plotted, stats


def headline(stats: list, start: str = "?") -> str:
    """The table in three lines: the baselines, the arms the reading rule separates from GRPO, the top three."""
    if not stats:
        return "No arm measured yet."
    by = {a: (m, n, r) for a, m, n, r in stats}
    base = ", ".join(f"{a} {by[a][0]:.3f}" for a in BASELINES if a in by)
    above = [a + r[len("above GRPO"):] for a, _, _, r in stats if r.startswith("above GRPO")]
    below = [a + r[len("below GRPO"):] for a, _, _, r in stats if r.startswith("below GRPO")]
    top = sorted(stats, key=lambda x: -x[1])[:3]
    seeds = sorted({n for _, _, n, _ in stats})
    return (f"- The common SFT'd start: {start}. Baselines after RL (mean held-out accuracy): {base}; seeds per arm: "
            f"{', '.join(map(str, seeds))}. At this budget RL moves the weak policy little, so *no detectable "
            "difference* mostly says the budget is small, not that the methods are equal.\n"
            f"- Above GRPO (paired 95% CI > 0): {', '.join(above) or 'none'}; below GRPO (CI < 0): "
            f"{', '.join(below) or 'none'}; every other measured arm: no detectable difference.\n"
            f"- Highest means: {', '.join(f'{a} {m:.3f}' for a, m, _, _ in top)}.")


def plot_curves(plotted: list, name: str, where: Path) -> Path:
    """Three panels: final held-out accuracy per arm (mean and 95% interval over seeds, baselines in colour), and
    the mean accuracy curve against rollouts sampled and against tokens generated (log scale: SPO's Monte Carlo
    continuations cost several times the others)."""
    fig, axes = plt.subplots(1, 3, figsize=(19, 6), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    finals = []
    for arm, curves in plotted:
        acc = [c[-1][3] for c in curves]
        m, lo, hi = mean_ci(acc) if len(acc) > 1 else (acc[0], acc[0], acc[0])
        finals.append((m, arm, m - lo))
    finals.sort()
    colours = {"grpo": "tab:blue", "dr_grpo": "tab:orange", "rloo": "tab:green"}
    axes[0].barh([a for _, a, _ in finals], [m for m, _, _ in finals], xerr=[e for _, _, e in finals],
                 color=[colours.get(a, "0.6") for _, a, _ in finals], capsize=2)
    start = plotted[0][1][0][0][3]
    axes[0].axvline(start, color="k", ls="--", lw=1, label=f"the SFT'd start ({start:.3f})")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_xlabel("held-out greedy accuracy after the last step (95% CI over seeds)")
    axes[0].tick_params(axis="y", labelsize=7)
    cmap = plt.get_cmap("tab20")
    for k, (arm, curves) in enumerate(plotted):
        n = min(len(c) for c in curves)
        mean = lambda i: [sum(c[j][i] for c in curves) / len(curves) for j in range(1, n)]  # noqa: E731
        style = dict(lw=2.5, color=colours[arm]) if arm in BASELINES else dict(
            lw=1, alpha=0.85, color=cmap(k % 20), ls=("-", "--", ":")[k // 20 % 3])
        axes[1].plot(mean(1), mean(3), label=arm, **style)
        axes[2].plot(mean(2), mean(3), label=arm, **style)
    axes[1].set_xlabel("rollouts sampled (log)")
    axes[2].set_xlabel("tokens generated (log)")
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("held-out greedy accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=6, ncol=2, loc="lower right")
    fig.suptitle("League, fast tier: chain sums, tiny Llama from scratch (SFT'd weak), same seeds and rows per step")
    fig.tight_layout()
    return save_plot(fig, name, where)


# ------------------------------------------------------------------------------------------------ SmolLM2 tier
SMOL_TASKS = {"arithmetic": "text_reasoning.data.Arithmetic", "countdown": "text_reasoning.data.Countdown",
              "knights_knaves": "text_reasoning.data.KnightsKnaves", "curriculum": "(dump.yaml's data tasks)"}
SMOL_STEPS = 5  # a CPU-feasible step count (a GPU with vLLM affords the recipes' 60)
CURRICULUM = ("dump",)  # curriculum methods: Knights-and-Knaves (several difficulty levels) in the SmolLM2 tier


def smol_command(arm: Arm, task: str, seed: int, steps: int) -> str:
    return (f"python reproductions/league.py --tier smollm2 --arms {arm.name} --smol_tasks {task} --seeds {seed} "
            f"--steps {steps}")


def smol_section(res: dict, arms: list[Arm], steps: int, seeds: list[int]) -> str:
    by = {(r["arm"], r["task"], r["seed"]): r for r in res.get("smol_runs", [])}
    walls = [r["wall_s"] for r in res.get("smol_runs", [])]
    cost = (f"a cell took {sum(walls) / len(walls) / 60:.0f} min of wall on the shared 2 cores here" if walls else
            "SmolLM2-135M with HF generate on the shared 2 CPU cores")
    rows = []
    for arm in arms:
        if not arm.lm_reasoning:
            continue
        tasks = (["curriculum"] if arm.name in CURRICULUM else
                 ["arithmetic", "countdown"] + (["curriculum"] if arm.name == "grpo" else []))
        for task in tasks:
            got = [by[(arm.name, task, s)] for s in seeds if (arm.name, task, s) in by]
            if got:
                accs = [g["final_acc"] for g in got]
                cell = fmt_ci(mean_ci(accs)) if len(accs) > 1 else f"{accs[0]:.3f} (seed {got[0]['seed']} only)"
                start = got[0]["start_acc"]
                paired = [g["seed"] for g in got if ("grpo", task, g["seed"]) in by]
                d = (fmt_ci(diff_ci([by[(arm.name, task, s)]["final_acc"] for s in paired],
                                    [by[("grpo", task, s)]["final_acc"] for s in paired]), signed=True)
                     if arm.name != "grpo" and len(paired) > 1 else "—")
                rows.append((arm.name, task, f"{start:.3f}", cell, d, f"{len(got)}/{len(seeds)}",
                             f"{sum(g['wall_s'] for g in got) / len(got):.0f} s", ""))
            else:
                why = res.get("smol_failed", {}).get(f"{arm.name}/{task}", f"not run before the deadline ({cost}; "
                                                     "no GPU lent to this session)")
                rows.append((arm.name, task, "—", "—", "—", f"0/{len(seeds)}", "—",
                             f"{why}; fill: `{smol_command(arm, task, seeds[0], steps)}` (and seeds {seeds[1:]})"))
    return table(["arm", "task", "greedy accuracy at step 0", "after RL [95% CI]", "Δ vs GRPO (paired) [95% CI]",
                  "seeds measured", "wall / run",
                  "not measured: why, and the command"], rows)


def smol_record(res: dict) -> str:
    hashes = sorted({f"{r['task']}: {r['split_hash']}" for r in res.get("smol_runs", [])})
    return eval_record(
        task="text_reasoning.data Arithmetic(digits 2, '+'), Countdown(3 numbers), DUMP's mixture; 50 held-out "
             "problems each (ReasoningData seed 0, disjoint from training)",
        prompt_template="SmolLM2's own chat template, user turn = the problem, no system prompt, no instruction",
        answer_extraction="text_reasoning.rewards.TaskReward: arithmetic the completion's last number (exact, as a "
                          "rational); countdown the last <answer> / expression line, safe_eval, each number once; "
                          "knights-and-knaves every name's role",
        eos_rule="SmolLM2's EOS token (im_end) or 32 new tokens", sampling="evaluation greedy; training temperature 1.0",
        split="; ".join(hashes) or "—", seeds=sorted({r["seed"] for r in res.get("smol_runs", [])}) or "—",
        model="SmolLM2-135M-Instruct (bundled, fp32), full fine-tuning, lr 2e-5, 4 prompts x G 8, HF generate",
    ).replace("## Evaluation record", "### Evaluation record (SmolLM2 tier)")


def run_smol(arm: Arm, task: str, seed: int, steps: int) -> dict:
    """SmolLM2-135M-Instruct with the arm's parts on a generated task: 4 prompts x G 8 a step, 32 new tokens, lr
    2e-5 (the recipes' CPU scale); held-out greedy accuracy on 50 problems (TaskReward's check) before and after."""
    from common.models import BundledSmolLM2

    cfg = FastConfig(steps=steps, prompts=4, group_size=8, lr=2e-5, train_size=512, val_size=50, max_new_tokens=32,
                     eval_every=steps)
    if task == "curriculum":  # DUMP's recipe data: Knights-and-Knaves with 2-6 people and 1-3 digit sums, one source each
        tasks = instantiate(yaml.safe_load((CONFIGS / "text_reasoning/dump.yaml").read_text())["data"]["init_args"]["tasks"])
    else:
        tasks = [instantiate({"class_path": SMOL_TASKS[task]})]
    r = run_arm(arm, seed, cfg, BundledSmolLM2(), tasks, fast=False)
    return {**r, "task": task}

# ------------------------------------------------------------------------------------------------ main
def write_markdown(res: dict, arms: list[Arm], cfg: FastConfig, seeds: list[int], out_md: Path, plot_name: str,
                   smoke: bool, smol_steps: int) -> None:
    tab, plotted, stats = fast_table(res, arms)
    png = plot_curves(plotted, plot_name, REPORTS if out_md == LEAGUE_MD else out_md.parent) if plotted else None
    meta = res.get("meta", {})
    hashes = sorted({r["split_hash"] for r in res["runs"]})
    excluded = table(["part(s)", "why not in the league"], list(EXCLUDED.items()))
    not_fast = {a.name for a in ARMS if a.not_fast}
    failed = [(k, v) for k, v in res["failed"].items() if k not in not_fast]
    rec = eval_record(
        task=f"chain sums: 4 single digits 'a+b+c+d', answer the 3 running sums 's1,s2,s3' ({cfg.val_size} held-out "
             "problems, disjoint from training; text_reasoning.data.ReasoningData seed 0)",
        prompt_template="char tokenizer chat template: '<problem>=' (common.models.CHAT_TEMPLATE_PLAIN)",
        answer_extraction=f"first {MAX_CHARS} chars, split on ','; accuracy: exactly 3 fields and the last equals the "
                          "final sum; reward (training): fraction of running sums right up to the first wrong one",
        eos_rule=f"stop at </s> or {cfg.max_new_tokens} new tokens",
        sampling="evaluation greedy; training rollouts temperature 1.0, no top-k/top-p, HF generate",
        split=", ".join(hashes) or "—", seeds=seeds,
        model=f"TinyLlama(hidden {cfg.hidden}, {cfg.layers} layers, 4 heads, {len(ALPHABET) + 4}-token char vocab) "
              f"from config, teacher-forced {cfg.sft_steps} steps (batch 64, lr {cfg.sft_lr:g}) -> the common start",
        budget=f"{cfg.steps} RL steps x {cfg.rows} rows (prompts x G, G = 8; G = 1 arms get {cfg.rows} prompts), "
               f"lr {cfg.lr:g} AdamW, grad-norm clip 1.0, canaries off",
    )
    cmd = meta.get("command", "python reproductions/league.py")
    body = f"""# The estimator league table
{"**SMOKE RUN (2 steps): not a result.**" if smoke else ""}

Every advantage estimator, loss and update-changing method of the library on the same task, the same rollout budget
and the same seeds, against GRPO, Dr.GRPO and RLOO. Each arm is composed from its recipe YAML's parts (advantage,
loss, selector, methods, ...; `parts from`), instantiated by import path as `advlab fit` does; the league fixes the
policy, task, reward, sampling, rows per step, learning rate, steps and seeds. Regenerate with:

    {cmd}

Run: {meta.get('date', '?')} on {meta.get('machine', '?')}; wall {meta.get('wall_s', 0) / 60:.1f} min; load average
(1/5/15 min) at start {meta.get('load_start', '?')}, at end {meta.get('load_end', '?')}{meta.get('load_during', '')} (the 2
cores were shared with other jobs: wall times are not comparable across rows, token and rollout counts are).

## Fast tier: tiny Llama from scratch on chain sums

Held-out greedy accuracy after {cfg.steps} steps, mean and 95% t interval over seeds; Δ vs GRPO is the paired
difference on the same seeds (reproductions/support/report.py `mean_ci`, `diff_ci`). Rollouts and tokens are per
run (mean over seeds), counted in the rollout backend (extra continuations a method samples are included).

Reading rule (fixed in the script before the run): an arm is *above GRPO* / *below GRPO* only when the paired 95%
interval of its accuracy difference on the same seeds excludes 0; otherwise *no detectable difference* at this
number of seeds -- not "equal". The league measures each recipe's parts at one small, matched budget on one task: a
method built for long chains of thought, large G or many steps can be indistinguishable here and still help at paper
scale; the table says what this budget can and cannot tell apart.

{headline(stats, meta.get('start_acc', '?'))}

{tab}

![league]({os.path.relpath(png, out_md.parent) if png else ''})

Accuracy of the common start (step 0): {meta.get('start_acc', '?')}.

{rec}
## Not in the league

{excluded}

{table(["arm", "failed (the error, first line)"], failed) if failed else "No included arm failed to run."}

## SmolLM2 tier: the bundled SmolLM2-135M-Instruct

Every arm whose paper is about LM reasoning, GRPO included, on arithmetic (2-digit +) and countdown (3 numbers), the
curriculum method (DUMP) on its recipe's mixture of 8 sources (Knights-and-Knaves with 2-6 people, sums of 1-3
digits; `curriculum`, GRPO on the same mixture as its control); {smol_steps} steps of 4 prompts x G 8, 32 new tokens, lr 2e-5, 3 seeds
(0, 1, 2); held-out greedy accuracy on 50 problems (TaskReward's check). The cells here use HF generate: vLLM is
installed, but this script has no vLLM switch yet (not done: the backend part and the RolloutCorrection wrapper of
`configs/text_reasoning/grpo_arithmetic_vllm.yaml` are what a GPU run would add), and no GPU was lent to this session.

{smol_section(res, arms, smol_steps, [0, 1, 2])}

Reading: {smol_steps} steps of 32 rollouts are far too few to rank estimators; a large gain from step 0 in so few steps is
most likely format (the answer's number reached within the 32-token budget; not checked in the completions here), so
these cells show that the tier runs end to end, not which estimator reasons better.

{smol_record(res)}"""
    out_md.write_text(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="2 arms x 1 seed x 2 steps (a test)")
    p.add_argument("--tier", choices=("fast", "smollm2"), default="fast")
    p.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sft_steps", type=int, default=None, help="teacher-forcing steps of the common start")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate of the fast tier")
    p.add_argument("--report_only", action="store_true", help="rewrite the markdown from the results JSONs, run nothing")
    p.add_argument("--smol_tasks", default="arithmetic,countdown")
    p.add_argument("--out", default=str(LEAGUE_MD), help="the markdown written")
    p.add_argument("--results", default=str(REPORTS / "league_fast.json"), help="fast-tier results JSON (resumed)")
    p.add_argument("--smol_results", default=str(REPORTS / "league_smollm2.json"), help="SmolLM2-tier results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = [a.name for a in ARMS]
    wanted = [s for s in args.arms.split(",") if s] or names
    bad = [w for w in wanted if w not in names]
    if bad:
        p.error(f"--arms: unknown arm(s) {bad}; expected names from {names}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    bad_tasks = [t for t in args.smol_tasks.split(",") if t and t not in SMOL_TASKS]
    if bad_tasks:
        p.error(f"--smol_tasks: unknown task(s) {bad_tasks}; expected names from {sorted(SMOL_TASKS)}")
    cfg = FastConfig()
    if args.smoke:  # never over the committed table: into a temporary folder unless --out / --results are given
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="league_smoke_"))
        if args.out == str(LEAGUE_MD):
            args.out = str(tmp / "league_smoke.md")
        if args.results == str(REPORTS / "league_fast.json"):
            args.results = str(tmp / "league_smoke.json")
        if args.smol_results == str(REPORTS / "league_smollm2.json"):
            args.smol_results = str(tmp / "league_smoke_smollm2.json")
        wanted, seeds = ["grpo", "rloo"] if not args.arms else wanted, seeds[:1]
        cfg = FastConfig(steps=2, eval_every=1, train_size=200, val_size=40, sft_steps=5)
    if args.steps is not None:
        if args.steps < 1:
            p.error(f"--steps: expected a positive integer, got {args.steps}")
        cfg.steps = args.steps
    if args.lr is not None:
        cfg.lr = args.lr
    if args.sft_steps is not None:
        cfg.sft_steps = args.sft_steps
    arms = [a for a in ARMS if a.name in wanted]
    results = Path(args.results)
    smol_results = Path(args.smol_results)
    res = load_results(results) if not args.smoke else {"runs": [], "failed": {}, "meta": {}}
    smol = load_results(smol_results)
    smol.setdefault("smol_runs", []), smol.setdefault("smol_failed", {})
    t_start = time.perf_counter()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": "python reproductions/league.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    smol_steps = args.steps or SMOL_STEPS
    if args.report_only:
        pass
    elif args.tier == "smollm2":
        for arm in arms:
            for task in [t for t in args.smol_tasks.split(",") if t]:
                for seed in seeds:
                    if any(r["arm"] == arm.name and r["task"] == task and r["seed"] == seed for r in smol["smol_runs"]):
                        continue
                    try:
                        r = run_smol(arm, task, seed, smol_steps)
                        smol["smol_runs"].append(r)
                        print(f"smollm2 {arm.name} {task} seed {seed}: {r['start_acc']:.3f} -> {r['final_acc']:.3f} "
                              f"({r['wall_s']:.0f} s)", flush=True)
                    except Exception as e:  # noqa: BLE001 - the cell is marked with its error
                        smol["smol_failed"][f"{arm.name}/{task}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    save_results(smol_results, smol)
        smol["meta"]["smol"] = meta
        save_results(smol_results, smol)
        res = load_results(results)
    else:
        sft_dir = sft_policy(cfg)
        res["meta"].update(meta)
        for seed in seeds:  # seed-major: a run stopped early leaves every arm with the same seeds
            for arm in arms:
                if arm.not_fast or arm.name in res["failed"] or any(r["arm"] == arm.name and r["seed"] == seed for r in res["runs"]):
                    continue
                try:
                    r = run_fast(arm, seed, cfg, sft_dir)
                except Exception as e:  # noqa: BLE001 - an arm that cannot run is listed with its error
                    res["failed"][arm.name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                    print(f"{arm.name}: FAILED {res['failed'][arm.name]}", flush=True)
                    if os.environ.get("LEAGUE_TRACEBACK"):
                        traceback.print_exc()
                    save_results(results, res)
                    continue
                res["runs"].append(r)
                res["meta"]["start_acc"] = f"{r['start_acc']:.3f}"
                print(f"{arm.name} seed {seed}: acc {r['start_acc']:.3f} -> {r['final_acc']:.3f}, credit "
                      f"{r['final_credit']:.3f}, {r['rows']} rollouts, {r['tokens']} tokens, {r['wall_s']:.1f} s",
                      flush=True)
                save_results(results, res)
        res["meta"]["wall_s"] = res["meta"].get("wall_s_prev", 0) + time.perf_counter() - t_start
        res["meta"]["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        save_results(results, res)
    out = Path(args.out)
    res["smol_runs"], res["smol_failed"] = smol["smol_runs"], smol["smol_failed"]
    write_markdown(res, [a for a in ARMS if a.name in wanted] if args.smoke else ARMS, cfg, seeds, out,
                   "league_smoke" if args.smoke else "league", args.smoke, smol_steps)
    print(f"league: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
