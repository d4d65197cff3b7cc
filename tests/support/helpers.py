"""Small shared test data (importable from tests: `from helpers import ...`)."""

from __future__ import annotations

import torch

DIGITS = "0123456789+"


def digit_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts like "12+34" (characters of DIGITS only, so the char-level tiny policy can read them)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(10, 100, (2, n), generator=g).tolist()
    return [{"prompt": f"{x}+{y}", "answer": str(x + y), "task": "arithmetic"} for x, y in zip(a, b)]


def random_token_batch(seed: int, B: int = 6, T: int = 8):
    """Float64 token-level loss inputs: logprobs, old_logprobs, entropy (B, T); advantages (B,); a ragged mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    logprobs = old + 0.2 * torch.randn(B, T, dtype=torch.float64, generator=g)
    entropy = torch.rand(B, T, dtype=torch.float64, generator=g) * 2
    advantages = torch.randn(B, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logprobs, old, entropy, advantages, mask


def digit_data(n: int, prompts_per_step: int, seed: int = 0):
    """A ``common.data.ResumableData`` of ``digit_prompts(n)`` (validation: the first two), for runs whose refill
    rounds draw new prompts from the data module's stream."""
    from common.data import ResumableData

    class DigitData(ResumableData):
        def setup(self, stage=None):
            self.train_set, self.val_set = digit_prompts(n, seed), digit_prompts(n, seed)[:2]

    return DigitData(prompts_per_step=prompts_per_step, val_batch_size=2, seed=seed)


def private_cache(path):
    """A private ``$ADVLAB_CACHE`` for one test (its own pre-trained artefacts) that shares the de-quantised bundled
    SmolLM2 of the default cache by a symlink: built once per machine (tens of seconds), not once per test."""
    from pathlib import Path

    from common.models import bundled_smollm2_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    link = path / "SmolLM2-135M-Instruct"
    if not link.exists():
        link.symlink_to(bundled_smollm2_path(), target_is_directory=True)
    return str(path)
