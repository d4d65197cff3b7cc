"""The dialogue task for MAPO (text_reasoning/envs/dialogue.py) by hand and in an agent rollout (dense per-turn
rewards in the turn table, layout A); the calculator's JSON function-calling protocol through the chat template's
tool turns (SmolLM2's template: the result as a ``tool`` message, no re-tokenisation drift)."""

from __future__ import annotations

import pytest
import torch
from agent_support import Script

from common.models import TinyLlama
from common.policies.agent import MultiTurnAgentPolicy, turn_table
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.base import Sampling
from common.rollout.env import END_REASONS, EpisodeLimits, FakeClock
from common.rollout.hf import HFBackend
from text_reasoning.envs.calculator import Calculator
from text_reasoning.envs.dialogue import OrderDialogue, OrderTasks, expert_turns


def test_order_dialogue_rewards_by_hand():
    env = OrderDialogue()
    env.reset({"order": {"size": "large", "topping": "olive", "drink": "water"}})
    s = env.step("Which size?")
    assert s.observation == "Customer: size: large." and s.reward == pytest.approx(1 / 3) and not s.done
    s = env.step("Hello!")  # names nothing: idle
    assert s.reward == 0.0 and "what do you need" in s.observation
    s = env.step("And the size and topping?")  # size again (known) + topping (new)
    assert s.observation == "Customer: size: large, topping: olive." and s.reward == pytest.approx(1 / 3)
    assert env.state_text("") == "size,topping"
    s = env.step("ORDER: large olive cola")  # 2 of 3 right
    assert s.done and s.reward == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="an order maps attributes"):
        env.reset({"order": {"size": "huge"}})
    a, b = OrderTasks(3).make(5, 1), OrderTasks(3).make(5, 1)
    assert a == b and all(p.answer == " ".join(p.meta["order"].values()) for p in a)


def test_an_expert_dialogue_through_the_agent_gives_dense_turn_rewards(one_thread):
    """Forced expert turns (a question naming every attribute, then the order), SmolLM2's template with the
    customer as user turns: rewards [1, 1] per turn, done, return 2, no drift; layout A has one row per turn."""
    task = OrderTasks(3).make(1, 0)[0].as_sample()
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, seed=0), Sampling(max_new_tokens=24))
    lm.backend = HFBackend(logits_processors=[Script(lm.tokenizer, expert_turns(task["order"]))])
    policy = MultiTurnAgentPolicy(lm, OrderDialogue(), EpisodeLimits(max_turns=4, max_total_tokens=200, layout="turn",
                                                                     observation_role="user", clock=FakeClock()))
    batch = policy.rollout([task], 1)
    table = turn_table(batch)
    assert table["tu_reward"].tolist() == pytest.approx([1.0, 1.0]) and batch.batch_size == 2
    assert END_REASONS[int(batch.end_reason[0])] == "done" and batch.samples[0]["episode_return"] == pytest.approx(2.0)
    assert not batch.turn_drift.any()
    assert table["tu_state_key"][0] != table["tu_state_key"][1]  # nothing learned vs everything learned


@pytest.mark.parametrize("role", ["tool", None])
def test_json_function_calling_through_the_chat_templates_tool_turn(role, one_thread):
    """The model writes a <tool_call>{json}</tool_call> (the turn stops there, no EOS), the calculator's result comes
    back as the template's tool message (the assistant turn closed by the template's <|im_end|>), the model answers.
    Reward 1, done in 2 turns, no re-tokenisation drift; without a role the result follows inline."""
    call = '<tool_call>{"name": "calc", "arguments": {"expression": "12+7"}}</tool_call>'
    lm = CausalLMPolicy(TinyLlama(hidden_size=32, num_layers=1, num_heads=2, seed=0), Sampling(max_new_tokens=40))
    lm.backend = HFBackend(logits_processors=[Script(lm.tokenizer, [call, "<answer>19</answer>"])])
    policy = MultiTurnAgentPolicy(lm, Calculator(protocol="json"), EpisodeLimits(max_turns=3, max_total_tokens=160,
                                                                                 observation_role=role))
    batch = policy.rollout([{"prompt": "What is 12+7?", "answer": "19"}], 1)
    tok = policy.tokenizer
    assert (batch.samples[0]["episode_return"], END_REASONS[int(batch.end_reason[0])], int(batch.num_turns[0])) == (1.0, "done", 2)
    ids = batch.completion_ids[0]
    assert tok.decode(ids[batch.token_turn[0] == 0]) == call
    env_text = tok.decode(ids[batch.env_mask[0]])
    if role == "tool":
        assert env_text == "<|im_end|>\n<|im_start|>tool\n<result>19</result><|im_end|>\n<|im_start|>assistant\n"
        assert batch.turn_drift[0].tolist() == [False, False]
        assert "<tools>" in tok.decode(batch.prompt_ids[0][batch.prompt_mask[0]])
    else:
        assert env_text == "<result>19</result>" and batch.turn_drift is None


def test_grid_state_text_is_the_rendering_alone():
    """The start state (shown after the instruction) and a revisit of it (shown alone) have one state text, so they
    pool in GiGPO's anchor groups."""
    from text_reasoning.envs.grid import GridWorld

    env = GridWorld(instruction="Move A to G.\n")
    first = env.reset({"size": 3, "start": [0, 0], "goal": [2, 2]})
    start = env.state_text(first)
    env.step("r")
    back = env.step("l")
    assert env.state_text(back.observation) == start == "A..\n...\n..G" and first != back.observation


def test_order_tasks_fill_a_prompt_disjoint_split():
    """Every order has its own prompt (the ticket), so ReasoningData's prompt-disjoint validation split keeps the
    requested sizes (with one shared prompt text the training set was empty)."""
    from text_reasoning.data import ReasoningData

    problems = OrderTasks(slots=3).make(50, 0)
    assert len({p.prompt for p in problems}) == 50
    data = ReasoningData(tasks=[OrderTasks(slots=3)], train_size=24, val_size=4, prompts_per_step=2)
    data.setup("fit")
    assert len(data.train_set) == 24 and len(data.val_set) == 4
    assert not {s["prompt"] for s in data.train_set} & {s["prompt"] for s in data.val_set}
