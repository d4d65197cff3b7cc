"""A multi-turn dialogue task with a simulated user and a verifiable, dense per-turn reward: the environment of MAPO
(Zhang et al., arXiv 2603.06194, §10 of shared/methods/agentic.md) at CPU scale.

The user wants an order of ``slots`` attributes (e.g. size, topping, drink), each one value from a small menu, and
says none of them up front. Each agent turn either asks about attributes (any turn without ``ORDER:``; the user
answers every attribute *named* in the turn: "size: large") or places the order (``ORDER: large pepperoni cola``:
the episode ends). The reward follows MAPO's EMPA environment, whose turn reward is the decrease of the user's
distance to the target, r_t = −(d_t − d_{t−1}): here d is the fraction of attributes the agent has not yet learned,
so a turn that uncovers k new attributes earns k / slots, an idle turn 0 (and ``idle_reward``, default 0); the
final turn earns ``order_reward`` × the fraction of attributes ordered right (1 when the order is exactly the
user's). Everything is checked by string search on the bounded turn text (no parsing of free text beyond word
lookup, no eval).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from common.rollout.env import MAX_ACTION_CHARS, Environment, Step
from text_reasoning.data import TaskSource
from text_reasoning.tasks import Problem

MENU = {
    "size": ("small", "medium", "large"),
    "topping": ("cheese", "pepperoni", "mushroom", "olive"),
    "drink": ("cola", "water", "juice"),
    "side": ("fries", "salad", "soup"),
}
INSTRUCTION = ("You take a pizza order. The customer wants one choice for each of: {names}. Ask about them (name the "
               "attribute, e.g. 'which size?'); when you know all, answer 'ORDER: ' followed by the choices.\n")


class OrderDialogue(Environment):
    """The simulated customer of one order (module docstring). The task carries the order (``task["order"]``, a
    dict attribute -> value from MENU); a task without one gets an order drawn from the episode's seed.

    Args:
        slots: attributes of an order drawn when the task has none (the first ``slots`` of MENU).
        order_reward: the final turn's reward for an exactly right order (partial orders earn the right fraction).
        idle_reward: reward of a question that uncovers nothing new (e.g. −0.05 to discourage stalling).
    """

    def __init__(self, slots: int = 3, order_reward: float = 1.0, idle_reward: float = 0.0):
        if not 1 <= slots <= len(MENU):
            raise ValueError(f"slots must be 1-{len(MENU)}, got {slots}")
        self.slots, self.order_reward, self.idle_reward = slots, order_reward, idle_reward
        self.order: dict[str, str] = {}
        self.known: set[str] = set()

    def reset(self, task: Mapping[str, Any]) -> str:
        order = task.get("order")
        if order is None:
            order = {k: self.rng.choice(v) for k, v in list(MENU.items())[: self.slots]}
        bad = {k: v for k, v in dict(order).items() if k not in MENU or v not in MENU[k]}
        if bad or not order:
            raise ValueError(f"an order maps attributes of {sorted(MENU)} to their menu values, got {dict(order)!r}")
        self.order, self.known = dict(order), set()
        return INSTRUCTION.format(names=", ".join(self.order)) + "Customer: Hi, I'd like to order a pizza."

    def state_text(self, observation: str) -> str:  # what the agent has learned so far (history-free)
        return ",".join(sorted(self.known))

    def step(self, action: str) -> Step:
        text = action[-MAX_ACTION_CHARS:].lower()
        k = text.rfind("order:")
        if k >= 0:
            words = text[k + len("order:"):].split()
            right = sum(self.order[a] in words for a in self.order)
            return Step("", self.order_reward * right / len(self.order), True)
        asked = [a for a in self.order if a in text]
        new = [a for a in asked if a not in self.known]
        self.known.update(asked)
        if not asked:
            return Step("Customer: Sorry, what do you need to know?", self.idle_reward, False)
        reply = "Customer: " + ", ".join(f"{a}: {self.order[a]}" for a in asked) + "."
        return Step(reply, len(new) / len(self.order) if new else self.idle_reward, False)


class OrderTasks(TaskSource):
    """Generated orders: ``slots`` attributes, values drawn uniformly, each under its own ticket (``Ticket
    <seed>-<k>``, so prompts are distinct); the answer is the order line
    (``"large pepperoni cola"``); meta ``order`` holds the dict, level = slots.

    Args:
        slots: attributes per order (1-4).
    """

    def __init__(self, slots: int = 3):
        if not 1 <= slots <= len(MENU):
            raise ValueError(f"slots must be 1-{len(MENU)}, got {slots}")
        self.slots = slots

    def make(self, n: int, seed: int) -> list[Problem]:
        rng, out = random.Random(seed), []
        for k in range(n):
            order = {a: rng.choice(v) for a, v in list(MENU.items())[: self.slots]}
            line = " ".join(order.values())
            # the ticket makes every task's prompt distinct (the order itself is hidden in the environment), so a data
            # module's prompt-disjoint train/validation split keeps them all
            out.append(Problem(f"Ticket {seed}-{k}: take the customer's order ({', '.join(order)}).", line, "order", self.slots,
                               {"order": order, "task_id": f"order-{seed}-{k}"}))
        return out


def expert_turns(order: Mapping[str, str]) -> list[str]:
    """An expert dialogue: one question naming every attribute, then the order."""
    return [f"Which {', '.join(order)} would you like?", "ORDER: " + " ".join(order.values())]


__all__ = ["MENU", "OrderDialogue", "OrderTasks", "expert_turns"]
