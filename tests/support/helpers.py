"""Small shared test data (importable from tests: `from helpers import ...`)."""

from __future__ import annotations

import torch

DIGITS = "0123456789+"


def digit_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts like "12+34" (characters of DIGITS only, so the char-level tiny policy can read them)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(10, 100, (2, n), generator=g).tolist()
    return [{"prompt": f"{x}+{y}", "answer": str(x + y), "task": "arithmetic"} for x, y in zip(a, b)]
