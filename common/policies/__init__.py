"""Policies: the Policy interface (base.py) and its kinds (causal_lm.py; toy.py for bandits and continuous actions)."""
