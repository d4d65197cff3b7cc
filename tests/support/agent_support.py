"""Shared by the multi-turn agent tests: a logits processor that forces a text per turn (real generation, constrained)."""

from __future__ import annotations

import torch


class Script:
    """A logits processor that forces a text per generate call (turn), then EOS: real generation by a real model
    whose choices are constrained (as a hinted rollout forces a prefix)."""

    def __init__(self, tokenizer, texts: list[str]):
        self.turns = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.eos = tokenizer.eos_token_id
        self.call, self.start, self.last = -1, 0, -10

    def __call__(self, input_ids, scores):
        L = input_ids.shape[1]
        if L != self.last + 1:  # a new generate call
            self.call, self.start = self.call + 1, L
        self.last = L
        seq = self.turns[min(self.call, len(self.turns) - 1)]
        k = L - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, seq[k] if k < len(seq) else self.eos] = 0.0
        return forced
