"""Generated image-question-answer data rendered with PIL, a verifiable answer reward, and the DataModule.

Five tasks, each a pure function of ``(seed, index)`` (a private ``random.Random``, no global state) over an
``S x S`` RGB image on a lightly textured background:

    colour    one shape; "What colour is the shape?"                    red | green | blue | yellow
    shape     one shape; "What shape is it?"                            circle | square | triangle
    count     1-4 shapes in distinct cells of a 2x2 grid; "How many shapes are there?"   1 | 2 | 3 | 4
    position  one shape in the left or right third; "Is the shape on the left or the right?"   left | right
    bars      a bar chart of 3 bars (distinct heights); "Which bar is tallest: left, middle or right?"

Every sample records ``boxes`` (K, 4) pixel boxes ``[x0, y0, x1, y1]`` (inclusive-exclusive) of the drawn objects
and ``points`` (K, 2) their centres ``[x, y]``, as float tensors, so a transform that moves pixels can move them too.
Every sample also has a ``caption`` (what the image shows, independent of the question). The answer is one word;
:class:`VQAReward` accepts a completion whose first word (bounded, case-folded) equals it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.data import SEED_STRIDE, ResumableData
from common.rewards.base import RewardFunction
from multimodal.vlm.model import IMAGE_TOKEN

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("colour", "shape", "count", "position", "bars")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Is the shape on the left or the right?",
    "bars": "Which bar is tallest: left, middle or right?",
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "position": ("left", "right"),
           "bars": ("left", "middle", "right")}


def _background(rng: random.Random, size: int):
    from PIL import Image

    noise = np.random.default_rng(rng.getrandbits(32)).integers(215, 256, (size, size, 1), dtype=np.uint8)
    return Image.fromarray(np.repeat(noise, 3, axis=2), "RGB")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box  # inclusive-exclusive
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)


def _third(x: float, size: int) -> str:
    """'left' / 'middle' / 'right': the third of the image holding the horizontal coordinate ``x``."""
    return "left" if x < size / 3 else ("right" if x >= 2 * size / 3 else "middle")


def render(task: str, seed: int, index: int, size: int = 32) -> dict[str, Any]:
    """Sample ``index`` of ``task`` under ``seed``: a dict with ``prompt`` ("<image>\\n" + question), ``answer``,
    ``task``, ``image`` (uint8 (3, size, size)), ``boxes`` (K, 4) and ``points`` (K, 2) float, ``uid`` (seed, index),
    ``caption``: a short text that is a function of the image alone (not of the question), e.g. "1 red circle, left."
    (one shape: colour, shape, the third holding its centre), "3 blue shapes." (several), "3 bars, tallest middle."
    — the target of the pre-training's caption alignment (:mod:`multimodal.vlm.pretrain`)."""
    from PIL import ImageDraw

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    rng = random.Random(f"{seed}:{task}:{index}")  # str seeds hash deterministically (sha512), independent of PYTHONHASHSEED
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    lo, hi = max(5, size // 5), max(6, size // 3)  # object side in pixels
    if task in ("colour", "shape", "position"):
        side = rng.randint(lo, hi)
        if task == "position":
            answer = rng.choice(ANSWERS["position"])
            xmax = size // 3 - side  # the whole shape inside the left third (mirrored for the right)
            x0 = rng.randint(0, max(0, xmax))
            x0 = x0 if answer == "left" else size - side - x0
        else:
            x0 = rng.randint(0, size - side)
        y0 = rng.randint(0, size - side)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        boxes.append((x0, y0, x0 + side, y0 + side))
        _draw_shape(draw, shape, boxes[0], COLOURS[colour])
        if task != "position":
            answer = colour if task == "colour" else shape
        caption = f"1 {colour} {shape}, {_third(x0 + side / 2, size)}."
    elif task == "count":
        k = rng.randint(1, 4)
        half = size // 2
        cells = rng.sample(range(4), k)
        colour = rng.choice(list(COLOURS))
        for c in cells:
            side = rng.randint(lo, min(hi, half - 2))
            cx, cy = (c % 2) * half, (c // 2) * half
            x0, y0 = cx + rng.randint(1, half - side - 1), cy + rng.randint(1, half - side - 1)
            boxes.append((x0, y0, x0 + side, y0 + side))
            shape = rng.choice(SHAPES)
            _draw_shape(draw, shape, boxes[-1], COLOURS[colour])
        answer = str(k)
        caption = f"1 {colour} {shape}, {_third(x0 + side / 2, size)}." if k == 1 else f"{k} {colour} shapes."
    else:  # bars
        width = size // 4
        gap = (size - 3 * width) // 4
        heights = rng.sample(range(size // 6, size - 3), 3)
        while max(heights) - sorted(heights)[-2] < 3:  # a visible winner
            heights = rng.sample(range(size // 6, size - 3), 3)
        for j, h in enumerate(heights):
            x0 = gap + j * (width + gap)
            boxes.append((x0, size - 1 - h, x0 + width, size - 1))
            draw.rectangle([x0, size - 1 - h, x0 + width - 1, size - 2], fill=COLOURS[rng.choice(list(COLOURS))])
        answer = ANSWERS["bars"][max(range(3), key=heights.__getitem__)]
        caption = f"3 bars, tallest {answer}."
    image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, S, S)
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # (K, 4)
    return {"prompt": f"{IMAGE_TOKEN}\n{QUESTIONS[task]}", "answer": answer, "task": task, "image": image,
            "boxes": b, "points": (b[:, :2] + b[:, 2:]) / 2, "uid": (seed, index), "caption": caption}


def generate(n: int, seed: int, tasks: Sequence[str] = TASKS, size: int = 32) -> list[dict[str, Any]]:
    """``n`` samples, task ``i % len(tasks)`` for sample ``i`` (equal shares), each ``render(task, seed, i, size)``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int (number of samples), got {n!r}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty list drawn from {TASKS}, got {list(tasks)!r}")
    return [render(tasks[i % len(tasks)], seed, i, size) for i in range(n)]


_WORD = re.compile(r"[a-z0-9]+")


def first_word(completion: str, limit: int = 200) -> str:
    """The first alphanumeric word of the completion's first ``limit`` characters, lower-cased ('' if none).
    Model output is hostile input: bounded before the regex, never evaluated."""
    m = _WORD.search(completion[:limit].lower())
    return m.group(0) if m else ""


class VQAReward(RewardFunction):
    """1 when the completion's first word equals the sample's ``answer`` (case-insensitive), else 0.

    Args:
        format_bonus: added when the completion is exactly one word (up to surrounding whitespace and a full stop).
    """

    name = "vqa"

    def __init__(self, format_bonus: float = 0.0):
        self.format_bonus = format_bonus

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        out = []
        for c, s in zip(completions, samples, strict=True):
            r = float(first_word(c) == str(s["answer"]).lower())
            if self.format_bonus and re.fullmatch(r"\s*[A-Za-z0-9]+\.?\s*", c[:64]) and len(c) <= 64:
                r += self.format_bonus
            out.append(r)
        return torch.tensor(out, dtype=torch.float32)


def _key(s: dict) -> tuple:
    return s["task"], bytes(s["image"].numpy().tobytes())


class VisualQAData(ResumableData):
    """Training prompts of the generated tasks and a held-out validation set sharing no (task, image) with them.

    Args:
        tasks: task names from ``TASKS`` (equal shares).
        image_size: side of the rendered images (must equal the VLM's vision tower image_size).
        train_size: training samples; the stream cycles through them, reshuffled each pass.
        val_size: held-out samples (greedy accuracy).
        prompts_per_step: prompts per training batch (each sampled G times by the module).
        val_batch_size: prompts per validation batch.
        seed: seed of the generators (validation uses ``seed + SEED_STRIDE``) and of the shuffling.
    """

    def __init__(self, tasks: list[str] | None = None, image_size: int = 32, train_size: int = 2048, val_size: int = 200,
                 prompts_per_step: int = 4, val_batch_size: int = 50, seed: int = 0):
        super().__init__(prompts_per_step, val_batch_size, seed)
        self.tasks = tuple(tasks) if tasks is not None else TASKS
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty list drawn from {TASKS}, got {tasks!r}")
        self.image_size, self.train_size, self.val_size = image_size, train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        if self.val_set:
            return
        self.val_set = generate(self.val_size, self.seed + SEED_STRIDE, self.tasks, self.image_size)
        held_out = {_key(s) for s in self.val_set}
        train = [s for s in generate(self.train_size + len(held_out), self.seed, self.tasks, self.image_size)
                 if _key(s) not in held_out]
        self.train_set = train[: self.train_size]


__all__ = ["render", "generate", "VQAReward", "VisualQAData", "first_word", "TASKS", "ANSWERS", "QUESTIONS"]
