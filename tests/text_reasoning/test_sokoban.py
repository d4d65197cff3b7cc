"""Sokoban (text_reasoning/envs/sokoban.py): the rules on hand-made levels, the solver against hand-counted shortest
solutions, generated levels solvable by their recorded expert trajectory, hostile actions bounded, states hashable
(the same state by two paths has one key), and a rollout of the agent on generated levels."""

from __future__ import annotations

import random

import pytest
import torch

from common.rollout.env import FakeClock
from text_reasoning.envs.sokoban import (Sokoban, SokobanTasks, expert_actions, generate_level, last_move, move, parse_level,
                                        render, solve)

LEVEL = ["#####",
         "#@$.#",
         "#___#",
         "#####"]


def play(level, moves):
    env = Sokoban(instruction="")
    env.reset({"level": level})
    return env, [env.step(m) for m in moves]


def test_rules_by_hand():
    env, steps = play(LEVEL, ["right"])  # push the box onto the target: solved
    assert steps[0].done and steps[0].reward == 1.0 and env.rendering() == "#####\n#_@*#\n#___#\n#####"
    env, steps = play(LEVEL, ["down", "right", "up", "left"])
    # down: to (2,1); right: (2,2); up: the box at (1,2) has a wall behind it, blocked; left: back to (2,1)
    assert env.player == (2, 1) and env.boxes == {(1, 2)}
    assert [s.done for s in steps] == [False] * 4 and all(s.valid for s in steps)
    # left from (2,2) to (2,1); the rendering is the observation and the state text
    assert steps[-1].observation.strip() == "#####\n#_$.#\n#@__#\n#####" == env.state_text("anything")
    # a wall stops the player; an action with no direction word is invalid and moves nothing
    env, steps = play(LEVEL, ["up", "I think so"])
    assert env.player == (1, 1) and steps[1].valid is False and steps[1].reward == -0.1
    # two boxes in a row cannot be pushed
    walls, targets, boxes, player = parse_level(["######", "#@$$.#", "#___.#", "######"])
    assert move(walls, boxes, player, "r") == (boxes, player)
    with pytest.raises(ValueError, match="one player and as many boxes as targets"):
        parse_level(["#@$#"])
    with pytest.raises(ValueError, match="unknown Sokoban symbol 'x'"):
        parse_level(["#@x#"])


def test_box_rewards_and_last_direction_word():
    env = Sokoban(instruction="", box_reward=0.5, step_reward=-0.01, solve_reward=10.0)
    env.reset({"level": ["######", "#@$._#", "######"]})
    s = env.step("maybe left... no: right")  # the last direction word counts
    assert s.done and s.reward == pytest.approx(-0.01 + 0.5 + 10.0)
    assert last_move("UP then Down") == "d" and last_move("nothing") is None
    assert last_move("left" * 10**6 + "up") == "u"  # a 4 MB action: bounded scan of its tail


def test_solver_finds_hand_counted_shortest_solutions():
    assert solve(*parse_level(LEVEL)) == "r"
    # the player stands above the box, which must go down twice: "dd"
    walls, targets, boxes, player = parse_level(["#####",
                                                 "#_@_#",
                                                 "#_$_#",
                                                 "#___#",
                                                 "#_._#",
                                                 "#####"])
    assert solve(walls, targets, boxes, player) == "dd"
    walls, targets, boxes, player = parse_level(["#####",
                                                 "#@__#",
                                                 "#_$_#",
                                                 "#___#",
                                                 "#_._#",
                                                 "#####"])
    assert solve(walls, targets, boxes, player) == "rdd"  # step right above the box, push it down twice (unique)
    assert solve(*parse_level(["#####", "#@$.#", "#####"])) == "r"
    # a box in a corner off target: unsolvable
    assert solve(*parse_level(["#####", "#$_.#", "#@__#", "#####"])) is None


def test_generated_levels_are_solved_by_their_expert_trajectory_and_seeded():
    a, b = SokobanTasks(size=6, boxes=1).make(12, 3), SokobanTasks(size=6, boxes=1).make(12, 3)
    assert a == b and len({p.prompt for p in a}) > 6
    for p in a:
        env = Sokoban(instruction="")
        first = env.reset(p.as_sample())
        assert first == p.prompt
        steps = [env.step(m) for m in expert_actions(p.meta["solution"])]
        assert steps[-1].done and steps[-1].reward == 1.0 and not any(s.done for s in steps[:-1])
        assert 2 <= len(steps) == p.level <= 20
    two = SokobanTasks(size=6, boxes=2, min_moves=3).make(3, 0)
    for p in two:
        assert solve(*parse_level(p.meta["level"])) is not None and len(p.meta["solution"]) == p.level


