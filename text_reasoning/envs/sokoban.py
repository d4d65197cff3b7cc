"""A small Sokoban rendered as text (the environment of GiGPO's Sokoban results, Feng et al. 2025, arXiv 2505.10978,
and verl-agent's ``sokoban`` env), with generated solvable levels and a breadth-first solver for expert trajectories.

Symbols (the classic text format): ``#`` wall, ``_`` floor, ``@`` player, ``+`` player on a target, ``$`` box,
``*`` box on a target, ``.`` empty target. One move per turn: the last of the words ``up``, ``down``, ``left``,
``right`` in the action (bounded scan; an action without one is invalid: ``Step.valid`` False, ``invalid_reward``,
nothing moves). The player walks onto floor and targets, pushes a box one cell if the cell behind it is free, and
never moves into a wall or pushes two boxes. Rewards (verl-agent's scheme, each configurable): ``step_reward`` per
valid move, ``box_reward`` when a box lands on a target (minus it when one leaves), ``solve_reward`` when every box
is on a target (the episode ends ``done``). The observation is the rendering, a canonical history-free state
(``state_text``; GiGPO's anchor states hash it).

Levels: a ``size`` x ``size`` room (walls around), a few random inner walls, ``boxes`` boxes and targets and the
player on distinct floor cells, kept only if the solver finds a solution of ``min_moves``..``max_moves`` moves
(BFS over (player, boxes) states, bounded by ``max_states``); the solution is the expert trajectory for SFT warm
starts (``meta["solution"]``: letters u/d/l/r).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from common.rewards.base import RewardFunction
from common.rollout.env import MAX_ACTION_CHARS, Environment, Step
from common.sft import SFTSource
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

MOVES = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
WORDS = {"up": "u", "down": "d", "left": "l", "right": "r"}
INSTRUCTION = ("Sokoban: push every box ($) onto a target (.). # is a wall, _ floor, @ you, * a box on a target, "
               "+ you on a target. Answer with one move: up, down, left or right.\n")

Cell = tuple[int, int]


def parse_level(rows: Sequence[str]) -> tuple[frozenset[Cell], frozenset[Cell], frozenset[Cell], Cell]:
    """(walls, targets, boxes, player) of a level in the text format; raises naming the problem."""
    if not rows or len(rows) > 16 or any(len(r) != len(rows[0]) or len(r) > 16 for r in rows):
        raise ValueError(f"a Sokoban level is 1-16 rows of equal length <= 16, got {[len(r) for r in rows][:17]}")
    walls, targets, boxes, players = set(), set(), set(), []
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            if c not in "#_@+$*.":
                raise ValueError(f"unknown Sokoban symbol {c!r} at row {i}, column {j}")
            if c == "#":
                walls.add((i, j))
            if c in "+*.":
                targets.add((i, j))
            if c in "$*":
                boxes.add((i, j))
            if c in "@+":
                players.append((i, j))
    if len(players) != 1 or len(boxes) != len(targets) or not boxes:
        raise ValueError(f"a Sokoban level has one player and as many boxes as targets (>= 1), got {len(players)} "
                         f"players, {len(boxes)} boxes, {len(targets)} targets")
    return frozenset(walls), frozenset(targets), frozenset(boxes), players[0]


def render(shape: tuple[int, int], walls, targets, boxes, player: Cell) -> str:
    """The level as text rows joined by newlines."""
    out = []
    for i in range(shape[0]):
        row = []
        for j in range(shape[1]):
            c = (i, j)
            if c in walls:
                row.append("#")
            elif c == player:
                row.append("+" if c in targets else "@")
            elif c in boxes:
                row.append("*" if c in targets else "$")
            else:
                row.append("." if c in targets else "_")
        out.append("".join(row))
    return "\n".join(out)


def move(walls, boxes: frozenset[Cell], player: Cell, direction: str) -> tuple[frozenset[Cell], Cell]:
    """One move: the new (boxes, player); unchanged when blocked."""
    dr, dc = MOVES[direction]
    nxt = (player[0] + dr, player[1] + dc)
    if nxt in walls:
        return boxes, player
    if nxt in boxes:
        behind = (nxt[0] + dr, nxt[1] + dc)
        if behind in walls or behind in boxes:
            return boxes, player
        return (boxes - {nxt}) | {behind}, nxt
    return boxes, nxt


def solve(walls, targets, boxes: frozenset[Cell], player: Cell, max_states: int = 20000) -> str | None:
    """A shortest solution (letters u/d/l/r) by breadth-first search over (player, boxes) states; None when there
    is none within ``max_states`` visited states. "" when already solved."""
    if boxes == targets:
        return ""
    start = (player, boxes)
    parent: dict[tuple, tuple | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for d in "udlr":
            b, p = move(walls, state[1], state[0], d)
            nxt = (p, b)
            if nxt in parent:
                continue
            parent[nxt] = (state, d)
            if b == targets:
                path = []
                while parent[nxt] is not None:
                    nxt, step = parent[nxt]
                    path.append(step)
                return "".join(reversed(path))
            if len(parent) >= max_states:
                return None
            queue.append(nxt)
    return None


def last_move(action: str) -> str | None:
    """The direction of the last of up/down/left/right (any case) in the action's last MAX_ACTION_CHARS
    characters; one bounded reverse scan, no regex."""
    text = action[-MAX_ACTION_CHARS:].lower()
    best, where = None, -1
    for word, d in WORDS.items():
        k = text.rfind(word)
        if k > where:
            best, where = d, k
    return best


def generate_level(rng: random.Random, size: int = 6, boxes: int = 1, inner_walls: int = 2, min_moves: int = 2,
                   max_moves: int = 20, max_states: int = 20000, tries: int = 200) -> tuple[list[str], str]:
    """A random solvable level (rows) and its shortest solution; raises after ``tries`` rejected draws."""
    inner = [(i, j) for i in range(1, size - 1) for j in range(1, size - 1)]
    if len(inner) - inner_walls < 2 * boxes + 1:
        raise ValueError(f"a level of size {size} has {len(inner)} inner cells; with inner_walls={inner_walls} it needs "
                         f"2 x boxes + 1 = {2 * boxes + 1} free cells (boxes, targets, player)")
    border = {(i, j) for i in range(size) for j in range(size)} - set(inner)
    for _ in range(tries):
        walls = set(border) | set(rng.sample(inner, inner_walls))
        free = [c for c in inner if c not in walls]
        cells = rng.sample(free, 2 * boxes + 1)
        targets, bx, player = frozenset(cells[:boxes]), frozenset(cells[boxes: 2 * boxes]), cells[-1]
        walls = frozenset(walls)
        plan = solve(walls, targets, bx, player, max_states)
        if plan is not None and min_moves <= len(plan) <= max_moves:
            return render((size, size), walls, targets, bx, player).split("\n"), plan
    raise ValueError(f"no solvable Sokoban level of {min_moves}-{max_moves} moves in {tries} draws (size {size}, "
                     f"{boxes} boxes); widen the move range or shrink the level")


class Sokoban(Environment):
    """Push the boxes onto the targets (module docstring). A task carries its level (``task["level"]``, rows); a
    task without one gets a level generated from the episode's seed (``self.rng``, from (task id, seed)).

    Args:
        instruction: text placed before the first rendering.
        solve_reward / box_reward / step_reward / invalid_reward: rewards (module docstring).
        size, boxes, inner_walls, min_moves, max_moves: the generator's settings for tasks without a level.
    """

    def __init__(self, instruction: str = INSTRUCTION, solve_reward: float = 1.0, box_reward: float = 0.0,
                 step_reward: float = 0.0, invalid_reward: float = -0.1, size: int = 6, boxes: int = 1,
                 inner_walls: int = 2, min_moves: int = 2, max_moves: int = 20):
        if not 3 <= size <= 16 or boxes < 1:
            raise ValueError(f"size must be 3-16 and boxes >= 1, got {size}, {boxes}")
        self.instruction = instruction
        self.solve_reward, self.box_reward, self.step_reward, self.invalid_reward = (solve_reward, box_reward,
                                                                                    step_reward, invalid_reward)
        self.generator = dict(size=size, boxes=boxes, inner_walls=inner_walls, min_moves=min_moves, max_moves=max_moves)
        self.shape, self.walls, self.targets, self.boxes, self.player = (0, 0), frozenset(), frozenset(), frozenset(), (0, 0)

    def reset(self, task: Mapping[str, Any]) -> str:
        rows = list(task["level"]) if "level" in task else generate_level(self.rng, **self.generator)[0]
        self.walls, self.targets, self.boxes, self.player = parse_level(rows)
        self.shape = (len(rows), len(rows[0]))
        return self.instruction + self.rendering()

    def rendering(self) -> str:
        return render(self.shape, self.walls, self.targets, self.boxes, self.player)

    def state_text(self, observation: str) -> str:
        return self.rendering()

    def step(self, action: str) -> Step:
        d = last_move(action)
        if d is None:
            return Step("\n" + self.rendering() + "\n", self.invalid_reward, False, False)
        before = len(self.boxes & self.targets)
        self.boxes, self.player = move(self.walls, self.boxes, self.player, d)
        on = len(self.boxes & self.targets)
        reward = self.step_reward + self.box_reward * (on - before)
        if self.boxes == self.targets:
            return Step("", reward + self.solve_reward, True)
        return Step("\n" + self.rendering() + "\n", reward, False)


class SokobanTasks(TaskSource):
    """Generated solvable Sokoban levels: the prompt is the rendering, ``meta["level"]`` the rows and
    ``meta["solution"]`` a shortest solution (u/d/l/r; the expert trajectory), level = its length.

    Args:
        size, boxes, inner_walls, min_moves, max_moves: see :func:`generate_level`.
    """

    def __init__(self, size: int = 6, boxes: int = 1, inner_walls: int = 2, min_moves: int = 2, max_moves: int = 20):
        if not 3 <= size <= 16 or boxes < 1 or not 0 <= min_moves <= max_moves:
            raise ValueError(f"size must be 3-16, boxes >= 1 and 0 <= min_moves <= max_moves, got {size}, {boxes}, "
                             f"{min_moves}, {max_moves}")
        self.settings = dict(size=size, boxes=boxes, inner_walls=inner_walls, min_moves=min_moves, max_moves=max_moves)

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, out = random.Random(seed), []
        for k in range(n):
            rows, plan = generate_level(rng, **self.settings)
            out.append(Problem("\n".join(rows), str(len(plan)), "sokoban", len(plan),
                               {"level": rows, "solution": plan, "task_id": f"sokoban-{seed}-{k}"}))
        return out


def expert_actions(solution: str) -> list[str]:
    """The expert's turn texts for a solution string (SFT warm start on generated trajectories)."""
    names = {v: k for k, v in WORDS.items()}
    return [names[c] for c in solution]


