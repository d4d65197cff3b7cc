"""The MedScope tool environment (shared/methods/domains.md §5 (b)): coarse view first, then JSON tool calls.

An episode is one question about one synthetic video (``multimodal.medscope.video``). The first observation is the
instruction, the coarse view and the question; each assistant turn either calls a tool, in the chat templates'
function-calling format (as ``text_reasoning/envs/calculator.py``'s ``protocol="json"``)

    <tool_call>{"name": "crop_video", "arguments": {"start_time": 40, "end_time": 56}}</tool_call>
    <tool_call>{"name": "get_frame", "arguments": {"time": 47}}</tool_call>

(the flat form ``{"name": "crop_video", "start_time": 40, "end_time": 56}`` of the paper's trajectories is accepted
too), or answers with ``<answer>colour</answer>``, which ends the episode. ``crop_video`` returns the 8 uniformly
spaced frames of the window, ``get_frame`` the three frames nearest t: their *cost* is real, the frames are added to
the context (as text rows, or as one rendered image per call with ``render="image"`` for the VLM agent, which reads
them from ``images``). At most ``max_tool_calls`` calls are answered; a later call is refused with an observation
(the episode goes on; it is not a crash and not a parse error).

Rewards are ordinary reward functions over the episode's text (the tool calls in it are parsed again, bounded):
``0.5·accuracy + 0.3·grounding + 0.2·format`` (README weights; the format weight is implied [UNVERIFIED]), with
grounding = the max tIoU of the answered tool windows against ``[s*, e*]`` (get_frame = a window of width 0: 1
inside). Model output is hostile input: every text is cut to a bound before ``str.find`` / ``json.loads`` sees it;
nothing is evaluated.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from common.batch import RolloutBatch
from common.methods.base import Method
from common.rewards.base import RewardFunction
from common.rollout.env import JSON_CLOSE, JSON_OPEN, MAX_ACTION_CHARS, Environment, Step
from multimodal.medscope import video as V
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

TOOLS = ("crop_video", "get_frame")
MAX_BODY_CHARS = 160  # a tool call's JSON body
MAX_SCANNED_CALLS = 16  # tool calls a reward reads in one completion
MAX_COMPLETION_CHARS = 16_384  # a completion is cut to its last this many characters before parsing
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
WEIGHTS = {"accuracy": 0.5, "grounding": 0.3, "format": 0.2}  # shared/methods/domains.md §5 (b)

INSTRUCTION = (
    "You watch a long surgical video (times in seconds, 0-127). Below is a coarse view; the instrument colour is "
    "only visible at full resolution. Tools:\n"
    '<tool_call>{"name": "crop_video", "arguments": {"start_time": S, "end_time": E}}</tool_call> returns 8 frames '
    "of [S, E];\n"
    '<tool_call>{"name": "get_frame", "arguments": {"time": T}}</tool_call> returns the frames nearest T.\n'
    "Answer with <answer>COLOUR</answer> (one of " + ", ".join(V.COLOURS) + ").\n")


def parse_call(body: str) -> tuple[str, tuple[float, float]] | str:
    """One tool call's JSON body -> (name, window) or an error message. The window is (start, end) for crop_video
    (swapped if reversed) and (t, t) for get_frame. Bounded: the body is refused beyond MAX_BODY_CHARS."""
    body = body.strip()
    if len(body) > MAX_BODY_CHARS:
        return f"tool call longer than {MAX_BODY_CHARS} characters"
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return "the tool call is not valid JSON"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'a tool call is {"name": "...", "arguments": {...}}'
    name = call["name"].strip()
    args = call.get("arguments", {k: v for k, v in call.items() if k != "name"})
    if name not in TOOLS:
        return f"unknown tool (tools: {', '.join(TOOLS)})"
    if not isinstance(args, dict):
        return "arguments must be an object"
    keys = ("start_time", "end_time") if name == "crop_video" else ("time",)
    values = []
    for k in keys:
        v = args.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return f"{name} needs a number {k!r}"
        values.append(float(v))
    if name == "crop_video":
        return name, (min(values), max(values))
    return name, (values[0], values[0])


def tool_calls(text: str, limit: int = MAX_SCANNED_CALLS) -> list[tuple[str, tuple[float, float]] | str]:
    """Every ``<tool_call>...</tool_call>`` of a text in order (at most ``limit``), each parsed by :func:`parse_call`
    (an unclosed tag is an error entry). Bounded: the text is cut to its last MAX_COMPLETION_CHARS characters."""
    text = text[-MAX_COMPLETION_CHARS:]
    out, pos = [], 0
    while len(out) < limit:
        start = text.find(JSON_OPEN, pos)
        if start < 0:
            break
        end = text.find(JSON_CLOSE, start)
        if end < 0:
            out.append(f"unclosed {JSON_OPEN} tag")
            break
        out.append(parse_call(text[start + len(JSON_OPEN): end]))
        pos = end + len(JSON_CLOSE)
    return out


def final_answer(text: str) -> str | None:
    """The lower-cased content of the last ``<answer>...</answer>`` (at most 32 characters), else None."""
    text = text[-MAX_COMPLETION_CHARS:]
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    end = text.find(ANSWER_CLOSE, start)
    if end < 0 or end - start - len(ANSWER_OPEN) > 32:
        return None
    return text[start + len(ANSWER_OPEN): end].strip().lower()


def episode_record(completion: str, sample: Mapping[str, Any], max_tool_calls: int) -> dict[str, Any]:
    """What an episode did, from its sample (a policy that records it: ``sample["episode"]``) or its text: the
    answered tool windows, the number of tool calls, frames read through tools, the predicted answer and whether
    the format holds (every call parsed, at most ``max_tool_calls``, one final answer among the colours)."""
    if isinstance(sample.get("episode"), Mapping):
        return dict(sample["episode"])
    calls = tool_calls(completion, limit=max(max_tool_calls, 1) + 4)
    ok = [c for c in calls if not isinstance(c, str)]
    answered = ok[:max_tool_calls]
    answer = final_answer(completion)
    frames = sum(V.CROP_FRAMES if name == "crop_video" else V.NEAREST_FRAMES for name, _ in answered)
    fmt = len(ok) == len(calls) and len(calls) <= max_tool_calls and answer in V.COLOURS
    return {"windows": [w for _, w in answered], "tool_calls": len(calls), "frames_read": frames,
            "prediction": answer, "format": bool(fmt)}


def evidence(sample: Mapping[str, Any]) -> tuple[float, float]:
    try:
        return float(sample["evidence_start"]), float(sample["evidence_end"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("MedScope rewards: a sample needs 'evidence_start' and 'evidence_end' (seconds; "
                         f"MedScopeTasks writes them), got keys {sorted(sample)[:8]}") from err


class MedScopeReward(RewardFunction):
    """One component of the MedScope reward over episodes (module docstring): ``part`` is "accuracy" (the answer
    is the sample's), "grounding" (max tIoU of the answered tool windows with [s*, e*]) or "format".

    Args:
        part: which component.
        max_tool_calls: the environment's cap (calls beyond it were refused and count for nothing).
    """

    def __init__(self, part: Literal["accuracy", "grounding", "format"] = "accuracy", max_tool_calls: int = 3):
        if part not in WEIGHTS:
            raise ValueError(f"part must be one of {sorted(WEIGHTS)}, got {part!r}")
        if not isinstance(max_tool_calls, int) or max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be a non-negative integer, got {max_tool_calls!r}")
        self.part, self.max_tool_calls, self.name = part, max_tool_calls, part

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        out = []
        for text, s in zip(completions, samples):  # ok: host-side parsing of B texts
            rec = episode_record(str(text), s, self.max_tool_calls)
            if self.part == "accuracy":
                out.append(float(rec["prediction"] == str(s["answer"]).lower()))
            elif self.part == "format":
                out.append(float(rec["format"]))
            else:
                out.append(V.best_tiou(rec["windows"], evidence(s)))
        return torch.tensor(out, dtype=torch.float32)


def describe(features: Tensor, frames: Sequence[int], colour: bool) -> str:
    """Frames as text rows ``t=40 phase=0.21 colour=red`` (colour only at full resolution: the strongest channel
    above 0.5, else ``none``)."""
    rows = []
    for f in frames:  # ok: at most 16 frames
        v = features[f]
        row = f"t={f} phase={float(v[V.PHASE_DIM]):.2f}"
        if colour:
            c = int(v[: V.NUM_COLOURS].argmax())
            row += f" colour={V.COLOURS[c] if float(v[c]) > 0.5 else 'none'}"
        rows.append(row)
    return "; ".join(rows)


class MedScopeEnv(Environment):
    """The tool environment of one question (module docstring).

    Args:
        max_tool_calls: calls answered per episode; later ones are refused with an observation.
        render: "text" (frames as text rows) or "image" (one rendered sheet per observation: a marker naming the
            frames and ``image_tokens`` ``<image>`` placeholders, which ``multimodal.medscope.vlm_agent`` re-renders and
            splices; the uint8 images are kept in ``self.images`` in order, the first is the coarse view).
        image_size: side of a rendered sheet (the VLM's vision tower's image_size).
        image_tokens: placeholders per tool image (the VLM's features per image: (image_size / patch_size)²).
        instruction: text before the coarse view (default: the tool protocol).
    """

    stop_strings = (JSON_CLOSE,)

    def __init__(self, max_tool_calls: int = 3, render: Literal["text", "image"] = "text", image_size: int = 32,
                 image_tokens: int = 16, instruction: str | None = None):
        if not isinstance(max_tool_calls, int) or max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be a non-negative integer, got {max_tool_calls!r}")
        if render not in ("text", "image"):
            raise ValueError(f"render must be 'text' or 'image', got {render!r}")
        if not isinstance(image_size, int) or image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size!r}")
        if not isinstance(image_tokens, int) or image_tokens < 1:
            raise ValueError(f"image_tokens must be a positive integer (the VLM's features per image), got {image_tokens!r}")
        self.max_tool_calls, self.render, self.image_size, self.image_tokens = max_tool_calls, render, image_size, image_tokens
        self.instruction = INSTRUCTION if instruction is None else instruction
        self.features: Tensor | None = None
        self.calls, self.frames_read = 0, 0
        self.windows: list[tuple[float, float]] = []
        self.images: list[Tensor] = []

    def _frames(self, frames: Sequence[int], colour: bool) -> str:
        if self.render == "image":  # a marker the VLM agent re-renders the sheet from, then the placeholders
            feats = self.features if colour else V.coarse_view(self.features[None])[0]
            index = list(frames) if colour else list(range(len(frames)))
            self.images.append(V.render_sheet(feats, index, self.image_size))
            if not colour:  # the prompt's one <image>, widened by the policy's encode
                return "<image>"
            return f"frames {','.join(str(f) for f in frames)}: " + "<image>" * self.image_tokens
        return describe(self.features, frames, colour)

    def reset(self, task: Mapping[str, Any]) -> str:
        seed = int(task["video_seed"])
        video = V.make_video(seed)
        self.features, self.calls, self.frames_read, self.windows, self.images = video["features"], 0, 0, [], []
        coarse = self._frames(V.coarse_frames().tolist(), colour=False)
        return (f"{self.instruction}Video {seed}. Coarse view: {coarse}\n"
                f"Question: {task.get('question', 'Which instrument colour?')}")

    def step(self, action: str) -> Step:
        text = str(action)[-MAX_ACTION_CHARS:]
        start = text.rfind(JSON_OPEN)
        if start < 0:  # no tool call: the final answer ends the episode (rewards read the text)
            return Step("", 0.0, True, final_answer(text) is not None)
        end = text.find(JSON_CLOSE, start)
        call = parse_call(text[start + len(JSON_OPEN): end]) if end >= 0 else f"unclosed {JSON_OPEN} tag"
        if isinstance(call, str):
            return Step(f"<result>error: {call}</result>", 0.0, False, False)
        self.calls += 1
        if self.calls > self.max_tool_calls:
            return Step(f"<result>refused: at most {self.max_tool_calls} tool calls; answer now</result>", 0.0, False)
        name, (s, e) = call
        frames = V.crop_frames(s, e) if name == "crop_video" else V.nearest_frames(s)
        self.windows.append((s, e))
        self.frames_read += len(frames)
        return Step(f"<result>{self._frames(frames, colour=True)}</result>", 0.0, False)

    def state_text(self, observation: str) -> str:
        return f"calls={self.calls} windows={self.windows}"


class MedScopeTasks(TaskSource):
    """Generated questions, one per video: prompt "Which colour is the instrument in video N during the marked phase?",
    answer the colour, meta ``video_seed``, ``evidence_start`` / ``evidence_end`` (seconds, the event window), ``question``."""

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, out = random.Random(seed), []
        for _ in range(n):
            vs = rng.randrange(2**31)
            v = V.make_video(vs)
            q = f"Which colour is the instrument in video {vs} during the marked phase?"  # unique: prompt-disjoint splits
            out.append(Problem(q, v["answer"], "medscope", v["end"] - v["start"] + 1,
                               {"video_seed": vs, "evidence_start": v["start"], "evidence_end": v["end"], "question": q}))
        return out


class MedScopeStats(Method):
    """Logs, per training step, what the episodes did: ``tool_calls`` (per episode), ``frames_read`` (through tools),
    ``miou`` (mean over episodes of the best tool-window tIoU; 0 for an episode without a call), ``r_at_0.5``
    (fraction of episodes whose best window has tIoU >= 0.5), ``answer_accuracy``. Reads the episodes from the
    batch's completions and samples (:func:`episode_record`); changes nothing.

    Args:
        max_tool_calls: the environment's cap.
    """

    def __init__(self, max_tool_calls: int = 3):
        super().__init__()
        self.max_tool_calls = max_tool_calls

    def after_update(self, loop, batch: RolloutBatch) -> dict[str, Tensor]:
        return episode_metrics(batch, self.max_tool_calls)


def episode_metrics(batch: RolloutBatch, max_tool_calls: int) -> dict[str, Tensor]:
    """The metrics of :class:`MedScopeStats` over a batch's episodes (host-side, B records)."""
    if batch.batch_size == 0 or not batch.samples:
        return {}
    texts = batch.completions or [""] * batch.batch_size
    ious, calls, frames, acc = [], [], [], []
    for text, s in zip(texts, batch.samples):  # ok: host-side logging of B episodes
        rec = episode_record(str(text), s, max_tool_calls)
        ious.append(V.best_tiou(rec["windows"], evidence(s)))
        calls.append(rec["tool_calls"]), frames.append(rec["frames_read"])
        acc.append(float(rec["prediction"] == str(s["answer"]).lower()))
    iou = torch.tensor(ious)
    return {"tool_calls": torch.tensor(calls, dtype=torch.float32).mean(), "frames_read": torch.tensor(frames, dtype=torch.float32).mean(),
            "miou": iou.mean(), "r_at_0.5": (iou >= 0.5).float().mean(), "answer_accuracy": torch.tensor(acc).mean()}


__all__ = ["MedScopeEnv", "MedScopeReward", "MedScopeStats", "MedScopeTasks", "episode_metrics", "episode_record",
           "parse_call", "tool_calls", "final_answer", "WEIGHTS"]
