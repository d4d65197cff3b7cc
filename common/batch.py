"""RolloutBatch: the one data structure between rollout and update.

One row per sampled sequence (``B`` = prompts x G). The row's *actions* are ``completion_ids`` (B, T, ...):
token ids (B, T) for language models, denoising transitions or continuous actions (B, T, D) for other policies;
``completion_mask`` (B, T) marks the actions that count. For language models prompts are left-padded and
completions right-padded, so ``cat([prompt_ids, completion_ids], 1)`` is the model input and the completion
occupies the last ``T`` positions; other policies leave ``prompt_ids`` None and carry their observations in
``inputs`` (a per-row payload: pixel values, latents, frame features, bandit contexts).

Per-row data that components exchange are declared, typed fields below, never string keys in ``samples``
(which holds the data module's own records, for rewards and logging). A component that reads an optional
field lists it in its ``requires``; :func:`check_requirements` verifies once, at start-up, that something in
the pipeline ``provides`` it.

Multi-turn episodes (shared/methods/agentic.md §1, layout B: one sequence per episode) use ``episode_ids``,
``turn_ids``, ``token_turn`` (the token -> turn map) and ``env_mask`` (tokens written by the environment or a
tool, which never count in the loss); the sequence-level fields stay as they are, so sequence-level estimators
keep working on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# How RolloutBatch.cat widens 2-D+ fields of different widths: prompts are left-padded, time-aligned fields
# right-padded along dim 1; every other field must have the same trailing shape in every batch.
PROMPT_ALIGNED = frozenset({"prompt_ids", "prompt_mask", "teacher_prompt_ids", "teacher_prompt_mask"})
TIME_ALIGNED = frozenset({"completion_ids", "completion_mask", "behaviour_logprobs", "old_logprobs", "ref_logprobs",
                          "advantages", "values", "entropy", "token_turn", "env_mask", "segment_starts",
                          "prefix_values", "hint_mask", "hint_keep", "process_rewards",
                          "turn_rewards", "turn_keys", "turn_mask", "turn_valid", "turn_drift",
                          "turn_matched", "turn_kinds"})  # (B, K) turn columns too
# Time-aligned fields whose dim 1 is the completion's T columns (not the (B, K) per-turn tables): what
# RolloutBatch.trim_completion cuts.
TOKEN_COLUMNS = TIME_ALIGNED - {"turn_rewards", "turn_keys", "turn_mask", "turn_valid", "turn_drift", "turn_matched",
                                "turn_kinds", "process_rewards"}
# Fields every rollout has once the loop has run steps 1-4; components need not declare them.
ALWAYS = frozenset({"completion_ids", "completion_mask", "group_ids", "rewards", "reward_components", "advantages",
                    "samples", "completions", "reward_names", "inputs"})


@dataclass
class RolloutBatch:
    completion_ids: Tensor  # (B, T) long tokens, or (B, T, ...) actions of a non-LM policy; right-padded
    completion_mask: Tensor  # (B, T) bool: valid actions (tokens up to and including EOS)
    group_ids: Tensor  # (B,) long in [0, num_groups)
    prompt_ids: Tensor | None = None  # (B, P) long, left-padded (language models)
    prompt_mask: Tensor | None = None  # (B, P) bool
    inputs: dict[str, Tensor] = field(default_factory=dict)  # per-row modality payload, each (B, ...)
    seeds: Tensor | None = None  # (B,) long: the row's randomness for log-prob estimators (mask seeds, noise)
    behaviour_logprobs: Tensor | None = None  # (B, T) log-probs from the sampler (HF generate / vLLM)
    old_logprobs: Tensor | None = None  # (B, T) log π_old, the policy before this update ((B, T, μ) per epoch)
    ref_logprobs: Tensor | None = None  # (B, T) log π_ref
    rewards: Tensor | None = None  # (B,) float
    reward_components: Tensor | None = None  # (B, K) unweighted components
    reward_names: tuple[str, ...] = ()  # (K,)
    advantages: Tensor | None = None  # (B,) or (B, T)
    values: Tensor | None = None  # (B, T) V(s_t) of a critic, 0 off the mask
    entropy: Tensor | None = None  # (B, T) token entropies under π_old, set by the update (for after_update hooks)
    truncated: Tensor | None = None  # (B,) bool: hit the token budget without EOS
    correct: Tensor | None = None  # (B,) bool: the task's verifier accepted the answer (for accuracy)
    # declared per-row fields of methods and domains (None unless a part provides them)
    prompt_uid: Tensor | None = None  # (B,) long: the training prompt's index in its data set (SPO tracker)
    distribution: Tensor | None = None  # (B,) long: the prompt's task source (DUMP curriculum)
    hint_len: Tensor | None = None  # (B,) long: leading completion tokens forced from a hint (ADHint), 0 = none
    hint_mask: Tensor | None = None  # (B, T) bool: completion positions fixed by an inpainted hint (IGPO)
    hint_keep: Tensor | None = None  # (B, T) bool: positions that get gradient after IGPO's entropy filter on hints
    window: Tensor | None = None  # (B,) long: generation windows the response has used (T-PPO), 1 = fresh
    preference_score: Tensor | None = None  # (B,) float: label of an offline candidate (DPO / ADPO)
    phase_starts: Tensor | None = None  # (B, K) long: token where each phase of the completion starts (F-GRPO)
    segment_starts: Tensor | None = None  # (B, T) bool: tokens that start a segment, cut points after y_<s (SPO-chain)
    prefix_values: Tensor | None = None  # (B, T) float: Monte-Carlo V̂(y_<s) at the segment starts, 0 elsewhere (SPO-chain)
    teacher_prompt_ids: Tensor | None = None  # (B, P') long, left-padded: the self-teacher's context (SDPO / SRPO)
    teacher_prompt_mask: Tensor | None = None  # (B, P') bool
    has_teacher: Tensor | None = None  # (B,) bool: the row has a teacher context
    episode_ids: Tensor | None = None  # (B,) long: the episode a sequence belongs to (agentic.md §1)
    turn_ids: Tensor | None = None  # (B,) long: the first turn of the sequence within its episode
    token_turn: Tensor | None = None  # (B, T) long: the turn each token belongs to (−1 off the mask)
    env_mask: Tensor | None = None  # (B, T) bool: tokens written by the environment or a tool (never trained on)
    end_reason: Tensor | None = None  # (B,) long: why the episode ended, an index into common.rollout.env.END_REASONS
    num_turns: Tensor | None = None  # (B,) long: assistant turns the episode took
    # per-turn table of multi-turn agents: column k of row b is turn turn_ids[b] + k of episode episode_ids[b]
    # (K = the most turns a row holds: 1 in layout A, one row per turn; max_turns in layout B, one row per episode)
    turn_rewards: Tensor | None = None  # (B, K) float: immediate reward r_t (an episode's sum is its return)
    turn_keys: Tensor | None = None  # (B, K) long: 63-bit hash of the observation the turn acted on (GiGPO anchor), −1 none
    turn_mask: Tensor | None = None  # (B, K) bool: the column is a turn of the row
    turn_valid: Tensor | None = None  # (B, K) bool: the turn's action parsed (False: parse error / invalid action)
    turn_drift: Tensor | None = None  # (B, K) bool: re-rendering the history through the chat template before this turn
    #                                   gives other tokens than the sampled context (re-tokenisation drift, reported)
    turn_matched: Tensor | None = None  # (B, K) bool: the turn's action matched the expert's (UI-S1 semi-online returns)
    turn_kinds: Tensor | None = None  # (B, K) long: decision type of the turn (ToMPO / HRPO normalisation scopes; 0 default)
    process_rewards: Tensor | None = None  # (B, K) float: per-turn process reward of the row's turns k = 0..K-1 (iStar's implicit PRM), 0 past them
    zigzag: Tensor | None = None  # (B,) bool: the row's first transition starts from a zigzag (ZMV) state (MVC-ZigAL); rows in (S, Z) pairs
    samples: list[dict[str, Any]] = field(default_factory=list)  # (B,) the data module's records (prompt, answer, ...)
    completions: list[str] = field(default_factory=list)  # (B,) decoded text, for rewards and logging

    def __post_init__(self) -> None:
        B = self.completion_ids.shape[0] if torch.is_tensor(self.completion_ids) else None
        for name in ("completion_ids", "completion_mask", "group_ids"):
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.shape[0] != B:
                raise ValueError(f"RolloutBatch.{name} must be a tensor with B={B} rows, got {getattr(t, 'shape', t)}")
        if self.completion_mask.shape != self.completion_ids.shape[:2]:
            raise ValueError(
                f"RolloutBatch.completion_mask {tuple(self.completion_mask.shape)} must match the first two dims of "
                f"completion_ids {tuple(self.completion_ids.shape)}"
            )
        if (self.prompt_ids is None) != (self.prompt_mask is None):
            raise ValueError("RolloutBatch.prompt_ids and prompt_mask must be given together")
        if self.prompt_ids is not None and self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(
                f"RolloutBatch.prompt_mask {tuple(self.prompt_mask.shape)} must match prompt_ids {tuple(self.prompt_ids.shape)}"
            )
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] != B:
                raise ValueError(f"RolloutBatch.{f.name} must have B={B} rows, got shape {tuple(v.shape)}")
        for k, v in self.inputs.items():
            if not torch.is_tensor(v) or v.shape[0] != B:
                raise ValueError(f"RolloutBatch.inputs[{k!r}] must be a tensor with B={B} rows, got {getattr(v, 'shape', v)}")
        for name in ("samples", "completions"):
            seq = getattr(self, name)
            if seq and len(seq) != B:
                raise ValueError(f"RolloutBatch.{name} must have B={B} entries, got {len(seq)}")

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def actions(self) -> Tensor:  # (B, T, ...) the policy's actions (token ids for language models)
        return self.completion_ids

    @property
    def action_mask(self) -> Tensor:  # (B, T)
        return self.completion_mask

    @property
    def input_ids(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> Tensor:  # (B,) completion lengths L_i
        return self.completion_mask.sum(1)

    @property
    def loss_mask(self) -> Tensor:  # (B, T) actions that count in the loss: valid and not written by the environment
        return self.completion_mask if self.env_mask is None else self.completion_mask & ~self.env_mask

    def _map(self, fn_tensor, fn_list) -> "RolloutBatch":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                out[f.name] = fn_tensor(v)
            elif isinstance(v, list):
                out[f.name] = fn_list(v)
            elif f.name == "inputs":
                out[f.name] = {k: fn_tensor(t) for k, t in v.items()}
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def select(self, index: Tensor) -> "RolloutBatch":
        """Rows ``index`` (a LongTensor of row numbers or a BoolTensor (B,)). Group ids are kept as they are."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        rows = index.tolist()
        return self._map(lambda t: t[index.to(t.device)] if t.dim() else t,
                         lambda seq: [seq[i] for i in rows] if seq else seq)

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive minibatches of at most ``size`` rows."""
        if size <= 0:
            raise ValueError(f"split size must be a positive integer, got {size}")
        return [self.select(torch.arange(s, min(s + size, self.batch_size))) for s in range(0, self.batch_size, size)]

    def trim_completion(self, width: int) -> "RolloutBatch":
        """The first ``width`` completion columns of every token-aligned field (``TOKEN_COLUMNS``): drops right
        padding that no row of this batch uses. Exact for a causal policy: a later column never changes an
        earlier one. Shapes: (B, T, ...) -> (B, width, ...)."""
        if width >= self.completion_ids.shape[1]:
            return self
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in TOKEN_COLUMNS:
            v = out[name]
            if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == self.completion_ids.shape[1]:
                out[name] = v[:, :width]
        return RolloutBatch(**out)

    def completion_widths(self) -> Tensor:
        """(B,) long: last valid completion column + 1 of each row (its length when right-padded)."""
        cols = torch.arange(1, self.completion_mask.shape[1] + 1, device=self.completion_mask.device)  # (T,)
        return (self.completion_mask.long() * cols).amax(1) if self.completion_mask.shape[1] else cols.new_zeros(self.batch_size)

    def split_tokens(self, budget: int) -> list["RolloutBatch"]:
        """Consecutive micro-batches of whole rows whose padded size, rows x (prompt width + longest completion
        among them), stays within ``budget`` tokens (a row longer than the budget goes alone), each trimmed to
        its longest completion (:meth:`trim_completion`): with mixed lengths, short rows share a forward and
        no forward runs over columns that only padding fills (verl's dynamic batch size, token-budget form).
        Rows keep their order, so outputs concatenate back in rollout order."""
        if budget <= 0:
            raise ValueError(f"micro-batch token budget must be a positive integer, got {budget}")
        if self.batch_size == 0:
            return []
        used = self.completion_widths().tolist()  # (B,)
        B = self.batch_size
        prompt = 0 if self.prompt_ids is None else self.prompt_ids.shape[1]
        pieces, start, widest = [], 0, 0
        for i, w in enumerate(used):  # ok: one pass over B ints to place the cuts, no tensor work per row
            wider = max(widest, w)
            if i > start and (i - start + 1) * (prompt + wider) > budget:
                pieces.append((start, i, widest))
                start, wider = i, w
            widest = wider
        pieces.append((start, B, widest))
        return [self.select(torch.arange(s, e)).trim_completion(max(w, 1)) for s, e, w in pieces]

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return self._map(lambda t: t.to(device), lambda seq: seq)

    @property
    def num_groups(self) -> Tensor:  # () number of distinct group ids
        return torch.unique(self.group_ids).numel()

    @staticmethod
    def cat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Rows of several batches; group ids of each later batch are offset so groups never merge. Prompt-aligned
        fields are left-padded and time-aligned fields right-padded (along dim 1) to the widest batch; a field
        must be set in all batches or in none."""
        if len(batches) == 1:
            return batches[0]
        out: dict[str, Any] = {}
        offset, gids = 0, []
        for b in batches:
            gids.append(b.group_ids + offset)
            offset += int(b.group_ids.max()) + 1 if b.batch_size else 0
        for f in dataclasses.fields(RolloutBatch):
            vals = [getattr(b, f.name) for b in batches]
            if f.name == "group_ids":
                out[f.name] = torch.cat(gids)
            elif f.name == "inputs":
                keys = set(vals[0])
                if any(set(v) != keys for v in vals):
                    raise ValueError("RolloutBatch.cat: the batches' inputs have different keys")
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
            elif all(torch.is_tensor(v) for v in vals):
                if f.name in PROMPT_ALIGNED or f.name in TIME_ALIGNED:
                    width = max(v.shape[1] for v in vals) if vals[0].dim() > 1 else None
                    if width is not None:
                        pad = (lambda v: (width - v.shape[1], 0)) if f.name in PROMPT_ALIGNED else (lambda v: (0, width - v.shape[1]))
                        vals = [torch.nn.functional.pad(v.movedim(1, -1), pad(v)).movedim(-1, 1) for v in vals]
                out[f.name] = torch.cat(vals)
            elif all(v is None for v in vals) or f.name == "reward_names":
                out[f.name] = vals[0]
            elif all(isinstance(v, list) for v in vals):
                out[f.name] = [x for v in vals for x in v]
            else:
                raise ValueError(f"RolloutBatch.cat: field {f.name} is set in some batches and not in others")
        return RolloutBatch(**out)

    def state_dict(self) -> dict[str, Any]:
        """The rows as tensors and plain lists (what a checkpoint loaded with ``weights_only=True`` can hold), for
        buffers that keep rollouts across steps; :meth:`from_state` rebuilds them."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not (f.name == "inputs" and not v):
                out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out

    @staticmethod
    def from_state(state: dict[str, Any]) -> "RolloutBatch | None":
        """Inverse of :meth:`state_dict` (None for an empty state)."""
        if not state:
            return None
        rows = dict(state)
        if "reward_names" in rows:
            rows["reward_names"] = tuple(rows["reward_names"])
        return RolloutBatch(**rows)

    def replace(self, **changes: Any) -> "RolloutBatch":
        return dataclasses.replace(self, **changes)

    def require(self, owner: str, *names: str) -> None:
        """Raise unless every field in ``names`` is set (a run-time guard; start-up checks use check_requirements)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{owner} needs RolloutBatch fields {missing}, which this batch does not carry")


FIELDS = frozenset(f.name for f in dataclasses.fields(RolloutBatch))


def requirements(part: Any) -> tuple[str, ...]:
    """The RolloutBatch fields ``part`` declares it reads (its ``requires`` attribute, default none)."""
    return tuple(getattr(part, "requires", ()))


def check_requirements(parts: Iterable[Any], provided: Iterable[str]) -> None:
    """Start-up check: every field a part ``requires`` is always there or ``provided`` by the policy, the domain
    or another part. Raises one ValueError naming each part and the field it lacks."""
    have = ALWAYS | set(provided)
    problems = []
    for part in parts:
        if part is None:
            continue
        for name in requirements(part):
            if name not in FIELDS:
                problems.append(f"{type(part).__name__} requires {name!r}, which is not a RolloutBatch field")
            elif name not in have:
                problems.append(f"{type(part).__name__} requires RolloutBatch.{name}, which nothing in this run provides "
                                f"(provided: {sorted(set(provided))})")
    if problems:
        raise ValueError("; ".join(problems))
