"""Text environments for multi-turn agents (issue 21): generated tasks, verifiable outcomes, tools that are the
environment's own functions. ``calculator.Calculator`` (a calculator tool for multi-step arithmetic) and
``grid.GridWorld`` (move to a goal on a small grid rendered as text; the rendering is the hashable state)."""