def test_states_are_hashable_and_history_free():
    """Two paths to the same state give the same state text (GiGPO's anchor states); a seeded env without a task
    level generates one from its rng."""
    e1, _ = play(["######", "#@___#", "#_$._#", "######"], ["right", "left"])
    e2, _ = play(["######", "#@___#", "#_$._#", "######"], ["left"])  # blocked by the wall: still at the start
    assert e1.state_text("x") == e2.state_text("y")
    env = Sokoban()
    env.seed(7)
    first = env.reset({"prompt": "x"})
    env2 = Sokoban()
    env2.seed(7)
    assert env2.reset({"prompt": "y"}) == first and first.startswith("Sokoban:")


def test_an_agent_rollout_on_generated_levels(one_thread):
    """The agent on generated levels (a tiny char model): typed end reasons, per-turn state keys equal the hash of
    the rendering the turn acted on, the turn rewards sum to the return."""
    from common.models import TinyLlama
    from common.policies.agent import MultiTurnAgentPolicy, turn_table
    from common.policies.causal_lm import CausalLMPolicy
    from common.rollout.base import Sampling
    from common.rollout.env import END_REASONS, EpisodeLimits, stable_hash

    torch.manual_seed(0)
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, alphabet="updownleftrigh #_@+$*.\n:", seed=0),
                        Sampling(max_new_tokens=6))
    policy = MultiTurnAgentPolicy(lm, Sokoban(instruction=""), EpisodeLimits(max_turns=3, max_total_tokens=120,
                                                                             clock=FakeClock(), layout="turn"))
    tasks = [p.as_sample() for p in SokobanTasks(size=5).make(2, 0)]
    batch = policy.rollout(tasks, 3)
    table = turn_table(batch)
    first_keys = table["tu_state_key"][table["tu_t"] == 0]
    levels = [render_of(t) for t in tasks for _ in range(3)]
    assert first_keys.tolist() == [stable_hash(lv) for lv in levels]
    assert {END_REASONS[i] for i in batch.end_reason.tolist()} <= {"done", "stopped", "max_turns", "overflow"}
    assert (table["tu_state_key"] >= 0).all()


def render_of(task):
    walls, targets, boxes, player = parse_level(task["level"])
    return render((len(task["level"]), len(task["level"][0])), walls, targets, boxes, player)


def test_generator_refuses_impossible_settings():
    with pytest.raises(ValueError, match="no solvable Sokoban level of 30-40 moves"):
        generate_level(random.Random(0), size=5, min_moves=30, max_moves=40, tries=5)
    with pytest.raises(ValueError, match="needs 2 x boxes \\+ 1 = 5 free cells"):
        generate_level(random.Random(0), size=4, boxes=2)
    with pytest.raises(ValueError, match="size must be 3-16"):
        SokobanTasks(size=2)


def test_expert_sft_examples_replay_the_solution_and_optimal_move_verifies():
    """SokobanExperts: each level's examples are its states along the solution, in order (the prompt is what the
    environment shows at a reset of that state; replaying the responses solves the level); OptimalMove accepts
    every expert move and any other shortest-path move, and rejects a move that lengthens the solution."""
    from text_reasoning.envs.sokoban import INSTRUCTION, OptimalMove, SokobanExperts

    tasks = SokobanTasks(size=5, inner_walls=1, min_moves=2, max_moves=6)
    ex = SokobanExperts(tasks, levels=6).make(None, 0)
    env = Sokoban()
    assert ex[0]["prompt"] == env.reset({"level": ex[0]["level"]})
    for e in ex:
        assert e["prompt"] == INSTRUCTION + "\n".join(e["level"]) and e["response"] in ("up", "down", "left", "right")
    assert OptimalMove()([e["response"] for e in ex], ex).tolist() == [1.0] * len(ex)
    level = ["######", "#@__.#", "#_$__#", "#____#", "######"]  # box (2,2) -> target (1,4): push right twice, then up
    sample = [{"level": level}]
    plan = solve(*parse_level(level))
    assert OptimalMove()([expert_actions(plan)[0]], sample).tolist() == [1.0]
    assert OptimalMove()(["up", "no idea"], sample * 2).tolist() == [0.0, 0.0]  # a wall bump wastes a move