class SokobanExperts(SFTSource):
    """SFT examples from the solver's expert trajectories (a warm start for RL when the model cannot play zero-shot):
    every state along the shortest solution of a generated level is one example, ``prompt`` the state as the
    environment shows it at a reset (``instruction`` + rendering), ``response`` the expert's move word; ``level``
    (the rows of that state) travels along for :class:`OptimalMove`.

    Args:
        tasks: the level generator (``SokobanTasks``; use the RL recipe's settings).
        instruction: the environment's instruction (the RL recipe's ``Sokoban.instruction``).
        levels: levels generated when the data module asks for all (``train_size`` None).
    """

    def __init__(self, tasks: SokobanTasks | None = None, instruction: str = INSTRUCTION, levels: int = 512):
        self.tasks, self.instruction, self.levels = tasks if tasks is not None else SokobanTasks(), instruction, levels

    def make(self, n: int | None, seed: int) -> list[dict]:
        out: list[dict] = []
        target = self.levels if n is None else n
        for level in self.tasks.make(target, seed + 10_000):  # seeds apart from the RL recipe's task seeds
            walls, targets, boxes, player = parse_level(level.meta["level"])
            shape = (len(level.meta["level"]), len(level.meta["level"][0]))
            for d, word in zip(level.meta["solution"], expert_actions(level.meta["solution"])):
                rows = render(shape, walls, targets, boxes, player)
                out.append({"prompt": self.instruction + rows, "response": word, "answer": word, "task": "sokoban",
                            "level": rows.split("\n")})
                boxes, player = move(walls, boxes, player, d)
        return out if n is None else out[:n]


class OptimalMove(RewardFunction):
    """1 when the completion's move (its last direction word) starts a shortest solution from the sample's level
    (``sample["level"]``, rows): the solver's distance drops by one; else 0. The validation verifier of the SFT warm
    start (any optimal move counts, not only the expert's)."""

    name = "optimal_move"

    def __init__(self, max_states: int = 20000):
        self.max_states = max_states

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        import torch

        scores = []
        for text, sample in zip(completions, samples):  # ok: host-side verifier, a BFS per sample
            d = last_move(text)
            walls, targets, boxes, player = parse_level(sample["level"])
            best = solve(walls, targets, boxes, player, self.max_states)
            if d is None or best is None:
                scores.append(0.0)
                continue
            b, p = move(walls, boxes, player, d)
            after = solve(walls, targets, b, p, self.max_states)
            scores.append(float(after is not None and len(after) == len(best) - 1))
        return torch.tensor(scores, dtype=torch.float32)


__all__ = ["OptimalMove", "Sokoban", "SokobanExperts", "SokobanTasks", "expert_actions", "generate_level", "last_move",
           "move", "parse_level", "render", "solve"]
