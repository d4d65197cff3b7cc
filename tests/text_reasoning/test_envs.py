"""The grid world (text_reasoning/envs/grid.py) by hand: rendering, moves, walls, the goal, seeded tasks."""

from __future__ import annotations

import pytest

from common.rollout.env import Step
from text_reasoning.envs.grid import GridTasks, GridWorld, last_move, render


def test_grid_world_by_hand():
    env = GridWorld()
    assert env.reset({"size": 3, "start": [0, 0], "goal": [1, 1]}) == "A..\n.G.\n..."
    assert env.step("up, I think") == Step("\n" + "A..\n.G.\n..." + "\n", 0.0, False)  # "u" last: into the wall
    assert env.step("r") == Step("\n.A.\n.G.\n...\n", 0.0, False)
    assert env.step("nothing") == Step("\n.A.\n.G.\n...\n", 0.0, False)  # no move letter: stay
    assert env.step("ld") == Step("", 1.0, True)  # the last letter counts: down onto the goal
    with pytest.raises(ValueError, match="out of bounds"):
        env.reset({"size": 3, "start": [0, 3], "goal": [1, 1]})


def test_grid_tasks_are_seeded_and_valid():
    a, b = GridTasks(4).make(30, 1), GridTasks(4).make(30, 1)
    assert a == b and a != GridTasks(4).make(30, 2)
    for p in a:
        start, goal = p.meta["start"], p.meta["goal"]
        assert start != goal and p.level == abs(start[0] - goal[0]) + abs(start[1] - goal[1])
        assert p.prompt == render(4, tuple(start), tuple(goal))
    assert last_move("x" * 10**6) is None and last_move("r" + "x" * 10**6) is None  # bounded scan
