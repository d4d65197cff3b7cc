"""Step-level Direct Advantage Policy Optimization (Skywork, arXiv 2412.18279) on reasoning tasks: offline.

Three stages, each independent of the next (no actor-critic co-training):

1. ``build_step_records``: sample completions of π_ref, score them, split each into steps (lines), and label
   every state s_k = (x, a_1..a_{k−1}) with its rollout's outcome (a one-sample Monte-Carlo estimate).
2. ``fit_step_critic``: a value head V_φ on π_ref's last hidden state of each state, fitted by MSE to the
   outcome labels; then A(s_k, a_k) = V_φ(s_{k+1}) − V_φ(s_k), and r − V_φ(s_k) for the final step.
   The records (prompt, prefix, step, advantage) are written to a jsonl file.
3. ``OfflineStepRecords`` (a method part replacing the training rollout) + ``OfflineStepData``: the policy is
   trained on those records with ``common.losses.step_advantage.DirectAdvantageLoss``:
   (log π(a|s) − log π_ref(a|s) − A/β)², no generation.

    python -m text_reasoning.offline_steps --out configs/text_reasoning/data/dapo_step_arithmetic.jsonl

Readings where the paper's details are not available (shared/methods/text.md §22, marked UNVERIFIED there):
steps are lines ("\\n"-terminated pieces; the paper splits at step delimiters), the critic is a value head on
the frozen reference model (not a separately trained LM), its labels are the rollout's own outcome (one MC
sample per state, not N fresh rollouts from each state), and each state has the one candidate step its rollout
took (several rollouts of a prompt give several candidates for the shared empty-prefix state).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.critic import ValueHead
from common.methods.base import Method
from common.policies.causal_lm import CausalLMPolicy
from common.progress import progress
from text_reasoning.data import ReasoningData
from text_reasoning.module import TextReasoningModule

if TYPE_CHECKING:
    from common.loop import Loop

ROOT = Path(__file__).resolve().parents[1]


def split_steps(completion: str, delimiter: str = "\n") -> list[str]:
    """Steps of a completion: pieces ending with ``delimiter`` (kept, so ``"".join(steps) == completion``), then
    the rest. Runs of delimiters stay with the step before them; an empty completion has no steps."""
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    steps, start = [], 0
    while start < len(completion):
        end = completion.find(delimiter, start)
        if end < 0:
            steps.append(completion[start:])
            break
        end += len(delimiter)
        while completion.startswith(delimiter, end):
            end += len(delimiter)
        steps.append(completion[start:end])
        start = end
    return steps


def state_texts(policy: CausalLMPolicy, samples: Sequence[dict], prefixes: Sequence[str]) -> list[str]:
    """The chat-templated problem (``CausalLMPolicy.prompt_texts``) followed by the steps so far (the state s)."""
    return [text + prefix for text, prefix in zip(policy.prompt_texts(samples), prefixes)]


def step_batch(policy: CausalLMPolicy, records: Sequence[dict]) -> RolloutBatch:
    """One row per (state, step) record: prompt = problem + prefix (left-padded), completion = the step's tokens
    (right-padded; EOS appended to a final step that ended with one). Advantages (B,) and outcome rewards (B,) come
    from the records."""
    tok = policy.tokenizer
    enc = tok(state_texts(policy, records, [r["prefix"] for r in records]), return_tensors="pt", padding=True,
              add_special_tokens=False)
    steps = tok([r["step"] for r in records], add_special_tokens=False)["input_ids"]
    steps = [torch.tensor(ids + ([tok.eos_token_id] if r["terminal"] and r.get("eos", True) else []), dtype=torch.long)
             for ids, r in zip(steps, records)]  # ok: host-side tokenisation of the offline records
    completion = torch.nn.utils.rnn.pad_sequence(steps, batch_first=True, padding_value=tok.pad_token_id)  # (B, T)
    lengths = torch.tensor([len(s) for s in steps])
    mask = torch.arange(completion.shape[1])[None, :] < lengths[:, None]  # (B, T)
    B = len(records)
    return RolloutBatch(
        prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"].bool(), completion_ids=completion,
        completion_mask=mask, group_ids=torch.arange(B), rewards=torch.tensor([float(r["reward"]) for r in records]),
        advantages=torch.tensor([float(r["advantage"]) for r in records]), samples=[dict(r) for r in records],
        completions=[r["step"] for r in records],
    ).to(policy.device)


class OfflineStepRecords(Method):
    """Trains on offline (state, step, advantage) records instead of sampling: the training rollout turns the data
    batch of records into rows (:func:`step_batch`) with rewards and advantages already set, so the loop neither
    scores nor estimates them; it still adds the reference log-probs, and the update (step 6) and logging are the
    shared ones. Validation still generates (greedy accuracy on held-out problems). Use with
    ``DirectAdvantageLoss`` and ``OfflineStepData``; the loop's ``group_size`` is unused (each record is one row).
    """

    def setup(self, loop: "Loop") -> None:
        if not isinstance(loop.policy, CausalLMPolicy):
            raise ValueError(f"OfflineStepRecords tokenises text steps for a CausalLMPolicy, got {type(loop.policy).__name__}")

    def rollout(self, loop: "Loop", records: Sequence[dict], n: int) -> RolloutBatch:
        if not records or "advantage" not in records[0]:
            raise ValueError("OfflineStepRecords trains on offline step records (prompt, prefix, step, terminal, "
                             "advantage, reward); use text_reasoning.offline_steps.OfflineStepData")
        return step_batch(loop.policy, records)


class OfflineStepData(ReasoningData):
    """Training rows from a jsonl of step records (``build_step_records`` + ``fit_step_critic``), validation
    problems from ``tasks`` as in :class:`ReasoningData` (records whose prompt is a validation problem are dropped).

    Args:
        path: the jsonl file; a relative path is looked up in the working directory, then in the repository.
        train_size: at most this many records (the first ones), None = all.
        prompts_per_step: records (steps) per training batch.
        **kwargs: ``tasks``, ``val_size``, ``val_batch_size``, ``seed`` of :class:`ReasoningData`.
    """

    def __init__(self, path: str, train_size: int | None = None, prompts_per_step: int = 16, **kwargs: Any):
        super().__init__(train_size=0, prompts_per_step=prompts_per_step, **kwargs)
        self.path, self.max_records = path, train_size

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        super().setup(stage)
        path = Path(self.path)
        if not path.exists() and (ROOT / path).exists():
            path = ROOT / path
        if not path.exists():
            raise ValueError(f"path {self.path!r} does not exist; build it with `python -m text_reasoning.offline_steps`")
        held_out = {s["prompt"] for s in self.val_set}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r["prompt"] not in held_out][: self.max_records]
        if not records:
            raise ValueError(f"path {self.path!r} holds no training records outside the validation problems")
        self.train_set, self.train_sources = records, [0] * len(records)


# ---------------------------------------------------------------------------------------------- building the data
@torch.no_grad()
def state_features(module: TextReasoningModule, samples: Sequence[dict], prefixes: Sequence[str], batch_size: int = 32) -> Tensor:
    """π_ref's last-layer hidden state at the last token of each state text. Shapes: -> (N, H)."""
    out = []
    policy = module.policy
    decoder = policy.model.get_decoder()
    for start in range(0, len(samples), batch_size):
        enc = policy.tokenizer(state_texts(policy, samples[start:start + batch_size], prefixes[start:start + batch_size]),
                               return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        h = decoder(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos).last_hidden_state  # (b, P, H)
        out.append(h[:, -1])  # left padding: the last position is the last token
    return torch.cat(out)


def build_step_records(module: TextReasoningModule, problems: Sequence[dict], samples_per_prompt: int,
                       delimiter: str = "\n", batch_prompts: int = 4) -> list[dict]:
    """Stage 1: rollouts of the module's policy (π_ref), scored and split into steps; one record per step with
    its state prefix, whether it is the last step, and the rollout's outcome reward (the state's MC label)."""
    records = []
    for start in progress(range(0, len(problems), batch_prompts), "offline_steps: rollouts, prompt batches"):
        chunk = problems[start:start + batch_prompts]
        rollouts = module.score(module.policy.rollout(chunk, samples_per_prompt))
        for text, sample, reward, cut in zip(rollouts.completions, rollouts.samples, rollouts.rewards.tolist(),
                                             rollouts.truncated.tolist()):
            steps = split_steps(text, delimiter)
            for k, step in enumerate(steps):
                records.append({"prompt": sample["prompt"], "answer": sample["answer"], "task": sample["task"],
                                "prefix": "".join(steps[:k]), "step": step, "terminal": k == len(steps) - 1,
                                "eos": not cut, "reward": reward})
    return records


def fit_step_critic(module: TextReasoningModule, records: list[dict], *, hidden: int = 0, steps: int = 300,
                    lr: float = 1e-2, seed: int = 0) -> tuple[ValueHead, list[dict]]:
    """Stage 2: fit V_φ(s) to the outcome labels by MSE (full batch, Adam) and write the step advantages
    A = V(s ⊕ a) − V(s), or r − V(s) for a final step, into copies of the records."""
    feats = state_features(module, records, [r["prefix"] for r in records])  # (N, H) V(s_k) inputs
    nxt = state_features(module, records, [r["prefix"] + r["step"] for r in records])  # (N, H) V(s_k ⊕ a_k)
    labels = torch.tensor([float(r["reward"]) for r in records])  # (N,)
    terminal = torch.tensor([bool(r["terminal"]) for r in records])  # (N,)
    torch.manual_seed(seed)
    critic = ValueHead(feats.shape[1], hidden)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    for _ in progress(range(steps), "offline_steps: fitting the step critic, steps"):
        opt.zero_grad()
        loss = 0.5 * (critic(feats) - labels).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        v, v_next = critic(feats), critic(nxt)
        adv = torch.where(terminal, labels - v, v_next - v)  # (N,)
    return critic, [{**r, "value": float(a), "advantage": float(b)} for r, a, b in zip(records, v.tolist(), adv.tolist())]


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from common.models import BundledSmolLM2, TinyLlama
    from common.rollout.base import Sampling
    from text_reasoning.data import Arithmetic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="configs/text_reasoning/data/dapo_step_arithmetic.jsonl")
    p.add_argument("--policy", choices=["bundled", "tiny"], default="bundled")
    p.add_argument("--problems", type=int, default=8)  # 8 x 4 rollouts: ~10 min of SmolLM2 on a busy 2-core CPU
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--digits", type=int, default=1)  # two-digit sums: 0 of 32 rollouts correct (SmolLM2-135M)
    p.add_argument("--val-size", type=int, default=40)  # the recipe's held-out problems, kept out of the records
    p.add_argument("--temperature", type=float, default=0.7)  # 1.0 solved 0 of 32 two-digit sums within 40 tokens
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    module = TextReasoningModule(policy=BundledSmolLM2() if args.policy == "bundled" else TinyLlama(),
                                 sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
                                 log_samples_every=0)
    data = ReasoningData(tasks=[Arithmetic(digits=args.digits, ops="+")], train_size=args.problems, val_size=args.val_size,
                         seed=args.seed)  # the recipe's validation problems are held out of the records
    data.setup()
    records = build_step_records(module, data.train_set, args.samples)
    _, records = fit_step_critic(module, records, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    solved = sum(r["reward"] > 0.5 for r in records if r["terminal"])
    print(f"{len(records)} step records from {args.problems} x {args.samples} rollouts ({solved} correct) -> {out}")


if __name__ == "__main__":
    main()
