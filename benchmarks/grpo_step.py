"""Our GRPO step against TRL's ``GRPOTrainer`` on identical work, alternating A B A B in one process.

Work (both sides): the bundled SmolLM2-135M-Instruct, two-digit addition (``text_reasoning.data.Arithmetic``),
4 prompts x G = 8 completions a step, at most 32 new tokens (temperature 1, no top-p/top-k), full fine-tuning in
fp32, AdamW lr 1e-5 (no weight decay), gradient clipping at 1.0, beta = 0 (no reference model), the clipped
GRPO loss (eps 0.2) with per-sequence token means (TRL ``loss_type="grpo"``), group-std advantages, the reward
``text_reasoning.rewards.TaskReward`` on the same problems in the same order, the tokenizer's chat template on
the same user message (TRL's conversational format), 2 torch threads, seed 0.

Ours: ``TextReasoningModule`` as ``configs/text_reasoning/grpo_arithmetic.yaml`` builds it (micro-batch 16), one
call of its real ``training_step`` per step, twice: as shipped (activations kept) and with
``gradient_checkpointing: true`` (each decoder layer recomputed in the backward; "ours, checkpointing"). It runs
outside a ``lightning.Trainer``, so the Trainer services ``update`` uses are given directly: ``optimizers()``
returns the module's own AdamW (``configure_optimizers``), ``lr_schedulers()`` its schedule (None for the constant
rate), ``manual_backward(loss)`` is ``loss.backward()`` and ``clip_gradients`` is ``torch.nn.utils.clip_grad_norm_``
(what Lightning's 32-true precision plugin calls); logging is a no-op.

TRL: ``trainer.train()`` with a callback; a TRL step is timed from ``on_step_begin`` to ``on_step_end`` (generation,
rewards, advantages, every micro-batch's forward/backward, clipping and the optimiser step) and ``on_step_end``
then runs one step of each of ours (not timed as TRL's). The split comes from timing wrappers around
``trainer._generate`` (instrumentation only). TRL runs twice: its defaults (only what the identical work needs is set) and its fastest
configuration here (gradient checkpointing off, the whole 32-row step in one micro-batch).

Columns: rollout = generation and decoding (ours ``module.rollout``, TRL ``_generate``); logprob+update = the rest
of the step (rewards, advantages, the policy forward for log-probs, backward, clip, AdamW); generated tokens/s =
completion tokens (up to and including EOS) / rollout seconds. Peak RSS comes from separate processes
(``--only ours|ours-gc|trl-default|trl-fast``) that run one warm-up and 3 steps of one side alone.

    python benchmarks/grpo_step.py            # full: 1 warm-up + 5 counted steps each, writes results/grpo_step.md
    python benchmarks/grpo_step.py --quick    # smoke test: 1 warm-up + 1 counted step, prints only
    python benchmarks/grpo_step.py --rss-only # peak RSS only (ours, ours with checkpointing, TRL default), the three
                                              # processes at once; writes results/grpo_step_memory.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
from bench import (  # noqa: E402  (before torch: threads, repo root)
    machine_header, mark, setup_threads, table, write_result,
)

import torch  # noqa: E402

SEED = 0
PROMPTS, G, MAX_NEW, LR, MICRO = 4, 8, 32, 1e-5, 16

# What TRL needs set to do the identical work (both TRL runs), and what its fastest configuration changes on top.
TRL_SAME_WORK = dict(
    num_generations=G, max_completion_length=MAX_NEW, learning_rate=LR, beta=0.0, temperature=1.0,
    top_p=1.0, top_k=0, epsilon=0.2, loss_type="grpo", scale_rewards="group", max_grad_norm=1.0, weight_decay=0.0,
    lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=True, use_vllm=False, seed=SEED,
    shuffle_dataset=False, report_to="none", save_strategy="no", disable_tqdm=True,
    model_init_kwargs={"dtype": torch.float32},
    # per_device_train_batch_size stays at its default 8, so 4 prompts x 8 = 32 rows a step need 4 accumulation
    # steps (TRL then generates all 32 at once: steps_per_generation defaults to gradient_accumulation_steps)
    gradient_accumulation_steps=4,
)
TRL_FAST = dict(gradient_checkpointing=False, per_device_train_batch_size=32, gradient_accumulation_steps=1)


def problems(n_steps: int) -> list[list[dict]]:
    """The prompt batches of ``n_steps`` steps, in the order our data module serves them."""
    from text_reasoning.data import Arithmetic, PromptStream, ReasoningData

    data = ReasoningData(tasks=[Arithmetic(digits=2, ops="+")], train_size=2048, val_size=200,
                         prompts_per_step=PROMPTS, seed=SEED)
    data.setup("fit")
    it = iter(PromptStream(data.train_set, PROMPTS, SEED))
    return [next(it) for _ in range(n_steps)]


# ---------------------------------------------------------------- ours
class Ours:
    def __init__(self, gradient_checkpointing: bool = False):
        from common.advantages.group import GRPO
        from common.losses.ppo_clip import ClippedPolicyLoss
        from common.models import BundledSmolLM2
        from common.rollout.base import Sampling
        from text_reasoning.module import TextReasoningModule

        torch.manual_seed(SEED)
        m = TextReasoningModule(
            policy=BundledSmolLM2(), advantage=GRPO(scale="group", eps=1e-6),
            loss=ClippedPolicyLoss(eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean", beta=0.0),
            sampling=Sampling(max_new_tokens=MAX_NEW, temperature=1.0), group_size=G, lr=LR, max_grad_norm=1.0,
            micro_batch_size=MICRO, log_samples_every=0, gradient_checkpointing=gradient_checkpointing)
        conf = m.configure_optimizers()  # the optimiser, or {"optimizer", "lr_scheduler"} with a schedule
        opt, sched = (conf["optimizer"], conf["lr_scheduler"]) if isinstance(conf, dict) else (conf, None)
        params = [p for g in opt.param_groups for p in g["params"]]
        # the Trainer services update() uses (see the module docstring)
        m.optimizers = lambda: opt
        m.lr_schedulers = lambda: sched
        m.manual_backward = lambda loss, *a, **k: loss.backward()
        m.clip_gradients = lambda o, gradient_clip_val=None, gradient_clip_algorithm=None: \
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        self.last: dict = {}

        def log_step(rollouts, metrics, *, rollout_s, prep_s, update_s):  # instrumentation: keep the split
            self.last = dict(rollout=rollout_s, tokens=int(rollouts.lengths.sum()),
                             reward=float(rollouts.rewards.mean()))

        m.log_step = log_step
        m.train()
        m.policy.eval()  # as in a fit: dropout stays off (the module's convention)
        self.module, self.step_idx = m, 0

    def step(self, prompts: list[dict]) -> dict:
        t0 = time.perf_counter()
        self.module.training_step(prompts, self.step_idx)
        total = time.perf_counter() - t0
        self.step_idx += 1
        return dict(step=total, **self.last)


# ---------------------------------------------------------------- TRL
def trl_reward(completions, answer, task, level, prompts=None, **kwargs):
    """Our TaskReward on TRL's conversational completions and dataset columns."""
    from text_reasoning.rewards import TaskReward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    samples = [{"answer": a, "task": t, "level": lv} for a, t, lv in zip(answer, task, level)]
    return TaskReward()(texts, samples).tolist()


