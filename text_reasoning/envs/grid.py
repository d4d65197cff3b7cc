"""A grid world rendered as text: the agent ``A`` moves on a ``size`` x ``size`` grid towards the goal ``G``, one
move per turn (``u``, ``d``, ``l``, ``r``: the last of these letters in the action counts; an action without one
leaves the agent where it is). Reward 1 when the agent reaches the goal (the episode ends), 0 otherwise. The
observation is the rendering, rows joined by newlines: a canonical, hashable state (GiGPO's anchor states).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from common.rollout.env import MAX_ACTION_CHARS, Environment, Step
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

MOVES = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}


def render(size: int, agent: tuple[int, int], goal: tuple[int, int]) -> str:
    cells = [["."] * size for _ in range(size)]
    cells[goal[0]][goal[1]] = "G"
    cells[agent[0]][agent[1]] = "A"
    return "\n".join("".join(row) for row in cells)


def last_move(action: str) -> str | None:
    """The last of u/d/l/r in the action's last MAX_ACTION_CHARS characters (one bounded reverse scan)."""
    for char in reversed(action[-MAX_ACTION_CHARS:]):
        if char in MOVES:
            return char
    return None


class GridWorld(Environment):
    """Reach the goal on a small grid (module docstring).

    Args:
        instruction: text placed before the first rendering.
        goal_reward: reward for reaching the goal.
    """

    def __init__(self, instruction: str = "", goal_reward: float = 1.0):
        self.instruction, self.goal_reward = instruction, goal_reward
        self.size, self.agent, self.goal = 0, (0, 0), (0, 0)

    def reset(self, task: Mapping[str, Any]) -> str:
        self.size = int(task["size"])
        self.agent, self.goal = tuple(task["start"]), tuple(task["goal"])
        if not (2 <= self.size <= 16 and all(0 <= v < self.size for v in (*self.agent, *self.goal))):
            raise ValueError(f"GridWorld task out of bounds: size {self.size}, start {self.agent}, goal {self.goal}")
        return self.instruction + render(self.size, self.agent, self.goal)

    def state_text(self, observation: str) -> str:  # the rendering alone (no instruction): GiGPO's anchor state
        return render(self.size, self.agent, self.goal)

    def step(self, action: str) -> Step:
        move = last_move(action)
        if move is not None:
            dr, dc = MOVES[move]
            self.agent = (min(max(self.agent[0] + dr, 0), self.size - 1), min(max(self.agent[1] + dc, 0), self.size - 1))
        if self.agent == self.goal:
            return Step("", self.goal_reward, True)
        return Step("\n" + render(self.size, self.agent, self.goal) + "\n", 0.0, False)


class GridTasks(TaskSource):
    """Generated grid-world tasks: distinct start and goal cells on a ``size`` x ``size`` grid (level = their
    Manhattan distance); the prompt is the first rendering.

    Args:
        size: grid side (2-16).
    """

    def __init__(self, size: int = 3):
        if not 2 <= size <= 16:
            raise ValueError(f"size must be in 2..16, got {size}")
        self.size = size

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, out = random.Random(seed), []
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        for _ in range(n):
            start, goal = rng.sample(cells, 2)
            distance = abs(start[0] - goal[0]) + abs(start[1] - goal[1])
            out.append(Problem(render(self.size, start, goal), "1", "grid", distance,
                               {"size": self.size, "start": list(start), "goal": list(goal)}))
        return out
