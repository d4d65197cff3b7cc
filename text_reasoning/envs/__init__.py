"""Text environments for multi-turn agents (issue 21): generated tasks, verifiable outcomes, tools that are the
environment's own functions, states hashable for GiGPO's anchor groups (``state_text``).

- ``calculator.Calculator``: a calculator tool for multi-step arithmetic (``<tool>`` tags or JSON function calls).
- ``grid.GridWorld``: move to a goal on a small grid rendered as text.
- ``sokoban.Sokoban``: push boxes onto targets; generated solvable levels, a BFS solver for expert trajectories.
- ``dialogue.OrderDialogue``: a simulated customer with dense per-turn rewards (MAPO's multi-turn dialogue setting).
"""