def make_trl(batches: list[list[dict]], fast: bool, callbacks):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from common.models import bundled_smollm2_path

    rows = [{"prompt": [{"role": "user", "content": s["prompt"]}], "answer": s["answer"], "task": s["task"],
             "level": s["level"]} for b in batches for s in b]
    cfg = dict(TRL_SAME_WORK, **(TRL_FAST if fast else {}))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo-bench-"), max_steps=len(batches), **cfg)
    trainer = GRPOTrainer(model=str(bundled_smollm2_path()), reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_list(rows), callbacks=callbacks)
    return trainer


class TRLTimer:
    """Callback + wrappers: per-step seconds, generation seconds and generated tokens of TRL."""

    def __init__(self, after_step=None):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.gen, timer.tokens = 0.0, 0
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.steps.append(dict(step=time.perf_counter() - timer.t0, rollout=timer.gen, tokens=timer.tokens))
                if after_step is not None:
                    after_step(len(timer.steps))

        self.callback, self.steps, self.gen, self.tokens, self.t0 = CB(), [], 0.0, 0, 0.0

    def instrument(self, trainer) -> None:
        gen = trainer._generate

        def timed_generate(prompts):
            t = time.perf_counter()
            out = gen(prompts)
            self.gen += time.perf_counter() - t
            self.tokens += sum(len(c) for c in out[1])
            return out

        trainer._generate = timed_generate


def check_same_prompt_ids(ours: Ours, trainer, sample: dict) -> None:
    """Both sides must feed the model the same prompt tokens (same chat template, same message)."""
    ids, mask = ours.module.encode_prompts([sample])
    mine = ids[0][mask[0]].tolist()
    theirs = trainer._tokenize_prompts([[{"role": "user", "content": sample["prompt"]}]])[0][0]
    if list(theirs) != mine:
        raise SystemExit(f"prompt token ids differ:\nours {mine}\nTRL  {list(theirs)}")


# ---------------------------------------------------------------- runs
def alternating(fast: bool, warmup: int, counted: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(ours, ours with gradient checkpointing, TRL) step stats after the warm-up, run A B C A B C."""
    n = warmup + counted
    batches = problems(n)
    ours, ours_gc = Ours(), Ours(gradient_checkpointing=True)
    ours_steps: list[dict] = []
    gc_steps: list[dict] = []

    def after_trl_step(k: int) -> None:  # A B C A B C: one step of each of ours after every TRL step
        ours_steps.append(ours.step(batches[k - 1]))
        gc_steps.append(ours_gc.step(batches[k - 1]))
        o, g, t = ours_steps[-1], gc_steps[-1], timer.steps[-1]
        print(f"  step {k}: TRL {t['step']:.2f} s (gen {t['rollout']:.2f} s, {t['tokens']} tok) | "
              f"ours {o['step']:.2f} s (gen {o['rollout']:.2f} s, {o['tokens']} tok) | "
              f"ours, checkpointing {g['step']:.2f} s (gen {g['rollout']:.2f} s, {g['tokens']} tok)", flush=True)

    timer = TRLTimer(after_trl_step)
    trainer = make_trl(batches, fast, [timer.callback])
    timer.instrument(trainer)
    check_same_prompt_ids(ours, trainer, batches[0][0])
    trainer.train()
    if len(timer.steps) != n or len(ours_steps) != n or len(gc_steps) != n:
        raise SystemExit(f"expected {n} steps each, got TRL {len(timer.steps)}, ours {len(ours_steps)}, "
                         f"ours with checkpointing {len(gc_steps)}")
    return ours_steps[warmup:], gc_steps[warmup:], timer.steps[warmup:]


def only(which: str, steps: int) -> None:
    """One side alone (for peak RSS): ``steps`` steps, then print the stats as JSON."""
    setup_threads()
    batches = problems(steps)
    if which in ("ours", "ours-gc"):
        ours = Ours(gradient_checkpointing=which == "ours-gc")
        for b in batches:
            ours.step(b)
    else:
        timer = TRLTimer()
        trainer = make_trl(batches, which == "trl-fast", [timer.callback])
        trainer.train()
    # VmHWM, not getrusage's ru_maxrss: a child started by fork+exec inherits the parent's ru_maxrss on Linux, so
    # ru_maxrss here would report the (larger) peak of the benchmark process that launched us.
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss_mb = int(line.split()[1]) / 1024  # KiB
    print("RSS_JSON " + json.dumps({"which": which, "peak_rss_mb": rss_mb}))


def peak_rss(which: str, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--only", which, "--steps", str(steps)],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RSS_JSON "):
            return json.loads(line[len("RSS_JSON "):])["peak_rss_mb"]
    raise SystemExit(f"--only {which} failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def rss_only(steps: int) -> None:
    """Peak RSS of ours, ours with gradient checkpointing and TRL's defaults, each alone in its own process; the
    processes run at the same time (memory only: no times are taken)."""
    which = {"ours": "ours", "ours-gc": "ours, checkpointing", "trl-default": "TRL default"}
    procs = {w: subprocess.Popen([sys.executable, __file__, "--only", w, "--steps", str(steps)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for w in which}
    rss = {}
    for w, proc in procs.items():
        out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("RSS_JSON ")), None)
        if line is None:
            raise SystemExit(f"--only {w} failed (rc {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
        rss[which[w]] = json.loads(line[len("RSS_JSON "):])["peak_rss_mb"]
        print(f"peak RSS {which[w]}: {rss[which[w]]:.0f} MB", flush=True)
    write_memory(rss, steps)


def write_memory(rss: dict[str, float], steps: int) -> None:
    base = rss["TRL default"]
    body = table(["run", "peak RSS MB", "/ TRL default"], [[k, f"{v:.0f}", f"{v / base:.2f}"] for k, v in rss.items()])
    r = rss["ours, checkpointing"] / base
    body += f"""
Target: peak RSS of ours with gradient checkpointing <= TRL's default configuration (which checkpoints too): \
{r:.2f}x -> {mark(r <= 1.0)}

Setup: `python benchmarks/grpo_step.py --rss-only --rss-steps {steps - 1}`: each side alone in its own process \
(1 warm-up + {steps - 1} step(s) of the work in the module docstring), VmHWM; the three processes ran at the same \
time, so no step times are reported here (see grpo_step.md). Ours: micro-batch {MICRO}; TRL default: 4 micro-batches \
of 8, gradient checkpointing on.
"""
    write_result("grpo_step_memory", "GRPO step peak memory: ours with and without gradient checkpointing vs TRL", body)


def summary(steps: list[dict]) -> dict:
    med = statistics.median
    return dict(step=med([s["step"] for s in steps]), rollout=med([s["rollout"] for s in steps]),
                rest=med([s["step"] - s["rollout"] for s in steps]),
                tok_s=med([s["tokens"] / s["rollout"] for s in steps]),  # median of per-step rates
                tokens=med([s["tokens"] for s in steps]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 counted step each; print, do not write")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="counted steps each (with --only: steps in all)")
    ap.add_argument("--rss-steps", type=int, default=3, help="steps after the warm-up in the peak-RSS processes")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS processes (run at once); writes "
                    "results/grpo_step_memory.md")
    ap.add_argument("--only", choices=["ours", "ours-gc", "trl-default", "trl-fast"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only:
        only(a.only, a.steps)
        return
    if a.rss_only:
        setup_threads()
        rss_only(a.warmup + a.rss_steps)
        return
    if a.quick:
        a.warmup, a.steps, a.rss_steps = 1, 1, 1
    setup_threads()
    import transformers
    import trl

    res: dict[str, dict] = {}
    for fast in (False, True):
        name = "TRL fastest" if fast else "TRL default"
        print(f"{name} vs ours, alternating: {a.warmup} warm-up + {a.steps} counted steps each", flush=True)
        o, g, t = alternating(fast, a.warmup, a.steps)
        res[f"ours (vs {name})"], res[f"ours, checkpointing (vs {name})"], res[name] = summary(o), summary(g), summary(t)
    rss = {}
    if not a.no_rss:
        for which, key in (("ours", "ours"), ("ours-gc", "ours, checkpointing"), ("trl-default", "TRL default"),
                           ("trl-fast", "TRL fastest")):
            rss[key] = peak_rss(which, a.warmup + a.rss_steps)
            print(f"peak RSS {key}: {rss[key]:.0f} MB", flush=True)

    def row(key: str, rss_key: str) -> list:
        s = res[key]
        return [key, f"{s['step']:.2f}", f"{s['rollout']:.2f}", f"{s['rest']:.2f}", f"{s['tok_s']:.0f}",
                f"{s['tokens']:.0f}", f"{rss[rss_key]:.0f}" if rss_key in rss else "-"]

    heads = ["run", "median step s", "rollout s", "logprob+update s", "generated tok/s", "tokens/step",
             "peak RSS MB"]
    body = table(heads, [row(f"{o} (vs {t})", o) for t in ("TRL default", "TRL fastest")
                         for o in ("ours", "ours, checkpointing")] + [row(t, t) for t in ("TRL default", "TRL fastest")])
    ratios, verdicts = [], []
    for name, target in (("TRL default", 0.5), ("TRL fastest", 0.8)):
        for ours_key in ("ours", "ours, checkpointing"):
            o, t = res[f"{ours_key} (vs {name})"], res[name]
            r = o["step"] / t["step"]
            rr = rss[ours_key] / rss[name] if rss else float("nan")
            ratios.append([f"{ours_key} / {name}", f"{r:.2f}", f"{o['rollout'] / t['rollout']:.2f}",
                           f"{o['rest'] / t['rest']:.2f}", f"{o['tok_s'] / t['tok_s']:.2f}", f"{rr:.2f}"])
            verdicts.append(f"- {ours_key}: step time <= {target}x {name}: {r:.2f}x -> {mark(r <= target)}")
            if rss:
                verdicts.append(f"- {ours_key}: peak RSS <= {name}: {rr:.2f}x -> {mark(rr <= 1.0)}")
    body += "\nRatios (ours / TRL; step and split times lower is better, tokens/s higher is better):\n\n"
    body += table(["ratio", "step", "rollout", "logprob+update", "generated tok/s", "peak RSS"], ratios)
    body += "\nTargets:\n\n" + "\n".join(verdicts) + "\n"
    same = ", ".join(f"{k}={v!r}" for k, v in TRL_SAME_WORK.items())
    fast_opts = ", ".join(f"{k}={v!r}" for k, v in TRL_FAST.items())
    body += f"""
Setup:

- versions: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; \
{torch.get_num_threads()} threads; counted steps {a.steps} each after {a.warmup} warm-up, alternating TRL, ours, \
ours with checkpointing, TRL, ... in one process (one process per TRL configuration); peak RSS from separate \
processes (one side alone, {a.warmup} warm-up + {a.rss_steps} steps), VmHWM.
- work: bundled SmolLM2-135M-Instruct, two-digit addition, {PROMPTS} prompts x G = {G}, <= {MAX_NEW} new tokens, \
full fine-tuning, fp32, AdamW lr {LR}, clip 1.0, beta 0, the same prompts in the same order, reward = our TaskReward.
- ours: `TextReasoningModule.training_step` as configs/text_reasoning/grpo_arithmetic.yaml (micro-batch {MICRO}; \
lr as TRL's), outside a lightning.Trainer (optimizers / manual_backward / clip_gradients given directly); \
"ours, checkpointing" adds `gradient_checkpointing: true` (every decoder layer recomputed in the backward, the \
shared-prompt KV cache kept).
- TRL, set in both runs for identical work (not speed options): {same}.
- TRL fastest, changed on top of that: {fast_opts} (gradient checkpointing is TRL's default; off recomputes \
nothing; one 32-row micro-batch instead of 4 x 8).
"""
    if a.quick:
        print(body)
    else:
        write_result("grpo_step", "GRPO step: ours vs TRL GRPOTrainer", body)


if __name__ == "__main__":
    main()
